package server

import (
	"net/netip"
	"testing"

	"github.com/trellis-mesh/trellis/internal/api"
)

func TestApprovedByPeers(t *testing.T) {
	p := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	nodes := []api.Node{
		{Name: "a", VPN: &api.VPNStatus{Provider: "tailscale", Routes: p("10.42.0.0/24"), RoutesApproved: true,
			ServedRoutes: p("10.42.1.0/24", "fd00:42:0:1::/64", "10.42.2.0/24", "10.42.3.0/24", "fd00:42:0:4::/64")}},
		{Name: "b", VPN: &api.VPNStatus{Provider: "tailscale", Routes: p("10.42.1.0/24", "fd00:42:0:1::/64"), Warning: "not approved"}},              // both served by a
		{Name: "c", VPN: &api.VPNStatus{Provider: "tailscale", Routes: p("10.42.2.0/24", "fd00:42:0:2::/64"), Warning: "not approved"}},              // IPv6 served by none
		{Name: "d", VPN: &api.VPNStatus{Provider: "tailscale", Routes: p("10.42.3.0/24"), PolicyDenies: true, Warning: "policy denies"}},             // served; policy warning stays
		{Name: "e", VPN: &api.VPNStatus{Provider: "tailscale", Routes: p("10.42.5.0/24"), Warning: "not approved", ServedRoutes: p("10.42.5.0/24")}}, // only by itself
		{Name: "f"}, // no VPN
		{Name: "g", VPN: &api.VPNStatus{Provider: "tailscale", Warning: "not approved"}}, // no routes yet
	}
	before := nodes[1].VPN
	approvedByPeers(nodes)
	if v := nodes[1].VPN; !v.RoutesApproved || v.Warning != "" {
		t.Errorf("b: %+v, want approved without warning", v)
	}
	if before.RoutesApproved || before.Warning == "" {
		t.Error("approvedByPeers wrote to the caller's VPNStatus")
	}
	if v := nodes[2].VPN; v.RoutesApproved || v.Warning == "" {
		t.Errorf("c (IPv6 route served by nobody): %+v, want unchanged", v)
	}
	if v := nodes[3].VPN; !v.RoutesApproved || v.Warning != "policy denies" {
		t.Errorf("d: %+v, want approved with its policy warning", v)
	}
	if v := nodes[4].VPN; v.RoutesApproved {
		t.Errorf("e (served only in its own view): %+v, want unchanged", v)
	}
	if nodes[5].VPN != nil || nodes[6].VPN.RoutesApproved {
		t.Errorf("f, g: %+v %+v", nodes[5].VPN, nodes[6].VPN)
	}
}

func TestValidateVPNStatusServedRoutes(t *testing.T) {
	if err := validateVPNStatus(&api.VPNStatus{Provider: "tailscale", ServedRoutes: []netip.Prefix{netip.MustParsePrefix("10.42.1.0/24")}}); err != nil {
		t.Error(err)
	}
	if err := validateVPNStatus(&api.VPNStatus{Provider: "tailscale", ServedRoutes: []netip.Prefix{{}}}); err == nil {
		t.Error("an invalid prefix passed")
	}
	if err := validateVPNStatus(&api.VPNStatus{Provider: "tailscale", ServedRoutes: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}}); err == nil {
		t.Error("a default route passed")
	}
}
