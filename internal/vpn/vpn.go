// Package vpn parses --vpn-auth and defines the VPN provider interface.
package vpn

import (
	"context"
	"net/netip"
)

// Provider is a VPN that carries the cluster's traffic instead of
// Trellis's own WireGuard mesh: every node joins it, uses its VPN
// addresses as node IPs, and advertises its pod CIDRs through it as subnet
// routes. Implementations drive a daemon the node runs (tailscaled); every
// method honours ctx and may be called from any goroutine.
type Provider interface {
	// Name is the provider's name as --vpn-auth spells it.
	Name() string
	// Up joins the VPN with the configured key unless the node is on it
	// already (it then does not log in again), and makes the node accept
	// routes that other nodes advertise. It returns the state afterwards,
	// with Running true. An error carries the daemon's own message.
	Up(ctx context.Context) (State, error)
	// State returns the node's current state without changing it.
	State(ctx context.Context) (State, error)
	// AdvertiseRoutes adds routes to the routes the node advertises and
	// keeps the others. It returns the routes that were not advertised
	// before.
	AdvertiseRoutes(ctx context.Context, routes []netip.Prefix) (added []netip.Prefix, err error)
	// WithdrawRoutes stops advertising exactly routes and keeps the others.
	// Routes not advertised are ignored.
	WithdrawRoutes(ctx context.Context, routes []netip.Prefix) error
}

// State is a node's view of the VPN.
type State struct {
	// Running: the node is logged in and connected.
	Running bool
	// Addrs are the node's VPN addresses (IPv4 and IPv6 where present).
	Addrs []netip.Addr
	// LoginName is the user (or tag owner) the node is logged in as, if
	// known; it names the owner in the autoApprovers stanza.
	LoginName string
	// Tags are the node's tags (e.g. tag:k8s), if it joined with a tagged
	// key: the control server then knows it by its tags, not by its user.
	Tags []string
	// Advertised are the routes the node advertises.
	Advertised []netip.Prefix
	// Approved are the node's routes that the control server approved and
	// that peers route to it.
	Approved []netip.Prefix
	// Peers are the other nodes of the VPN.
	Peers []Peer
	// FilterKnown: Filter is the VPN's packet filter for traffic to this
	// node. When false the provider could not read it and Filter is empty.
	FilterKnown bool
	// Filter are the rules of the node's inbound packet filter (what the
	// tailnet policy lets in); no rule means nothing may come in.
	Filter []Rule
}

// Rule is one rule of a VPN's inbound packet filter: packets from a source
// in Srcs to a destination in Dsts pass (on some ports and protocols).
type Rule struct {
	Srcs []netip.Prefix
	Dsts []netip.Prefix
}

// Admits reports whether some rule of filter lets packets from a source
// that overlaps srcs reach a destination that overlaps dst.
func Admits(filter []Rule, srcs []netip.Prefix, dst netip.Prefix) bool {
	for _, r := range filter {
		if overlapsAny(r.Dsts, dst) && slicesOverlap(r.Srcs, srcs) {
			return true
		}
	}
	return false
}

func overlapsAny(ps []netip.Prefix, p netip.Prefix) bool {
	for _, q := range ps {
		if q.IsValid() && p.IsValid() && q.Overlaps(p) {
			return true
		}
	}
	return false
}

func slicesOverlap(a, b []netip.Prefix) bool {
	for _, p := range b {
		if overlapsAny(a, p) {
			return true
		}
	}
	return false
}

// Peer is another node of the VPN.
type Peer struct {
	// Name is the peer's host name in the VPN.
	Name string
	// Addrs are its VPN addresses.
	Addrs []netip.Addr
	// Routes are the subnet routes it serves (approved), without its own
	// addresses.
	Routes []netip.Prefix
}
