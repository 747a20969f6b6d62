package netmap

import (
	"net/netip"
	"reflect"
	"testing"

	"github.com/trellis-mesh/trellis/internal/api"
)

var dualCluster = prefixes("10.42.0.0/16", "fd00:42::/56")

// dualNode is a node with both pod prefixes and the given addresses.
func dualNode(name string, k byte, internal, networks, external []string, i int) api.Node {
	n := api.Node{Name: name, PublicKey: key(k), ListenPort: 51820}
	n.InternalIPs = addrs(internal...)
	n.Networks = prefixes(networks...)
	n.ExternalIPs = addrs(external...)
	n.PodCIDRs = []netip.Prefix{
		netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 42, byte(i), 0}), 24),
		netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0, 0, 0x42, 0, 0, 0, byte(i)}), 64),
	}
	return n
}

func TestDualStackAllowedIPs(t *testing.T) {
	n := dualNode("a", 1, nil, nil, []string{"198.51.100.1"}, 3)
	if got, want := AllowedIPs(&n, dualCluster), prefixes("10.42.3.0/24", "fd00:42:0:3::/64"); !reflect.DeepEqual(got, want) {
		t.Errorf("AllowedIPs = %v, want %v", got, want)
	}
	// Only the IPv4 cluster: the IPv6 prefix is not the node's to claim.
	if got, want := AllowedIPs(&n, cluster), prefixes("10.42.3.0/24"); !reflect.DeepEqual(got, want) {
		t.Errorf("AllowedIPs with an IPv4-only cluster = %v, want %v", got, want)
	}
	greedy := n
	greedy.PodCIDRs = prefixes("fd00:42::/56", "::/0", "fd00:42:0:9::/80", "fd00:43::/64", "fd00:42:0:9::1/64", "fd00:42:0:9::/64")
	if got, want := AllowedIPs(&greedy, dualCluster), prefixes("fd00:42:0:9::/64"); !reflect.DeepEqual(got, want) {
		t.Errorf("greedy IPv6 AllowedIPs = %v, want %v", got, want)
	}

	b := dualNode("b", 2, nil, nil, []string{"203.0.113.2", "2001:db8::2"}, 4)
	peers := Compute("a", []api.Node{n, b}, Policy{ClusterCIDRs: dualCluster})
	if len(peers) != 1 {
		t.Fatalf("peers = %+v", peers)
	}
	if want := prefixes("10.42.4.0/24", "fd00:42:0:4::/64"); !reflect.DeepEqual(peers[0].AllowedIPs, want) {
		t.Errorf("b's allowed IPs = %v, want both families %v", peers[0].AllowedIPs, want)
	}
}

func TestDualStackRelayCarriesBothFamilies(t *testing.T) {
	srv := dualNode("srv", 1, []string{"10.1.0.10"}, []string{"10.1.0.0/24"}, []string{"198.51.100.10", "2001:db8:1::10"}, 0)
	srv.Roles, srv.Ready = []string{api.RoleServer}, true
	v4 := dualNode("v4", 2, []string{"10.2.0.20"}, []string{"10.2.0.0/24"}, []string{"203.0.113.20"}, 1)
	v6 := dualNode("v6", 3, []string{"10.3.0.30"}, []string{"10.3.0.0/24"}, []string{"2001:db8:3::30"}, 2)
	v6.ObservedIP = netip.MustParseAddr("2001:db8:3::30")
	v6.Observations = []api.Observation{{Peer: "v4", Handshake: api.HandshakeFailing}}
	v := NewView([]api.Node{srv, v4, v6}, Policy{ClusterCIDRs: dualCluster})
	if p := v.Path("v4", "v6"); p.Kind != api.PathRelayed || p.Via != "srv" {
		t.Fatalf("v4→v6 = %+v, want relayed via srv", p)
	}
	rp, _ := peerByName(v.Peers("v4"), "srv")
	if want := prefixes("10.42.0.0/24", "10.42.2.0/24", "fd00:42::/64", "fd00:42:0:2::/64"); !reflect.DeepEqual(rp.AllowedIPs, want) {
		t.Errorf("v4's entry for the relay allows %v, want %v", rp.AllowedIPs, want)
	}
	if ep := v.Endpoint(&srv, &v6); ep.String() != "[2001:db8:3::30]:51820" {
		t.Errorf("srv's endpoint for the IPv6-underlay node = %v", ep)
	}
	if ep := v.Endpoint(&srv, &v4); ep.String() != "203.0.113.20:51820" {
		t.Errorf("srv's endpoint for the IPv4-only node = %v", ep)
	}
}

