// Package hostnet reads the host's network configuration (the node's
// addresses, the networks and links that hold them), routes prefixes to a
// link other than Trellis's own, and tells when links, addresses or routes
// change. It works in the network namespace of the calling thread; one
// trellis process runs in one namespace.
package hostnet

import (
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
)

// Addrs is what the host says about the node's own addresses.
type Addrs struct {
	// Internal are the node IPs: the pinned ones (--node-ip), else the
	// source address of the default route of each family, IPv4 first.
	Internal []netip.Addr
	// Networks are the subnets (masked) of the interface addresses that
	// hold Internal.
	Networks []netip.Prefix
	// Local is every global unicast address on the host's interfaces,
	// sorted: when one goes, connections bound to it are dead even if
	// the node IPs are pinned.
	Local []netip.Addr
}

// Equal reports whether a and b name the same node IPs and networks
// (Local is not compared: the node's own tunnel and bridge addresses come
// and go with it).
func (a Addrs) Equal(b Addrs) bool {
	return slices.Equal(a.Internal, b.Internal) && slices.Equal(a.Networks, b.Networks)
}

// DetectAddrs returns the node's addresses: pinned as the node IPs if
// given, else the source of the default route of each family (the address
// K3s also picks when --node-ip is not set). The error, if any, says why
// the networks could not be told; the addresses are still returned.
func DetectAddrs(pinned []netip.Addr) (Addrs, error) {
	var s Addrs
	s.Internal = slices.Clone(pinned)
	if len(s.Internal) == 0 {
		for _, v6 := range []bool{false, true} {
			if ip, ok := DefaultAddr(v6); ok {
				s.Internal = append(s.Internal, ip)
			}
		}
	}
	list, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return s, fmt.Errorf("list interface addresses: %w", err)
	}
	s.Networks = networksOf(list, s.Internal)
	s.Local = localAddrs(list)
	return s, nil
}

// DefaultAddr returns the source address of the default route of the
// given family. On an IPv6-only node only the IPv6 lookup succeeds. A
// link-local source (an interface whose global address is not configured
// yet, or still in duplicate address detection) is not a node IP.
func DefaultAddr(v6 bool) (netip.Addr, bool) {
	dst := net.ParseIP("198.51.100.1") // never contacted: only the route is looked up
	if v6 {
		dst = net.ParseIP("2001:db8::1")
	}
	routes, err := netlink.RouteGet(dst)
	if err != nil || len(routes) == 0 || routes[0].Src == nil {
		return netip.Addr{}, false
	}
	a, ok := netip.AddrFromSlice(routes[0].Src)
	a = a.Unmap()
	if !ok || !a.IsGlobalUnicast() || a.Is6() != v6 {
		return netip.Addr{}, false
	}
	return a, true
}

// networksOf returns the subnets (masked) of the interface addresses in
// list that hold addrs.
func networksOf(list []netlink.Addr, addrs []netip.Addr) []netip.Prefix {
	var out []netip.Prefix
	for _, a := range addrs {
		for _, la := range list {
			ip, ok := netip.AddrFromSlice(la.IP)
			if !ok || ip.Unmap() != a {
				continue
			}
			ones, _ := la.Mask.Size()
			out = append(out, netip.PrefixFrom(a, ones).Masked())
		}
	}
	return out
}

// localAddrs returns the global unicast addresses of list, sorted.
func localAddrs(list []netlink.Addr) []netip.Addr {
	var out []netip.Addr
	for _, la := range list {
		ip, ok := netip.AddrFromSlice(la.IP)
		if ok && ip.Unmap().IsGlobalUnicast() {
			out = append(out, ip.Unmap())
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}

// Link is a network interface.
type Link struct {
	Name  string
	Index int
	MTU   int
}

// LinkOf returns the interface that holds one of addrs, or an error that
// says none does.
func LinkOf(addrs []netip.Addr) (Link, error) {
	list, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return Link{}, fmt.Errorf("list interface addresses: %w", err)
	}
	for _, la := range list {
		ip, ok := netip.AddrFromSlice(la.IP)
		if !ok || !slices.Contains(addrs, ip.Unmap()) {
			continue
		}
		l, err := netlink.LinkByIndex(la.LinkIndex)
		if err != nil {
			return Link{}, fmt.Errorf("interface %d of %s: %w", la.LinkIndex, ip.Unmap(), err)
		}
		return Link{Name: l.Attrs().Name, Index: l.Attrs().Index, MTU: l.Attrs().MTU}, nil
	}
	return Link{}, fmt.Errorf("no interface holds %s", joinAddrs(addrs))
}

func joinAddrs(as []netip.Addr) string {
	s := ""
	for i, a := range as {
		if i > 0 {
			s += ","
		}
		s += a.String()
	}
	return s
}
