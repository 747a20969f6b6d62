package api

import "net/netip"

// Member is a node of the cluster as a node on a VPN carrier sees it: the
// VPN routes inside the cluster CIDRs must come from members, or another
// cluster (or someone else) uses the same range.
type Member struct {
	Name        string         `json:"name"`
	InternalIPs []netip.Addr   `json:"internalIPs"`
	PodCIDRs    []netip.Prefix `json:"podCIDRs"`
}

// VPNStatus is the state of a node's VPN carrier (--vpn-auth).
type VPNStatus struct {
	// Provider is the VPN, e.g. "tailscale".
	Provider string `json:"provider"`
	// Routes are the pod CIDRs the node advertises through the VPN.
	Routes []netip.Prefix `json:"routes,omitempty"`
	// RoutesApproved: the VPN's control server approved Routes, so other
	// nodes route them to this node.
	RoutesApproved bool `json:"routesApproved"`
	// PolicyDenies: the node's packet filter (the tailnet policy, e.g.
	// headscale's "acls": []) lets no traffic from the cluster reach its
	// pod CIDRs, approved or not.
	PolicyDenies bool `json:"policyDenies,omitempty"`
	// ServedRoutes are the routes inside the cluster CIDRs that this
	// node's VPN routes to other VPN nodes: the control server approved
	// them, whatever the nodes that advertise them see themselves
	// (headscale v0.28 does not always tell a node that its routes were
	// approved). The server counts a node's routes approved when another
	// node lists them all here.
	ServedRoutes []netip.Prefix `json:"servedRoutes,omitempty"`
	// Warning says what is wrong and what to do (for unapproved routes:
	// the autoApprovers stanza to add to the tailnet policy).
	Warning string `json:"warning,omitempty"`
}
