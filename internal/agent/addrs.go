package agent

import (
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
)

// defaultAddr returns the source address of the default route of the
// given family: the address K3s also picks when --node-ip is not set. On an
// IPv6-only node only the IPv6 lookup succeeds. A link-local source (an
// interface whose global address is not configured yet, or still in
// duplicate address detection) is not a node IP: the report loop looks
// again every second.
func defaultAddr(v6 bool) (netip.Addr, bool) {
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

// networksOf returns the subnets (masked) of the interface addresses that
// hold addrs.
func networksOf(addrs []netip.Addr) ([]netip.Prefix, error) {
	list, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list interface addresses: %w", err)
	}
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
	return out, nil
}

// linkMTUOf returns the MTU of the interface that holds a: the underlay
// the node's WireGuard packets leave on.
func linkMTUOf(a netip.Addr) (int, bool) {
	list, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return 0, false
	}
	for _, la := range list {
		ip, ok := netip.AddrFromSlice(la.IP)
		if !ok || ip.Unmap() != a {
			continue
		}
		link, err := netlink.LinkByIndex(la.LinkIndex)
		if err != nil {
			return 0, false
		}
		return link.Attrs().MTU, true
	}
	return 0, false
}

// localAddrs returns the global unicast addresses on the host's
// interfaces, sorted.
func localAddrs() []netip.Addr {
	list, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil
	}
	var out []netip.Addr
	for _, la := range list {
		ip, ok := netip.AddrFromSlice(la.IP)
		if ok && ip.Unmap().IsGlobalUnicast() {
			out = append(out, ip.Unmap())
		}
	}
	slices.SortFunc(out, func(a, b netip.Addr) int { return a.Compare(b) })
	return slices.Compact(out)
}
