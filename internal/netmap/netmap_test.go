package netmap

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/internal/api"
)

func key(b byte) api.Key { var k api.Key; k[0] = b; return k }

func addrs(s ...string) []netip.Addr {
	var out []netip.Addr
	for _, x := range s {
		out = append(out, netip.MustParseAddr(x))
	}
	return out
}

func prefixes(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, x := range s {
		out = append(out, netip.MustParsePrefix(x))
	}
	return out
}

func node(name string, k byte, internal, network, external, pod string) api.Node {
	n := api.Node{Name: name, PublicKey: key(k), ListenPort: 51820}
	if internal != "" {
		n.InternalIPs = addrs(internal)
	}
	if network != "" {
		n.Networks = prefixes(network)
	}
	if external != "" {
		n.ExternalIPs = addrs(external)
	}
	if pod != "" {
		n.PodCIDRs = prefixes(pod)
	}
	return n
}

var cluster = prefixes("10.42.0.0/16")

func TestComputeEndpoints(t *testing.T) {
	a := node("a", 1, "10.1.0.10", "10.1.0.0/24", "198.51.100.10", "10.42.0.0/24")
	b := node("b", 2, "10.2.0.20", "10.2.0.0/24", "203.0.113.20", "10.42.1.0/24")
	c := node("c", 3, "10.1.0.30", "10.1.0.0/24", "203.0.113.30", "10.42.2.0/24") // same LAN as a
	d := node("d", 4, "192.0.2.40", "192.0.2.0/24", "", "10.42.3.0/24")           // public address on its interface
	nodes := []api.Node{d, c, b, a}

	tests := []struct {
		name  string
		self  string
		force bool
		want  map[string]string // peer -> endpoint
	}{
		{"different networks use external", "b", false, map[string]string{"a": "198.51.100.10:51820", "c": "203.0.113.30:51820", "d": "192.0.2.40:51820"}},
		{"shared LAN uses internal", "a", false, map[string]string{"b": "203.0.113.20:51820", "c": "10.1.0.30:51820", "d": "192.0.2.40:51820"}},
		{"flannel-external-ip forces external", "a", true, map[string]string{"b": "203.0.113.20:51820", "c": "203.0.113.30:51820", "d": "192.0.2.40:51820"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			peers := Compute(tt.self, nodes, Policy{ClusterCIDRs: cluster, ForceExternal: tt.force, Keepalive: 25})
			got := map[string]string{}
			var names []string
			for _, p := range peers {
				got[p.Name] = p.Endpoint.String()
				names = append(names, p.Name)
				if p.PersistentKeepalive != 25 {
					t.Errorf("peer %s keepalive %d", p.Name, p.PersistentKeepalive)
				}
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("endpoints = %v, want %v", got, tt.want)
			}
			for i := 1; i < len(names); i++ {
				if names[i-1] >= names[i] {
					t.Errorf("peers not sorted: %v", names)
				}
			}
		})
	}
}

func TestComputeSkipsAndSanitizes(t *testing.T) {
	self := node("self", 1, "10.1.0.1", "10.1.0.0/24", "198.51.100.1", "10.42.0.0/24")
	noKey := node("nokey", 0, "10.2.0.1", "", "203.0.113.1", "10.42.1.0/24")
	noPort := node("noport", 2, "10.2.0.2", "", "203.0.113.2", "10.42.2.0/24")
	noPort.ListenPort = 0
	noCIDR := node("nocidr", 3, "10.2.0.3", "", "203.0.113.3", "")
	greedy := node("greedy", 4, "10.2.0.4", "", "203.0.113.4", "10.42.4.0/24")
	greedy.PodCIDRs = append(greedy.PodCIDRs, prefixes("0.0.0.0/0", "10.42.0.0/16", "10.99.0.0/24", "10.42.5.0/25")...)
	loop := node("loop", 5, "127.0.0.1", "", "169.254.1.1", "10.42.6.0/24")
	dupKey := node("zdup", 4, "10.2.0.7", "", "203.0.113.7", "10.42.7.0/24")
	selfKey := node("selfkey", 1, "10.2.0.8", "", "203.0.113.8", "10.42.8.0/24")

	peers := Compute("self", []api.Node{self, noKey, noPort, noCIDR, greedy, loop, dupKey, selfKey}, Policy{ClusterCIDRs: cluster})
	got := map[string]api.Peer{}
	for _, p := range peers {
		got[p.Name] = p
	}
	for _, skipped := range []string{"nokey", "noport", "nocidr", "zdup", "selfkey"} {
		if _, ok := got[skipped]; ok {
			t.Errorf("peer %s should be skipped", skipped)
		}
	}
	if g := got["greedy"].AllowedIPs; !reflect.DeepEqual(g, prefixes("10.42.4.0/24")) {
		t.Errorf("greedy allowed IPs = %v, want only its own node prefix", g)
	}
	if e := got["loop"].Endpoint; e.IsValid() {
		t.Errorf("loopback/link-local endpoint accepted: %v", e)
	}
	if _, ok := got["loop"]; !ok {
		t.Errorf("peer without endpoint must still be listed (it may reach us first)")
	}
	if Compute("unknown", []api.Node{self}, Policy{ClusterCIDRs: cluster}) != nil {
		t.Errorf("unknown self must give no peers")
	}
}

