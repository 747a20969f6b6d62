// Package netmap computes each node's WireGuard peers from the cluster's
// node records. It is pure: no I/O, no clock, no store.
package netmap

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/ipam"
)

// DefaultKeepalive is the persistent keepalive, in seconds, given to every
// peer. It keeps NAT mappings open and lets a peer behind NAT be reached
// after it spoke first.
const DefaultKeepalive = 25

// Policy holds the cluster-wide settings that shape the netmap.
type Policy struct {
	// ClusterCIDRs are the pod address ranges. A peer's allowed IPs are
	// limited to node prefixes inside them.
	ClusterCIDRs []netip.Prefix
	// ForceExternal makes every peer reachable at its external IP, even
	// when both nodes share a network (--flannel-external-ip).
	ForceExternal bool
	// Keepalive is the persistent keepalive in seconds; 0 disables it.
	Keepalive int
}

// Compute returns the peers of the node named self, sorted by name. Nodes
// without a data plane (no key, no listen port or no pod CIDR) and entries
// that fail Sanitize are left out.
func Compute(self string, nodes []api.Node, p Policy) []api.Peer {
	var me *api.Node
	for i := range nodes {
		if nodes[i].Name == self {
			me = &nodes[i]
			break
		}
	}
	if me == nil {
		return nil
	}
	peers := make([]api.Peer, 0, len(nodes))
	seenKeys := map[api.Key]bool{me.PublicKey: true}
	for i := range nodes {
		n := &nodes[i]
		if n.Name == self || n.PublicKey.IsZero() || n.ListenPort == 0 || seenKeys[n.PublicKey] {
			// Two records with one key would make WireGuard route one
			// node's traffic to the other: keep the first only.
			continue
		}
		allowed := AllowedIPs(n, p.ClusterCIDRs)
		if len(allowed) == 0 {
			continue
		}
		seenKeys[n.PublicKey] = true
		peers = append(peers, api.Peer{
			Name:                n.Name,
			PublicKey:           n.PublicKey,
			Endpoint:            Endpoint(me, n, p),
			AllowedIPs:          allowed,
			PersistentKeepalive: p.Keepalive,
		})
	}
	slices.SortFunc(peers, func(a, b api.Peer) int { return strings.Compare(a.Name, b.Name) })
	return peers
}

// AllowedIPs returns n's pod CIDRs that are node prefixes of one of the
// cluster CIDRs. Anything else (the cluster CIDR itself, 0.0.0.0/0, another
// range) is dropped: a node may only attract traffic for its own pods.
func AllowedIPs(n *api.Node, clusterCIDRs []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, pc := range n.PodCIDRs {
		for _, c := range clusterCIDRs {
			if ipam.Contains(c, pc) {
				out = append(out, pc)
				break
			}
		}
	}
	return out
}

// Endpoint chooses where from sends WireGuard packets for to: to's external
// IP when the policy forces it or the two nodes do not share a network, its
// internal IP when they do. The address family must be one from can use.
// The zero AddrPort means no usable address is known.
func Endpoint(from, to *api.Node, p Policy) netip.AddrPort {
	port := to.ListenPort
	if port == 0 {
		return netip.AddrPort{}
	}
	v4, v6 := families(from)
	usable := func(a netip.Addr) bool {
		return ValidEndpoint(a) && ((a.Is4() && v4) || (a.Is6() && v6))
	}
	pick := func(addrs []netip.Addr) netip.Addr {
		for _, a := range addrs {
			if usable(a) {
				return a
			}
		}
		return netip.Addr{}
	}
	var order [][]netip.Addr
	switch {
	case p.ForceExternal:
		order = [][]netip.Addr{to.ExternalIPs, to.InternalIPs}
	case SameNetwork(from, to):
		order = [][]netip.Addr{to.InternalIPs, to.ExternalIPs}
	default:
		// Not in one network: the external address, else the internal one
		// (a cloud VM whose interface holds a public address).
		order = [][]netip.Addr{to.ExternalIPs, to.InternalIPs}
	}
	for _, addrs := range order {
		if a := pick(addrs); a.IsValid() {
			return netip.AddrPortFrom(a, port)
		}
	}
	return netip.AddrPort{}
}

// families reports which address families n can send from. A node that
// declares no address at all is assumed to have both.
func families(n *api.Node) (v4, v6 bool) {
	for _, list := range [][]netip.Addr{n.InternalIPs, n.ExternalIPs} {
		for _, a := range list {
			if a.Is4() || a.Is4In6() {
				v4 = true
			} else {
				v6 = true
			}
		}
	}
	if !v4 && !v6 {
		return true, true
	}
	return v4, v6
}

// SameNetwork reports whether a and b share a private network: an internal
// address of one lies in a network the other is attached to. Two clouds
// that both number their private networks alike (say 10.0.0.0/24) look the
// same here: such clusters need --flannel-external-ip, as the seed page
// prescribes for servers anyway.
func SameNetwork(a, b *api.Node) bool {
	for _, na := range a.Networks {
		for _, ib := range b.InternalIPs {
			if na.Contains(ib) {
				return true
			}
		}
	}
	for _, nb := range b.Networks {
		for _, ia := range a.InternalIPs {
			if nb.Contains(ia) {
				return true
			}
		}
	}
	return false
}

// ValidEndpoint reports whether a may be used as a WireGuard endpoint
// announced by a node: a unicast address that is not loopback, link-local,
// multicast or unspecified. Anything else is either useless across hosts
// or a way to point peers at the wrong place.
func ValidEndpoint(a netip.Addr) bool {
	a = a.Unmap()
	return a.IsValid() && !a.IsUnspecified() && !a.IsLoopback() && !a.IsMulticast() &&
		!a.IsLinkLocalUnicast() && !a.IsLinkLocalMulticast() && !a.IsInterfaceLocalMulticast() &&
		a != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}
