package mesh

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// Peer is the desired state of one WireGuard peer.
type Peer struct {
	// PublicKey identifies the peer.
	PublicKey [32]byte
	// Endpoint is where to send packets; the zero value means "none
	// known": the peer must contact us first, and an endpoint learned
	// from its packets is kept.
	Endpoint netip.AddrPort
	// AllowedIPs are the prefixes routed to and accepted from the peer.
	AllowedIPs []netip.Prefix
	// PersistentKeepalive is the keepalive interval; 0 disables it.
	PersistentKeepalive time.Duration
}

// validatePeers reports desired peers that WireGuard would reject or
// that Diff cannot reconcile unambiguously.
func validatePeers(own [32]byte, peers []Peer) error {
	seen := make(map[[32]byte]bool, len(peers))
	for i, p := range peers {
		k := wgtypes.Key(p.PublicKey)
		switch {
		case p.PublicKey == [32]byte{}:
			return fmt.Errorf("peer %d has no public key", i)
		case p.PublicKey == own:
			return fmt.Errorf("peer %s is this node's own public key", k)
		case seen[p.PublicKey]:
			return fmt.Errorf("peer %s is listed twice", k)
		case p.PersistentKeepalive < 0 || p.PersistentKeepalive > 65535*time.Second:
			return fmt.Errorf("peer %s: keepalive %s is out of range (0-65535s)", k, p.PersistentKeepalive)
		case p.Endpoint.IsValid() && (!p.Endpoint.Addr().IsValid() || p.Endpoint.Port() == 0):
			return fmt.Errorf("peer %s: endpoint %s has no port", k, p.Endpoint)
		}
		for _, pfx := range p.AllowedIPs {
			if !pfx.IsValid() {
				return fmt.Errorf("peer %s: allowed IP %s is not a valid prefix", k, pfx)
			}
		}
		seen[p.PublicKey] = true
	}
	return nil
}

// Diff returns the configuration that turns a device whose peers are
// current into one whose peers are desired, touching only what differs:
//
//   - a desired peer that is absent is added with its endpoint, keepalive
//     and allowed IPs;
//   - a peer whose endpoint, keepalive or allowed IPs differ is updated
//     (UpdateOnly) with just those fields; changed allowed IPs are sent
//     in full with ReplaceAllowedIPs;
//   - a peer that is identical is left out, so its session, handshake and
//     counters are kept;
//   - a current peer that is not desired is removed.
//
// A desired peer without an endpoint never clears an endpoint the
// device learned from the peer's packets (a peer behind NAT). Allowed
// IPs compare as sets of masked prefixes. Diff never sets ReplacePeers,
// the private key or the listen port. Peers appear in the result in
// desired order followed by removals in current order. Desired public
// keys must be unique (the last one wins otherwise).
func Diff(current []wgtypes.Peer, desired []Peer) wgtypes.Config {
	cur := make(map[wgtypes.Key]*wgtypes.Peer, len(current))
	for i := range current {
		cur[current[i].PublicKey] = &current[i]
	}
	want := make(map[wgtypes.Key]int, len(desired))
	for i, p := range desired {
		want[wgtypes.Key(p.PublicKey)] = i
	}

	var cfg wgtypes.Config
	for i, d := range desired {
		key := wgtypes.Key(d.PublicKey)
		if want[key] != i {
			continue // a later entry with the same key wins
		}
		allowed := canonicalPrefixes(d.AllowedIPs)
		c, ok := cur[key]
		if !ok {
			pc := wgtypes.PeerConfig{
				PublicKey:         key,
				Endpoint:          udpAddr(d.Endpoint),
				ReplaceAllowedIPs: true,
				AllowedIPs:        ipNets(allowed),
			}
			if d.PersistentKeepalive != 0 {
				pc.PersistentKeepaliveInterval = durationPtr(d.PersistentKeepalive)
			}
			cfg.Peers = append(cfg.Peers, pc)
			continue
		}
		pc := wgtypes.PeerConfig{PublicKey: key, UpdateOnly: true}
		changed := false
		if ep := d.Endpoint; ep.IsValid() && unmapAddrPort(ep) != addrPortOf(c.Endpoint) {
			pc.Endpoint = udpAddr(ep)
			changed = true
		}
		if d.PersistentKeepalive != c.PersistentKeepaliveInterval {
			pc.PersistentKeepaliveInterval = durationPtr(d.PersistentKeepalive)
			changed = true
		}
		if !slices.Equal(allowed, canonicalPrefixes(prefixesOf(c.AllowedIPs))) {
			pc.ReplaceAllowedIPs = true
			pc.AllowedIPs = ipNets(allowed)
			changed = true
		}
		if changed {
			cfg.Peers = append(cfg.Peers, pc)
		}
	}
	for _, c := range current {
		if _, ok := want[c.PublicKey]; !ok {
			cfg.Peers = append(cfg.Peers, wgtypes.PeerConfig{PublicKey: c.PublicKey, Remove: true})
		}
	}
	return cfg
}