func TestEndpointFamilies(t *testing.T) {
	v4only := node("v4", 1, "10.1.0.1", "10.1.0.0/24", "198.51.100.1", "10.42.0.0/24")
	dual := node("dual", 2, "10.2.0.1", "10.2.0.0/24", "", "10.42.1.0/24")
	dual.ExternalIPs = addrs("2001:db8::2", "203.0.113.2")
	v6only := node("v6", 3, "", "", "2001:db8::3", "10.42.2.0/24")
	p := Policy{ClusterCIDRs: cluster}
	if e := Endpoint(&v4only, &dual, p); e.String() != "203.0.113.2:51820" {
		t.Errorf("v4 node to dual node = %v, want the IPv4 address", e)
	}
	if e := Endpoint(&dual, &v6only, p); e.String() != "[2001:db8::3]:51820" {
		t.Errorf("dual to v6 = %v", e)
	}
	if e := Endpoint(&v4only, &v6only, p); e.IsValid() {
		t.Errorf("v4-only node got an IPv6 endpoint %v", e)
	}
}

func TestValidEndpoint(t *testing.T) {
	for s, want := range map[string]bool{
		"198.51.100.1": true, "10.0.0.1": true, "2001:db8::1": true,
		"127.0.0.1": false, "::1": false, "169.254.0.1": false, "fe80::1": false,
		"0.0.0.0": false, "::": false, "224.0.0.1": false, "255.255.255.255": false,
		"::ffff:127.0.0.1": false,
	} {
		if got := ValidEndpoint(netip.MustParseAddr(s)); got != want {
			t.Errorf("ValidEndpoint(%s) = %v", s, got)
		}
	}
}

func BenchmarkCompute1000(b *testing.B) {
	nodes := make([]api.Node, 1000)
	for i := range nodes {
		n := node("", byte(i), "10.1.0.1", "10.1.0.0/24", "198.51.100.1", "")
		n.Name = string(rune('a'+i%26)) + string(rune('0'+i))
		n.PublicKey[1] = byte(i >> 8)
		n.PodCIDRs = prefixes("10.42.0.0/24")
		n.PodCIDRs[0] = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 42, byte(i >> 8), byte(i)}), 24).Masked()
		nodes[i] = n
	}
	p := Policy{ClusterCIDRs: prefixes("10.0.0.0/8")}
	for b.Loop() {
		Compute(nodes[0].Name, nodes, p)
	}
}

// natNode is a node behind NAT: a private address, seen by the server from
// the NAT's public address.
func natNode(name string, k byte, internal, network, natIP, pod string) api.Node {
	n := node(name, k, internal, network, "", pod)
	n.ObservedIP = netip.MustParseAddr(natIP)
	return n
}

func peerByName(peers []api.Peer, name string) (api.Peer, bool) {
	for _, p := range peers {
		if p.Name == name {
			return p, true
		}
	}
	return api.Peer{}, false
}

func TestRelayForNATPairs(t *testing.T) {
	srv := node("srv", 1, "198.51.100.10", "198.51.100.0/24", "", "10.42.0.0/24")
	srv.Roles = []string{api.RoleServer}
	srv.Ready = true
	ra := node("ra", 2, "10.2.0.20", "10.2.0.0/24", "203.0.113.20", "10.42.1.0/24")
	ra.Relay, ra.Ready = true, true
	h1 := natNode("h1", 3, "192.168.1.10", "192.168.1.0/24", "198.18.0.50", "10.42.2.0/24")
	h2 := natNode("h2", 4, "192.168.2.10", "192.168.2.0/24", "198.18.1.60", "10.42.3.0/24")
	nodes := []api.Node{h1, h2, ra, srv}
	p := Policy{ClusterCIDRs: cluster, Keepalive: 25}

	v := NewView(nodes, p)
	// No one knows where h1 and h2 are: relayed through the first ready
	// relay by name (ra < srv).
	path := v.Path("h1", "h2")
	if path.Kind != api.PathRelayed || path.Via != "ra" || path.Reason == "" {
		t.Fatalf("h1→h2 = %+v, want relayed via ra with a reason", path)
	}
	if back := v.Path("h2", "h1"); back.Kind != path.Kind || back.Via != path.Via {
		t.Fatalf("path not symmetric: %+v vs %+v", path, back)
	}
	peers := v.Peers("h1")
	h2p, _ := peerByName(peers, "h2")
	if len(h2p.AllowedIPs) != 0 || h2p.Via != "ra" {
		t.Fatalf("h1's entry for h2 = %+v, want a probe (no allowed IPs) via ra", h2p)
	}
	rap, _ := peerByName(peers, "ra")
	if want := prefixes("10.42.1.0/24", "10.42.3.0/24"); !reflect.DeepEqual(rap.AllowedIPs, want) {
		t.Fatalf("h1's entry for ra allows %v, want %v (its own and h2's pods)", rap.AllowedIPs, want)
	}
	// The relay itself has both directly.
	for _, name := range []string{"h1", "h2"} {
		if got := v.Path("ra", name); got.Kind != api.PathDirect {
			t.Errorf("ra→%s = %+v, want direct", name, got)
		}
	}
	// NAT to a public node: direct, at its public address on the interface.
	if got := v.Path("h1", "srv"); got.Kind != api.PathDirect || got.Endpoint.String() != "198.51.100.10:51820" {
		t.Errorf("h1→srv = %+v", got)
	}
	// A public node does not send to a NATed node's private address.
	if ep := v.Endpoint(&srv, &h1); ep.IsValid() {
		t.Errorf("srv's endpoint for h1 = %v, want none until a NAT mapping is observed", ep)
	}

	// The relay goes away: the next one takes over.
	ra.Ready = false
	v = NewView([]api.Node{h1, h2, ra, srv}, p)
	if path := v.Path("h1", "h2"); path.Via != "srv" {
		t.Fatalf("with ra down, h1→h2 = %+v, want via srv", path)
	}
	// No relay at all: no path, and it says why.
	srv.Ready = false
	v = NewView([]api.Node{h1, h2, ra, srv}, p)
	if path := v.Path("h1", "h2"); path.Kind != api.PathNone || !strings.Contains(path.Reason, "no relay") {
		t.Fatalf("with no relay, h1→h2 = %+v", path)
	}
}

