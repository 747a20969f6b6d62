package netmap

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/internal/api"
)

// TestNodesWithoutPodCIDR: in Kubernetes mode a node is in the records
// before its Node has a pod CIDR (and stays there without one when it is
// refused or its Node is deleted). Such a node is no one's peer, has no
// peers, is never a relay and has no paths.
func TestNodesWithoutPodCIDR(t *testing.T) {
	srv := node("srv", 1, "198.51.100.10", "198.51.100.0/24", "", "") // a relay-capable server without a CIDR
	srv.Roles, srv.Ready = []string{api.RoleServer}, true
	h1 := natNode("h1", 3, "192.168.1.10", "192.168.1.0/24", "198.18.0.50", "10.42.2.0/24")
	h2 := natNode("h2", 4, "192.168.2.10", "192.168.2.0/24", "198.18.1.60", "10.42.3.0/24")
	pub := node("pub", 5, "10.5.0.1", "10.5.0.0/24", "203.0.113.5", "10.42.5.0/24")
	waiting := node("waiting", 6, "10.6.0.1", "10.6.0.0/24", "203.0.113.6", "")
	p := Policy{ClusterCIDRs: cluster, Keepalive: 25}
	v := NewView([]api.Node{h1, h2, pub, srv, waiting}, p)

	for _, self := range []string{"h1", "h2", "pub"} {
		peers := v.Peers(self)
		for _, gone := range []string{"srv", "waiting"} {
			if _, ok := peerByName(peers, gone); ok {
				t.Errorf("%s's netmap lists %s, which has no pod CIDR", self, gone)
			}
		}
		for _, peer := range peers {
			if peer.Via == "srv" {
				t.Errorf("%s reaches %s through srv, which has no pod CIDR", self, peer.Name)
			}
		}
	}
	for _, self := range []string{"srv", "waiting"} {
		if peers := v.Peers(self); len(peers) != 0 {
			t.Errorf("%s has no pod CIDR but %d peers: %+v", self, len(peers), peers)
		}
		if _, _, ok := v.Peer(self, "pub"); ok {
			t.Errorf("Peer(%s, pub) is ok, want no entry", self)
		}
	}
	// The NAT pair has no relay: srv would be one, but it is not in the mesh.
	if path := v.Path("h1", "h2"); path.Kind != api.PathNone {
		t.Errorf("h1→h2 = %+v, want none (the only relay-capable node has no pod CIDR)", path)
	}
	for _, path := range v.Paths() {
		if path.From == "srv" || path.To == "srv" || path.From == "waiting" || path.To == "waiting" {
			t.Errorf("Paths lists %+v, a node without a pod CIDR", path)
		}
	}

	// The server's Node gets its CIDR: it relays, and every netmap has it.
	srv.PodCIDRs = prefixes("10.42.0.0/24")
	v2 := v.Next([]api.Node{h1, h2, pub, srv, waiting}, []string{"srv"})
	if path := v2.Path("h1", "h2"); path.Kind != api.PathRelayed || path.Via != "srv" {
		t.Errorf("with srv's CIDR, h1→h2 = %+v, want relayed via srv", path)
	}
	c := Diff(v, v2, []string{"srv"})
	if !c.All {
		t.Errorf("a relay-capable node getting its CIDR changes every path; Diff = %+v", c)
	}
	for _, self := range []string{"h1", "h2", "pub"} {
		if _, ok := peerByName(v2.Peers(self), "srv"); !ok {
			t.Errorf("%s's netmap lacks srv after it got its CIDR", self)
		}
	}
	// And a plain node getting its CIDR changes its entry and its own map.
	waiting.PodCIDRs = prefixes("10.42.6.0/24")
	v3 := v2.Next([]api.Node{h1, h2, pub, srv, waiting}, []string{"waiting"})
	c = Diff(v2, v3, []string{"waiting"})
	if c.All || !c.Peers["waiting"] || !c.Maps["waiting"] {
		t.Errorf("Diff for a node getting its CIDR = %+v, want its entry and its map", c)
	}
	changed, removed, full, _ := Delta(v2, v3, c, "waiting", nil)
	if !full || len(removed) != 0 || len(changed) != len(v3.Peers("waiting")) || len(changed) == 0 {
		t.Errorf("waiting's delta = %d changed, %v removed (full %v); want its whole new netmap", len(changed), removed, full)
	}
	changed, _, _, _ = Delta(v2, v3, c, "pub", nil)
	if len(changed) != 1 || changed[0].Name != "waiting" {
		t.Errorf("pub's delta = %+v, want the entry of waiting", changed)
	}
}

func TestPublicEndpoints(t *testing.T) {
	dual := node("dual", 1, "10.1.0.1", "10.1.0.0/24", "198.51.100.1", "10.42.1.0/24")
	dual.ExternalIPs = append(dual.ExternalIPs, netip.MustParseAddr("2001:db8::1"))
	onIface := node("iface", 2, "198.51.100.2", "198.51.100.0/24", "", "10.42.2.0/24")
	onIface.ObservedIP = netip.MustParseAddr("198.51.100.2")
	nat := natNode("nat", 3, "192.168.1.10", "192.168.1.0/24", "198.18.0.50", "10.42.3.0/24")
	private := node("private", 4, "10.4.0.1", "10.4.0.0/24", "", "10.42.4.0/24")
	private.ObservedIP = netip.MustParseAddr("2001:db8:4::1") // IPv6 underlay: its IPv4 LAN address says nothing
	noPort := node("noport", 5, "", "", "198.51.100.5", "10.42.5.0/24")
	noPort.ListenPort = 0
	loop := node("loop", 6, "127.0.0.1", "", "169.254.1.1", "10.42.6.0/24")
	for _, tc := range []struct {
		n     api.Node
		force bool
		want  string
	}{
		{dual, false, "198.51.100.1:51820,[2001:db8::1]:51820"},
		{dual, true, "198.51.100.1:51820,[2001:db8::1]:51820"},
		{onIface, false, "198.51.100.2:51820"},
		{nat, false, ""},
		{private, false, ""},
		{noPort, false, ""},
		{loop, false, ""},
	} {
		t.Run(fmt.Sprintf("%s/force=%v", tc.n.Name, tc.force), func(t *testing.T) {
			eps := PublicEndpoints(&tc.n, Policy{ClusterCIDRs: cluster, ForceExternal: tc.force})
			var got []string
			for _, ep := range eps {
				got = append(got, ep.String())
			}
			if s := strings.Join(got, ","); s != tc.want {
				t.Errorf("PublicEndpoints = %q, want %q", s, tc.want)
			}
			// It is what a peer on another network is given.
			stranger := node("stranger", 9, "203.0.113.99", "203.0.113.0/24", "", "10.42.9.0/24")
			if ep := Endpoint(&stranger, &tc.n, Policy{ClusterCIDRs: cluster, ForceExternal: tc.force}); ep.IsValid() && ep.Addr().Is4() && !slices.Contains(eps, ep) {
				t.Errorf("a stranger reaches %s at %v, not among %v", tc.n.Name, ep, eps)
			}
		})
	}
}
