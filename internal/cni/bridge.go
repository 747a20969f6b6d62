package cni

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/trellis-mesh/trellis/internal/netconv"
)

// EnsureBridge creates the bridge name (default "cni0") or adopts an
// existing one, makes its addresses exactly gateways (e.g. 10.42.1.1/24
// and fd00:42:0:1::1/64; IPv6 link-local addresses are left to the
// kernel), sets its MTU when mtu > 0, and brings it up. It works in the
// network namespace of the calling thread.
func EnsureBridge(name string, gateways []netip.Prefix, mtu int) error {
	if name == "" {
		name = DefaultBridge
	}
	for _, g := range gateways {
		if !g.IsValid() {
			return fmt.Errorf("set up bridge %s: gateway %s is not a valid prefix", name, g)
		}
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			return fmt.Errorf("set up bridge %s: %w", name, err)
		}
		la := netlink.NewLinkAttrs()
		la.Name = name
		if mtu > 0 {
			la.MTU = mtu
		}
		if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: la}); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("set up bridge %s: create: %w", name, err)
		}
		if link, err = netlink.LinkByName(name); err != nil {
			return fmt.Errorf("set up bridge %s: %w", name, err)
		}
	}
	if _, ok := link.(*netlink.Bridge); !ok {
		return fmt.Errorf("set up bridge %s: an interface of that name exists and is a %s, not a bridge; remove it or choose another bridge name",
			name, link.Type())
	}
	if mtu > 0 && link.Attrs().MTU != mtu {
		if err := netlink.LinkSetMTU(link, mtu); err != nil {
			return fmt.Errorf("set up bridge %s: set MTU %d: %w", name, mtu, err)
		}
	}
	if err := setAddresses(link, gateways); err != nil {
		return fmt.Errorf("set up bridge %s: %w", name, err)
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		// Only when down: the agent repairs the bridge whenever a link
		// changes, and a repair that changes nothing must not make an
		// event of its own.
		if err := netlink.LinkSetUp(link); err != nil {
			return fmt.Errorf("set up bridge %s: bring up: %w", name, err)
		}
	}
	return nil
}

// RemoveBridge deletes the bridge; a missing bridge is not an error.
func RemoveBridge(name string) error {
	if name == "" {
		name = DefaultBridge
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("remove bridge %s: %w", name, err)
	}
	if _, ok := link.(*netlink.Bridge); !ok {
		return fmt.Errorf("remove bridge %s: it is a %s, not a bridge; left alone", name, link.Type())
	}
	if err := netlink.LinkDel(link); err != nil {
		return fmt.Errorf("remove bridge %s: %w", name, err)
	}
	return nil
}

// EnableForwarding turns on IPv4 and/or IPv6 forwarding in the network
// namespace of the calling thread (through /proc/sys).
func EnableForwarding(v4, v6 bool) error {
	if v4 {
		if err := writeSysctl("/proc/sys/net/ipv4/ip_forward"); err != nil {
			return fmt.Errorf("enable IPv4 forwarding: %w", err)
		}
	}
	if v6 {
		if err := writeSysctl("/proc/sys/net/ipv6/conf/all/forwarding"); err != nil {
			return fmt.Errorf("enable IPv6 forwarding (is IPv6 disabled on this host?): %w", err)
		}
	}
	return nil
}

func writeSysctl(path string) error {
	if b, err := os.ReadFile(path); err == nil && len(b) > 0 && b[0] == '1' {
		return nil
	}
	return os.WriteFile(path, []byte("1\n"), 0o644)
}

func setAddresses(link netlink.Link, want []netip.Prefix) error {
	have, err := netlink.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("list addresses: %w", err)
	}
	wantSet := make(map[netip.Prefix]bool, len(want))
	for _, p := range want {
		wantSet[netconv.Unmap(p)] = true
	}
	haveSet := make(map[netip.Prefix]bool)
	for _, a := range have {
		p, ok := netconv.Prefix(a.IPNet)
		if !ok || p.Addr().IsLinkLocalUnicast() {
			continue
		}
		if wantSet[p] {
			haveSet[p] = true
			continue
		}
		if err := netlink.AddrDel(link, &a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return fmt.Errorf("remove address %s: %w", p, err)
		}
	}
	for _, p := range want {
		p = netconv.Unmap(p)
		if haveSet[p] {
			continue
		}
		haveSet[p] = true
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
		if p.Addr().Is6() {
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrAdd(link, addr); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("add address %s: %w", p, err)
		}
	}
	return nil
}