func TestDualStackEndpoints(t *testing.T) {
	ap := netip.MustParseAddrPort
	ok := func(peer, ep string) api.Observation {
		return api.Observation{Peer: peer, Endpoint: ap(ep), Handshake: api.HandshakeOK}
	}
	failing := func(peer, ep string) api.Observation {
		o := api.Observation{Peer: peer, Handshake: api.HandshakeFailing}
		if ep != "" {
			o.Endpoint = ap(ep)
		}
		return o
	}
	// Two dual-stack clouds; the IPv6 address is listed first on
	// purpose: the order of flags does not choose the family.
	dualA := func() api.Node {
		return dualNode("a", 1, []string{"10.1.0.10", "fd01::10"}, []string{"10.1.0.0/24", "fd01::/64"}, []string{"2001:db8:1::10", "198.51.100.10"}, 0)
	}
	dualB := func() api.Node {
		return dualNode("b", 2, []string{"10.2.0.20"}, []string{"10.2.0.0/24"}, []string{"2001:db8:2::20", "203.0.113.20"}, 1)
	}
	v4Only := func() api.Node {
		return dualNode("b", 2, []string{"10.2.0.20"}, []string{"10.2.0.0/24"}, []string{"203.0.113.20"}, 1)
	}
	// A cloud whose public link carries only IPv6; its LAN is IPv4.
	v6Underlay := func() api.Node {
		n := dualNode("b", 2, []string{"10.2.0.20"}, []string{"10.2.0.0/24"}, []string{"2001:db8:2::20"}, 1)
		n.ObservedIP = netip.MustParseAddr("2001:db8:2::20")
		return n
	}
	// An IPv6-only node with auto-detected addresses: its node IP is the
	// global address on its interface, no --node-external-ip.
	v6Auto := func() api.Node {
		n := dualNode("b", 2, []string{"2001:db8:2::20"}, []string{"2001:db8:2::/64"}, nil, 1)
		n.ObservedIP = netip.MustParseAddr("2001:db8:2::20")
		return n
	}
	v6UnderlayA := func() api.Node {
		n := dualNode("a", 1, []string{"10.1.0.10"}, []string{"10.1.0.0/24"}, []string{"2001:db8:1::10"}, 0)
		n.ObservedIP = netip.MustParseAddr("2001:db8:1::10")
		return n
	}
	v4OnlyA := func() api.Node {
		return dualNode("a", 1, []string{"10.1.0.10"}, []string{"10.1.0.0/24"}, []string{"198.51.100.10"}, 0)
	}
	// A home behind an IPv4 NAT with a global IPv6 address on its
	// interface.
	dualHome := func() api.Node {
		n := dualNode("b", 2, []string{"192.168.1.10", "2001:db8:5::10"}, []string{"192.168.1.0/24", "2001:db8:5::/64"}, nil, 1)
		n.ObservedIP = netip.MustParseAddr("198.18.0.50")
		return n
	}

	tests := []struct {
		name   string
		a, b   func() api.Node
		obsA   []api.Observation // a's observations
		obsB   []api.Observation // b's observations
		force  bool
		want   string // a's endpoint for b
		wantBA string // b's endpoint for a; "" skips
	}{
		{name: "dual-stack pair prefers IPv4", a: dualA, b: dualB, want: "203.0.113.20:51820", wantBA: "198.51.100.10:51820"},
		{name: "dual-stack pair prefers IPv4 with force", a: dualA, b: dualB, force: true, want: "203.0.113.20:51820", wantBA: "198.51.100.10:51820"},
		{name: "working IPv4 session stays", a: dualA, b: dualB, obsA: []api.Observation{ok("b", "203.0.113.20:51820")}, want: "203.0.113.20:51820", wantBA: "198.51.100.10:51820"},
		{name: "IPv4 handshake fails: IPv6", a: dualA, b: dualB, obsA: []api.Observation{failing("b", "203.0.113.20:51820")}, want: "[2001:db8:2::20]:51820", wantBA: "[2001:db8:1::10]:51820"},
		{name: "peer reports failing: IPv6 both ways", a: dualA, b: dualB, obsB: []api.Observation{failing("a", "")}, want: "[2001:db8:2::20]:51820", wantBA: "[2001:db8:1::10]:51820"},
		{name: "working IPv6 session stays on IPv6", a: dualA, b: dualB, obsB: []api.Observation{ok("a", "[2001:db8:1::10]:51820")}, want: "[2001:db8:2::20]:51820", wantBA: "[2001:db8:1::10]:51820"},
		{name: "IPv6 failing too: no flapping back", a: dualA, b: dualB, obsA: []api.Observation{failing("b", "[2001:db8:2::20]:51820")}, want: "[2001:db8:2::20]:51820"},
		{name: "a handshake beats a failure report", a: dualA, b: dualB, obsA: []api.Observation{failing("b", "203.0.113.20:51820")}, obsB: []api.Observation{ok("a", "198.51.100.10:51820")}, want: "203.0.113.20:51820"},
		{name: "IPv4-only peer: IPv4 even when failing", a: dualA, b: v4Only, obsA: []api.Observation{failing("b", "203.0.113.20:51820")}, want: "203.0.113.20:51820", wantBA: "198.51.100.10:51820"},
		// b shows no public IPv4 address: it uses a's IPv6 rather than
		// wait for a failed handshake to IPv4.
		{name: "IPv6-underlay peer: its IPv6, not its IPv4 LAN address", a: dualA, b: v6Underlay, want: "[2001:db8:2::20]:51820", wantBA: "[2001:db8:1::10]:51820"},
		{name: "IPv6-underlay peer after a handshake over IPv4", a: dualA, b: v6Underlay, obsB: []api.Observation{ok("a", "198.51.100.10:51820")}, want: "[2001:db8:2::20]:51820", wantBA: "198.51.100.10:51820"},
		// The same node seen by the server over IPv4 (a NAT to the IPv4
		// internet): IPv4 first again.
		{name: "IPv4 LAN with a way out", a: dualA, b: func() api.Node {
			n := v6Underlay()
			n.ObservedIP = netip.MustParseAddr("198.18.0.7")
			return n
		}, want: "[2001:db8:2::20]:51820", wantBA: "198.51.100.10:51820"},
		{name: "IPv6-underlay peer after a handshake", a: dualA, b: v6Underlay, obsA: []api.Observation{ok("b", "[2001:db8:2::20]:51820")}, want: "[2001:db8:2::20]:51820", wantBA: "[2001:db8:1::10]:51820"},
		{name: "IPv6-underlay peer after b's IPv4 failed", a: dualA, b: v6Underlay, obsB: []api.Observation{failing("a", "198.51.100.10:51820")}, want: "[2001:db8:2::20]:51820", wantBA: "[2001:db8:1::10]:51820"},
		{name: "IPv6-only underlay both sides", a: v6UnderlayA, b: v6Underlay, want: "[2001:db8:2::20]:51820", wantBA: "[2001:db8:1::10]:51820"},
		{name: "IPv6-only underlay with force", a: v6UnderlayA, b: v6Underlay, force: true, want: "[2001:db8:2::20]:51820", wantBA: "[2001:db8:1::10]:51820"},
		{name: "auto-detected IPv6 node IP", a: v6UnderlayA, b: v6Auto, want: "[2001:db8:2::20]:51820", wantBA: "[2001:db8:1::10]:51820"},
		{name: "IPv4-only to IPv6-only: nothing", a: v4OnlyA, b: v6Underlay, want: "invalid AddrPort"},
		{name: "IPv4-only to auto-detected IPv6-only: nothing", a: v4OnlyA, b: v6Auto, want: "invalid AddrPort", wantBA: "invalid AddrPort"},
		{name: "dual-stack home behind IPv4 NAT: its global IPv6", a: dualA, b: dualHome, want: "[2001:db8:5::10]:51820"},
		{name: "dual-stack home: observed IPv4 mapping preferred", a: dualA, b: dualHome, obsA: []api.Observation{ok("b", "198.18.0.50:40000")}, want: "198.18.0.50:40000"},
		{name: "IPv4-only to dual-stack home: only the mapping", a: v4OnlyA, b: dualHome, want: "invalid AddrPort"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, b := tt.a(), tt.b()
			a.Observations, b.Observations = tt.obsA, tt.obsB
			v := NewView([]api.Node{a, b}, Policy{ClusterCIDRs: dualCluster, ForceExternal: tt.force})
			if got := v.Endpoint(&a, &b); got.String() != tt.want {
				t.Errorf("a's endpoint for b = %v, want %s", got, tt.want)
			}
			if tt.wantBA != "" {
				if got := v.Endpoint(&b, &a); got.String() != tt.wantBA {
					t.Errorf("b's endpoint for a = %v, want %s", got, tt.wantBA)
				}
			}
			// The peer entry carries the same endpoint and both
			// families' pod prefixes.
			if p, ok := peerByName(v.Peers("a"), "b"); !ok {
				t.Errorf("a has no peer b")
			} else if p.Endpoint.String() != tt.want || len(p.AllowedIPs) != 0 && len(p.AllowedIPs) != 2 {
				t.Errorf("a's peer b = %+v", p)
			}
		})
	}
}

