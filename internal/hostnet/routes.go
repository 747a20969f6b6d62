package hostnet

import (
	"errors"
	"fmt"
	"net/netip"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/trellis-mesh/trellis/internal/netconv"
)

// RouteProtocol marks the routes RouteToLink adds (the rtm_protocol
// field, "proto 84" in `ip route`): RTPROT_STATIC is what `ip route add`
// uses; this one is Trellis's, so that UnrouteFromLinks removes only
// those. (internal/mesh tags the routes through the WireGuard interface
// with its own protocol.)
const RouteProtocol = netlink.RouteProtocol(0x54) // 'T'

// RouteToLink makes each prefix route to link in the main table, marked
// with RouteProtocol. A route that is already there is left as it is.
func RouteToLink(link Link, prefixes []netip.Prefix) error {
	for _, p := range prefixes {
		p = netconv.Unmap(p).Masked()
		if ok, err := routed(link, p); err != nil {
			return err
		} else if ok {
			continue
		}
		r := &netlink.Route{LinkIndex: link.Index, Dst: netconv.IPNet(p), Protocol: RouteProtocol, Scope: netlink.SCOPE_LINK, Table: unix.RT_TABLE_MAIN}
		if err := netlink.RouteReplace(r); err != nil {
			return fmt.Errorf("route %s to %s: %w", p, link.Name, err)
		}
	}
	return nil
}

// routed reports whether p already routes to link with RouteProtocol.
func routed(link Link, p netip.Prefix) (bool, error) {
	routes, err := netlink.RouteListFiltered(family(p), &netlink.Route{Dst: netconv.IPNet(p), Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN},
		netlink.RT_FILTER_DST|netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	if err != nil {
		return false, fmt.Errorf("list routes of %s: %w", p, err)
	}
	for _, r := range routes {
		if r.LinkIndex == link.Index {
			return true, nil
		}
	}
	return false, nil
}

// UnrouteFromLinks removes the routes of prefixes that RouteToLink added,
// wherever they point. Other routes are left alone.
func UnrouteFromLinks(prefixes []netip.Prefix) error {
	for _, p := range prefixes {
		p = netconv.Unmap(p).Masked()
		routes, err := netlink.RouteListFiltered(family(p), &netlink.Route{Dst: netconv.IPNet(p), Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN},
			netlink.RT_FILTER_DST|netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
		if err != nil {
			return fmt.Errorf("list routes of %s: %w", p, err)
		}
		for i := range routes {
			if err := netlink.RouteDel(&routes[i]); err != nil && !errors.Is(err, syscall.ESRCH) {
				return fmt.Errorf("delete route %s: %w", p, err)
			}
		}
	}
	return nil
}

func family(p netip.Prefix) int {
	if p.Addr().Is6() {
		return netlink.FAMILY_V6
	}
	return netlink.FAMILY_V4
}

// LinkMTUOf returns the MTU of the interface that holds a: the underlay
// the node's WireGuard packets leave on.
func LinkMTUOf(a netip.Addr) (int, bool) {
	l, err := LinkOf([]netip.Addr{a})
	if err != nil {
		return 0, false
	}
	return l.MTU, true
}
