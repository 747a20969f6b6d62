// Package ipam allocates per-node pod prefixes out of the cluster CIDRs.
//
// It is pure: callers keep the claims (in the store, one key per prefix,
// created with compare-and-swap) and ask this package which prefix to try
// next.
package ipam

import (
	"errors"
	"fmt"
	"math/big"
	"net/netip"
)

// ErrExhausted means every node prefix of a cluster CIDR is taken.
var ErrExhausted = errors.New("cluster CIDR exhausted")

// DefaultNodeBits returns the prefix length of one node's pod CIDR for the
// family of cluster: /24 for IPv4, /64 for IPv6.
func DefaultNodeBits(cluster netip.Prefix) int {
	if cluster.Addr().Is4() {
		return 24
	}
	return 64
}

// NodeBits returns the per-node prefix length used inside cluster: the
// family default, or the cluster's own length when the cluster is smaller
// than one node prefix.
func NodeBits(cluster netip.Prefix) int {
	b := DefaultNodeBits(cluster)
	if cluster.Bits() > b {
		return cluster.Bits()
	}
	return b
}

// Size returns how many node prefixes cluster holds, capped at 1<<32.
func Size(cluster netip.Prefix) uint64 {
	shift := NodeBits(cluster) - cluster.Bits()
	if shift >= 32 {
		return 1 << 32
	}
	return 1 << shift
}

// Nth returns the i-th node prefix of cluster (0-based).
func Nth(cluster netip.Prefix, i uint64) (netip.Prefix, error) {
	cluster = cluster.Masked()
	if i >= Size(cluster) {
		return netip.Prefix{}, fmt.Errorf("node prefix %d of %s: %w", i, cluster, ErrExhausted)
	}
	bits := NodeBits(cluster)
	base := new(big.Int).SetBytes(cluster.Addr().AsSlice())
	off := new(big.Int).Lsh(new(big.Int).SetUint64(i), uint(cluster.Addr().BitLen()-bits))
	sum := base.Add(base, off).Bytes()
	buf := make([]byte, cluster.Addr().BitLen()/8)
	copy(buf[len(buf)-len(sum):], sum)
	a, _ := netip.AddrFromSlice(buf)
	return netip.PrefixFrom(a, bits), nil
}

// Next returns the lowest node prefix of cluster that is not in used.
// Prefixes in used that are not node prefixes of cluster are ignored.
func Next(cluster netip.Prefix, used map[netip.Prefix]bool) (netip.Prefix, error) {
	cluster = cluster.Masked()
	n := Size(cluster)
	for i := uint64(0); i < n; i++ {
		p, err := Nth(cluster, i)
		if err != nil {
			return netip.Prefix{}, err
		}
		if !used[p] {
			return p, nil
		}
	}
	return netip.Prefix{}, fmt.Errorf("all %d node prefixes of %s are taken: %w; delete unused nodes (trellis node delete) or choose a larger --cluster-cidr", n, cluster, ErrExhausted)
}

// Contains reports whether p is a node prefix of cluster: inside it and of
// the node length.
func Contains(cluster, p netip.Prefix) bool {
	return p.IsValid() && p == p.Masked() && p.Bits() == NodeBits(cluster) && cluster.Masked().Contains(p.Addr())
}

// Gateway returns the first usable address of a node prefix (".1"): the
// pod bridge's address.
func Gateway(p netip.Prefix) netip.Prefix {
	return netip.PrefixFrom(p.Masked().Addr().Next(), p.Bits())
}

// TunnelAddr returns the node's address on the WireGuard interface: the
// node prefix's first address as a host prefix (/32 or /128), as flannel
// does.
func TunnelAddr(p netip.Prefix) netip.Prefix {
	a := p.Masked().Addr()
	return netip.PrefixFrom(a, a.BitLen())
}

// NextFrom is Next, but the search starts at the start-th node prefix
// (modulo the cluster's size) and wraps around. Concurrent allocators
// that start at different places (a hash of the node name) rarely race
// for the same prefix.
func NextFrom(cluster netip.Prefix, used map[netip.Prefix]bool, start uint64) (netip.Prefix, error) {
	cluster = cluster.Masked()
	n := Size(cluster)
	for k := uint64(0); k < n; k++ {
		p, err := Nth(cluster, (start+k)%n)
		if err != nil {
			return netip.Prefix{}, err
		}
		if !used[p] {
			return p, nil
		}
	}
	return netip.Prefix{}, fmt.Errorf("all %d node prefixes of %s are taken: %w; delete unused nodes (trellis node delete) or choose a larger --cluster-cidr", n, cluster, ErrExhausted)
}
