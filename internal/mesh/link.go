package mesh

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/trellis-mesh/trellis/internal/netconv"
)

// Overhead is the number of bytes WireGuard adds to each packet in the
// worst case (IPv6 outer header 40 + UDP 8 + WireGuard 32), the figure
// K3s and flannel subtract from the underlay MTU.
const Overhead = 80

// DefaultMTU is used when the MTU is derived but no underlay route is
// found: a 1500-byte underlay minus Overhead.
const DefaultMTU = 1500 - Overhead

// TunnelMTU returns the MTU of a WireGuard link whose packets travel
// over an underlay link with MTU underlay.
func TunnelMTU(underlay int) int { return underlay - Overhead }

// RouteProtocol tags the routes this package installs (the rtm_protocol
// field, shown by `ip route` as "proto 116"). SetRoutes only deletes
// routes that carry it.
const RouteProtocol netlink.RouteProtocol = 116

// UnderlayMTU returns the MTU of the interface that the kernel's route to
// dst leaves through, lowered to the route's own MTU if it sets one. With
// an invalid dst it uses the interface of the default route (IPv4 first,
// then IPv6). It looks at the network namespace of the calling thread.
func UnderlayMTU(dst netip.Addr) (int, error) {
	h, err := netlink.NewHandle()
	if err != nil {
		return 0, fmt.Errorf("find underlay MTU: open netlink: %w", err)
	}
	defer h.Close()
	return underlayMTU(h, dst)
}

func underlayMTU(h *netlink.Handle, dst netip.Addr) (int, error) {
	var route netlink.Route
	if dst.IsValid() {
		routes, err := h.RouteGet(dst.AsSlice())
		if err != nil {
			return 0, fmt.Errorf("find underlay MTU: no route to %s: %w", dst, err)
		}
		if len(routes) == 0 {
			return 0, fmt.Errorf("find underlay MTU: no route to %s", dst)
		}
		route = routes[0]
	} else {
		found := false
		for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			routes, err := h.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
			if err != nil {
				return 0, fmt.Errorf("find underlay MTU: list routes: %w", err)
			}
			for _, r := range routes {
				if isDefault(r.Dst) && r.LinkIndex > 0 {
					route, found = r, true
					break
				}
			}
			if found {
				break
			}
		}
		if !found {
			return 0, errors.New("find underlay MTU: there is no default route; set the MTU explicitly")
		}
	}
	link, err := h.LinkByIndex(route.LinkIndex)
	if err != nil {
		return 0, fmt.Errorf("find underlay MTU: interface %d of the route: %w", route.LinkIndex, err)
	}
	mtu := link.Attrs().MTU
	if route.MTU > 0 && route.MTU < mtu {
		mtu = route.MTU
	}
	return mtu, nil
}

func isDefault(dst *net.IPNet) bool {
	if dst == nil {
		return true
	}
	ones, _ := dst.Mask.Size()
	return ones == 0
}

// setAddresses makes the addresses of link exactly want. IPv6 link-local
// addresses, which the kernel manages, are left alone.
func setAddresses(h *netlink.Handle, link netlink.Link, want []netip.Prefix) error {
	name := link.Attrs().Name
	have, err := h.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", name, err)
	}
	wantSet := make(map[netip.Prefix]bool, len(want))
	for _, p := range want {
		if !p.IsValid() {
			return fmt.Errorf("set addresses of %s: %s is not a valid prefix", name, p)
		}
		wantSet[netconv.Unmap(p)] = true
	}
	haveSet := make(map[netip.Prefix]bool, len(have))
	// Delete first: removing a primary IPv4 address can take the
	// secondaries with it, so additions come after.
	for _, a := range have {
		p, ok := netconv.Prefix(a.IPNet)
		if !ok || p.Addr().IsLinkLocalUnicast() {
			continue
		}
		if wantSet[p] {
			haveSet[p] = true
			continue
		}
		if err := h.AddrDel(link, &a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return fmt.Errorf("remove address %s from %s: %w", p, name, err)
		}
	}
	for _, p := range want {
		p = netconv.Unmap(p)
		if haveSet[p] {
			continue
		}
		haveSet[p] = true
		addr := &netlink.Addr{IPNet: netconv.IPNet(p)}
		if p.Addr().Is6() {
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := h.AddrAdd(link, addr); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("add address %s to %s: %w", p, name, err)
		}
	}
	return nil
}

// setRoutes makes the routes through link that carry RouteProtocol exactly
// want (main table). Routes without the tag are never deleted; a desired
// route replaces an untagged one with the same destination and metric.
func setRoutes(h *netlink.Handle, link netlink.Link, want []netip.Prefix) error {
	name := link.Attrs().Name
	idx := link.Attrs().Index
	wantSet := make(map[netip.Prefix]bool, len(want))
	for _, p := range want {
		if !p.IsValid() {
			return fmt.Errorf("set routes via %s: %s is not a valid prefix", name, p)
		}
		wantSet[netconv.Unmap(p).Masked()] = true
	}
	have := make(map[netip.Prefix]bool)
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := h.RouteListFiltered(family, &netlink.Route{
			LinkIndex: idx, Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN,
		}, netlink.RT_FILTER_OIF|netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
		if err != nil {
			return fmt.Errorf("list routes via %s: %w", name, err)
		}
		for _, r := range routes {
			p, ok := netconv.Prefix(r.Dst)
			if !ok {
				continue
			}
			if wantSet[p] && !have[p] {
				have[p] = true
				continue
			}
			if err := h.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("delete route %s via %s: %w", p, name, err)
			}
		}
	}
	for _, p := range want {
		p = netconv.Unmap(p).Masked()
		if have[p] {
			continue
		}
		have[p] = true
		r := &netlink.Route{
			LinkIndex: idx,
			Dst:       netconv.IPNet(p),
			Scope:     netlink.SCOPE_LINK,
			Protocol:  RouteProtocol,
			Table:     unix.RT_TABLE_MAIN,
		}
		if err := h.RouteReplace(r); err != nil {
			return fmt.Errorf("add route %s via %s: %w", p, name, err)
		}
	}
	return nil
}
