package netmap

import (
	"net/netip"
	"reflect"
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
