package server

import (
	"net/netip"
	"testing"

	"github.com/trellis-mesh/trellis/internal/api"
)

func TestApprovedByPeers(t *testing.T) {
	routes := []netip.Prefix{netip.MustParsePrefix("10.42.1.0/24")}
	nodes := []api.Node{
		{Name: "a", VPN: &api.VPNStatus{Provider: "tailscale", Routes: routes, RoutesApproved: true, Serving: []string{"b", "d"}}},
		{Name: "b", VPN: &api.VPNStatus{Provider: "tailscale", Routes: routes, Warning: "not approved"}},                         // served by a
		{Name: "c", VPN: &api.VPNStatus{Provider: "tailscale", Routes: routes, Warning: "not approved", Serving: []string{"c"}}}, // only itself
		{Name: "d", VPN: &api.VPNStatus{Provider: "tailscale", Routes: routes, PolicyDenies: true, Warning: "policy denies"}},    // served, policy warning stays
		{Name: "e"}, // no VPN
		{Name: "f", VPN: &api.VPNStatus{Provider: "tailscale", Warning: "not approved"}}, // no routes yet
	}
	before := *nodes[1].VPN
	approvedByPeers(nodes)
	if v := nodes[1].VPN; !v.RoutesApproved || v.Warning != "" {
		t.Errorf("b: %+v, want approved without warning", v)
	}
	if before.RoutesApproved {
		t.Error("approvedByPeers changed the caller's VPNStatus in place")
	}
	if v := nodes[2].VPN; v.RoutesApproved || v.Warning == "" {
		t.Errorf("c (listed only by itself): %+v, want unchanged", v)
	}
	if v := nodes[3].VPN; !v.RoutesApproved || v.Warning != "policy denies" {
		t.Errorf("d: %+v, want approved with its policy warning", v)
	}
	if nodes[4].VPN != nil || nodes[5].VPN.RoutesApproved {
		t.Errorf("e, f: %+v %+v", nodes[4].VPN, nodes[5].VPN)
	}
}

func TestValidateVPNStatusServing(t *testing.T) {
	if err := validateVPNStatus(&api.VPNStatus{Provider: "tailscale", Serving: []string{"a", "b"}}); err != nil {
		t.Error(err)
	}
	if err := validateVPNStatus(&api.VPNStatus{Provider: "tailscale", Serving: []string{""}}); err == nil {
		t.Error("an empty name passed")
	}
}
