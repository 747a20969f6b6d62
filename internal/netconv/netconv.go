// Package netconv converts between net/netip values, which Trellis uses
// everywhere, and the net.IPNet that netlink speaks. IPv4 comes out in its
// 4-byte form whichever form the kernel or a caller used.
package netconv

import (
	"net"
	"net/netip"
)

// Prefix converts a netlink address or route destination, keeping the
// host bits (an interface address is an address and a length). It
// reports false for nil, a malformed IP or a mask that does not fit it.
func Prefix(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, bits := n.Mask.Size()
	if bits == 32 {
		a = a.Unmap()
	}
	if bits != a.BitLen() { // also a non-canonical mask (bits 0)
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(a, ones), true
}

// IPNet converts p as it is (host bits kept, for an interface address;
// mask p first for a route).
func IPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// Unmap turns an IPv4-mapped IPv6 prefix (::ffff:a.b.c.d/96+n) into its
// IPv4 form (a.b.c.d/n); other prefixes are returned as they are.
func Unmap(p netip.Prefix) netip.Prefix {
	if p.Addr().Is4In6() && p.Bits() >= 96 {
		return netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	return p
}