func TestSameNetworkDualStack(t *testing.T) {
	a := dualNode("a", 1, []string{"fd01::10", "10.1.0.10"}, []string{"fd01::/64", "10.1.0.0/24"}, []string{"198.51.100.10"}, 0)
	b := dualNode("b", 2, []string{"fd01::11", "10.1.0.11"}, []string{"fd01::/64", "10.1.0.0/24"}, []string{"198.51.100.11"}, 1)
	v := NewView([]api.Node{a, b}, Policy{ClusterCIDRs: dualCluster})
	if ep := v.Endpoint(&a, &b); ep.String() != "10.1.0.11:51820" {
		t.Errorf("same LAN, both families: %v, want the IPv4 LAN address", ep)
	}
	// An IPv6-only LAN.
	a.InternalIPs, a.Networks = addrs("fd01::10"), prefixes("fd01::/64")
	b.InternalIPs, b.Networks, b.ExternalIPs = addrs("fd01::11"), prefixes("fd01::/64"), nil
	v = NewView([]api.Node{a, b}, Policy{ClusterCIDRs: dualCluster})
	if ep := v.Endpoint(&a, &b); ep.String() != "[fd01::11]:51820" {
		t.Errorf("same IPv6 LAN: %v, want the ULA LAN address", ep)
	}
}
