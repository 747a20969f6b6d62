package server

import (
	"errors"
	"net/netip"
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
	case len(v.ServedRoutes) > maxVPNServed:
		return errors.New("vpn: too many served routes")
	}
	for _, p := range v.ServedRoutes {
		if !p.IsValid() || p.Bits() == 0 {
			return errors.New("vpn: a served route is not a valid subnet")
		}
	}
	for _, p := range v.Routes {
		if !p.IsValid() || p.Bits() == 0 {
			return errors.New("vpn: a route is not a valid subnet")
		}
	}
	return nil
}

// maxVPNServed bounds VPNStatus.ServedRoutes: the pod CIDRs a node sees
// (two per node of a dual-stack cluster).
const maxVPNServed = 20000

// approvedByPeers marks the VPN routes of a node approved when another node
// routes them all to it (lists them in VPNStatus.ServedRoutes) although
// the node's own view says they are not: the control server approved them
// and did not tell the node (headscale v0.28). Its warning about
// unapproved routes then goes; a policy warning stays. nodes are changed
// in place (their VPN statuses are replaced, not written to).
func approvedByPeers(nodes []api.Node) {
	for i, n := range nodes {
		if n.VPN == nil || n.VPN.RoutesApproved || len(n.VPN.Routes) == 0 {
			continue
		}
		served := slices.ContainsFunc(nodes, func(o api.Node) bool {
			return o.Name != n.Name && o.VPN != nil &&
				!slices.ContainsFunc(n.VPN.Routes, func(r netip.Prefix) bool { return !slices.Contains(o.VPN.ServedRoutes, r) })
		})
		if !served {
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
