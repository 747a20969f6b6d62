package server

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/internal/api"
)

// TestDualStackJoin runs a server with an IPv4 and an IPv6 cluster CIDR:
// every node gets one prefix of each, a rejoin keeps them, IPv6 node
// addresses are accepted, and the netmap carries both families.
func TestDualStackJoin(t *testing.T) {
	cidrs := []netip.Prefix{netip.MustParsePrefix("10.42.0.0/16"), netip.MustParsePrefix("fd00:42::/56")}
	ts := startServer(t, t.TempDir(), func(c *Config) { c.ClusterCIDRs = slices.Clone(cidrs) })

	reqA := joinReq("a", 1, pwA)
	reqA.ExternalIPs = append(reqA.ExternalIPs, netip.MustParseAddr("2001:db8:1::10"))
	reqB := joinReq("b", 2, pwA)
	// An IPv6-only node.
	reqB.InternalIPs = []netip.Addr{netip.MustParseAddr("2001:db8:2::20")}
	reqB.Networks = []netip.Prefix{netip.MustParsePrefix("2001:db8:2::/64")}
	reqB.ExternalIPs = nil

	a := mustJoin(t, ts, reqA)
	b := mustJoin(t, ts, reqB)
	if !slices.Equal(a.resp.ClusterCIDRs, cidrs) {
		t.Errorf("join response cluster CIDRs = %v, want %v", a.resp.ClusterCIDRs, cidrs)
	}
	want := map[string]string{"a": "10.42.0.0/24,fd00:42::/64", "b": "10.42.1.0/24,fd00:42:0:1::/64"}
	for name, j := range map[string]*joined{"a": a, "b": b} {
		if got := prefixList(j.resp.Node.PodCIDRs); got != want[name] {
			t.Errorf("node %s pod CIDRs = %s, want %s", name, got, want[name])
		}
	}
	again := mustJoin(t, ts, reqA)
	if got := prefixList(again.resp.Node.PodCIDRs); got != want["a"] {
		t.Errorf("node a after a rejoin: pod CIDRs = %s, want %s", got, want["a"])
	}

	ch, code := ts.stream(t, again)
	if code != 200 {
		t.Fatalf("netmap stream: %d", code)
	}
	nm := waitFor(t, ch, "a's netmap with peer b", func(nm api.NetMap) bool { return len(nm.Peers) == 1 })
	p := nm.Peers[0]
	if got := prefixList(p.AllowedIPs); got != want["b"] {
		t.Errorf("a's peer b allows %s, want both families %s", got, want["b"])
	}
	if p.Endpoint.String() != "[2001:db8:2::20]:51820" {
		t.Errorf("a's endpoint for the IPv6-only node b = %v, want its IPv6 node IP", p.Endpoint)
	}
	if !slices.Equal(nm.ClusterCIDRs, cidrs) {
		t.Errorf("netmap cluster CIDRs = %v, want %v", nm.ClusterCIDRs, cidrs)
	}
}

func TestClusterCIDRFamilies(t *testing.T) {
	for _, tt := range []struct {
		cidrs   string
		wantErr bool
	}{
		{"10.42.0.0/16", false},
		{"fd00:42::/56", false},
		{"10.42.0.0/16,fd00:42::/56", false},
		{"fd00:42::/56,10.42.0.0/16", false},
		{"10.42.0.0/16,10.43.0.0/16", true},
		{"fd00:42::/56,fd00:43::/56", true},
	} {
		var ps []netip.Prefix
		for _, s := range strings.Split(tt.cidrs, ",") {
			ps = append(ps, netip.MustParsePrefix(s))
		}
		c := Config{NodeName: "srv", DataDir: t.TempDir(), ClusterCIDRs: ps}
		if err := c.Validate(); (err != nil) != tt.wantErr {
			t.Errorf("--cluster-cidr=%s: Validate() = %v, want error %v", tt.cidrs, err, tt.wantErr)
		}
	}
}

func prefixList(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}