func durationPtr(d time.Duration) *time.Duration { return &d }

// canonicalPrefixes returns the masked, unmapped prefixes sorted and
// without duplicates. Invalid prefixes are dropped.
func canonicalPrefixes(in []netip.Prefix) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(in))
	for _, p := range in {
		if !p.IsValid() {
			continue
		}
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		out = append(out, p.Masked())
	}
	slices.SortFunc(out, comparePrefix)
	return slices.Compact(out)
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

func unmapAddrPort(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// addrPortOf converts a wgctrl endpoint; nil becomes the zero AddrPort.
func addrPortOf(u *net.UDPAddr) netip.AddrPort {
	if u == nil {
		return netip.AddrPort{}
	}
	a, ok := netip.AddrFromSlice(u.IP)
	if !ok {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(a.Unmap(), uint16(u.Port))
}

// udpAddr converts an endpoint for wgctrl; the zero AddrPort becomes nil.
func udpAddr(ap netip.AddrPort) *net.UDPAddr {
	if !ap.IsValid() {
		return nil
	}
	return net.UDPAddrFromAddrPort(unmapAddrPort(ap))
}

// prefixesOf converts wgctrl allowed IPs.
func prefixesOf(nets []net.IPNet) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(nets))
	for _, n := range nets {
		a, ok := netip.AddrFromSlice(n.IP)
		if !ok {
			continue
		}
		ones, bits := n.Mask.Size()
		if bits == 32 {
			a = a.Unmap()
		}
		if bits == 0 || (bits == 32) != a.Is4() {
			continue
		}
		out = append(out, netip.PrefixFrom(a, ones))
	}
	return out
}

// ipNets converts prefixes for wgctrl.
func ipNets(ps []netip.Prefix) []net.IPNet {
	out := make([]net.IPNet, 0, len(ps))
	for _, p := range ps {
		out = append(out, net.IPNet{
			IP:   p.Addr().AsSlice(),
			Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen()),
		})
	}
	return out
}

// PeersMatch reports whether a device whose peers are current (as Status
// returns them) already has the desired peers, in the sense of Diff: it
// is true exactly when Diff would change nothing. The agent compares the
// status it read anyway before it reconfigures the device.
func PeersMatch(current []PeerStatus, desired []Peer) bool {
	if len(current) != len(desired) {
		return false
	}
	cur := make(map[[32]byte]*PeerStatus, len(current))
	for i := range current {
		cur[current[i].PublicKey] = &current[i]
	}
	for _, d := range desired {
		c, ok := cur[d.PublicKey]
		if !ok {
			return false
		}
		delete(cur, d.PublicKey) // a key listed twice does not match twice
		if ep := d.Endpoint; ep.IsValid() && unmapAddrPort(ep) != unmapAddrPort(c.Endpoint) {
			return false
		}
		if d.PersistentKeepalive != c.PersistentKeepalive {
			return false
		}
		if !slices.Equal(canonicalPrefixes(d.AllowedIPs), canonicalPrefixes(c.AllowedIPs)) {
			return false
		}
	}
	return true
}
