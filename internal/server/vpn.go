package server

import (
	"errors"
	"slices"
	"unicode/utf8"

	"github.com/trellis-mesh/trellis/internal/api"
)

// Bounds of a node's VPN status report.
const (
	maxVPNRoutes  = 16
	maxVPNWarning = 4 << 10
)

// validateVPNStatus checks what a node says about its VPN carrier.
func validateVPNStatus(v *api.VPNStatus) error {
	if v == nil {
		return nil
	}
	switch {
	case v.Provider == "" || len(v.Provider) > 32:
		return errors.New("vpn: provider must be 1-32 characters")
	case len(v.Routes) > maxVPNRoutes:
		return errors.New("vpn: too many routes")
	case len(v.Warning) > maxVPNWarning || !utf8.ValidString(v.Warning):
		return errors.New("vpn: warning is too long or not UTF-8")
	case len(v.Serving) > maxVPNServing:
		return errors.New("vpn: too many serving members")
	}
	for _, n := range v.Serving {
		if n == "" || len(n) > 253 || !utf8.ValidString(n) {
			return errors.New("vpn: a serving member's name is empty, too long or not UTF-8")
		}
	}
	for _, p := range v.Routes {
		if !p.IsValid() || p.Bits() == 0 {
			return errors.New("vpn: a route is not a valid subnet")
		}
	}
	return nil
}

// maxVPNServing bounds VPNStatus.Serving: the members a node sees.
const maxVPNServing = 10000

// approvedByPeers marks the VPN routes of a node approved when another node
// routes them to it (lists it in VPNStatus.Serving) although the node's
// own view says they are not: the control server approved them and did
// not tell the node (headscale v0.28). Its warning about unapproved routes
// then goes; a policy warning stays. nodes are changed in place.
func approvedByPeers(nodes []api.Node) {
	served := map[string]bool{}
	for _, n := range nodes {
		if n.VPN == nil {
			continue
		}
		for _, m := range n.VPN.Serving {
			if m != n.Name {
				served[m] = true
			}
		}
	}
	for i, n := range nodes {
		if n.VPN == nil || n.VPN.RoutesApproved || !served[n.Name] || len(n.VPN.Routes) == 0 {
			continue
		}
		v := *n.VPN
		v.RoutesApproved = true
		if !v.PolicyDenies {
			v.Warning = ""
		}
		nodes[i].VPN = &v
	}
}

// members lists the cluster's nodes for a node on a VPN carrier, with
// self as it was just stored (the hub may not have seen it yet).
func (h *hub) members(self api.Node) []api.Member {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]api.Member, 0, len(h.records)+1)
	for name, r := range h.records {
		if name == self.Name {
			continue
		}
		out = append(out, api.Member{Name: name, InternalIPs: r.InternalIPs, PodCIDRs: r.PodCIDRs})
	}
	out = append(out, api.Member{Name: self.Name, InternalIPs: self.InternalIPs, PodCIDRs: self.PodCIDRs})
	slices.SortFunc(out, func(a, b api.Member) int {
		switch {
		case a.Name < b.Name:
			return -1
		case a.Name > b.Name:
			return 1
		}
		return 0
	})
	return out
}