func TestObservationsDriveDirectAndRelay(t *testing.T) {
	srv := node("srv", 1, "198.51.100.10", "198.51.100.0/24", "", "10.42.0.0/24")
	srv.Roles, srv.Ready = []string{api.RoleServer}, true
	h1 := natNode("h1", 3, "192.168.1.10", "192.168.1.0/24", "198.18.0.50", "10.42.2.0/24")
	h2 := natNode("h2", 4, "192.168.2.10", "192.168.2.0/24", "198.18.1.60", "10.42.3.0/24")
	// The server sees both homes' NAT mappings (a UDP reflection through
	// WireGuard).
	srv.Observations = []api.Observation{
		{Peer: "h1", Endpoint: netip.MustParseAddrPort("198.18.0.50:51820"), Handshake: api.HandshakeOK},
		{Peer: "h2", Endpoint: netip.MustParseAddrPort("198.18.1.60:40000"), Handshake: api.HandshakeOK},
	}
	p := Policy{ClusterCIDRs: cluster}
	v := NewView([]api.Node{h1, h2, srv}, p)
	if ep := v.Endpoint(&srv, &h2); ep.String() != "198.18.1.60:40000" {
		t.Fatalf("endpoint of h2 = %v, want its observed NAT mapping", ep)
	}
	// Mappings known: try direct (hole punching) first.
	if path := v.Path("h1", "h2"); path.Kind != api.PathDirect {
		t.Fatalf("h1→h2 with known mappings = %+v, want direct first", path)
	}
	// Hole punching failed: relay, and say why.
	h1.Observations = []api.Observation{{Peer: "h2", Handshake: api.HandshakeFailing}}
	v = NewView([]api.Node{h1, h2, srv}, p)
	if path := v.Path("h1", "h2"); path.Kind != api.PathRelayed || path.Via != "srv" || !strings.Contains(path.Reason, "failed") {
		t.Fatalf("h1→h2 after a failed handshake = %+v", path)
	}
	// The probe later completes a handshake: back to direct.
	h2.Observations = []api.Observation{{Peer: "h1", Handshake: api.HandshakeOK}}
	v = NewView([]api.Node{h1, h2, srv}, p)
	if path := v.Path("h1", "h2"); path.Kind != api.PathDirect {
		t.Fatalf("h1→h2 after the probe worked = %+v, want direct", path)
	}
	// Hostile observation: a loopback endpoint is never used.
	srv.Observations = []api.Observation{{Peer: "h1", Endpoint: netip.MustParseAddrPort("127.0.0.1:51820"), Handshake: api.HandshakeOK}}
	v = NewView([]api.Node{h1, h2, srv}, p)
	if ep := v.Endpoint(&srv, &h1); ep.IsValid() {
		t.Fatalf("loopback observation used as endpoint %v", ep)
	}
}

func TestSameNATUsesInternalAddresses(t *testing.T) {
	a := natNode("a", 1, "192.168.1.10", "192.168.1.0/24", "198.18.0.50", "10.42.0.0/24")
	b := natNode("b", 2, "192.168.1.11", "192.168.1.0/24", "198.18.0.50", "10.42.1.0/24")
	b.ListenPort = 51821
	for _, force := range []bool{false, true} {
		v := NewView([]api.Node{a, b}, Policy{ClusterCIDRs: cluster, ForceExternal: force})
		if ep := v.Endpoint(&a, &b); ep.String() != "192.168.1.11:51821" {
			t.Errorf("force=%v: a's endpoint for b = %v, want its LAN address and its own port", force, ep)
		}
	}
}
