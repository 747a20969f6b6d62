package agent

import (
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/cni"
	"github.com/trellis-mesh/trellis/internal/ipam"
	"github.com/trellis-mesh/trellis/internal/mesh"
	"github.com/trellis-mesh/trellis/internal/netmap"
)

// Carriers: what carries the node's pod traffic.
const (
	carrierNone      = iota // --flannel-backend=none: Trellis sets nothing up
	carrierWireGuard        // the WireGuard mesh
	carrierVPN              // a VPN (--vpn-auth)
)

// planInput is everything the node's desired data plane depends on.
type planInput struct {
	carrier int
	// self and clusterCIDRs are from the last netmap.
	self         api.Node
	clusterCIDRs []netip.Prefix
	// peers are the netmap's peers after sanitizePeers, with the
	// endpoints the netmap gives.
	peers []mesh.Peer
	// status is the device's peers now (by key); applied are the
	// netmap endpoints of the last peers applied, remembered the
	// endpoints that last worked (endpoints.go).
	status     map[api.Key]mesh.PeerStatus
	applied    map[api.Key]netip.AddrPort
	remembered endpointMemory
	now        time.Time
	// mtu is the MTU of the carrier's interface (WireGuard or VPN).
	mtu int
	// bridge, cniDir and ipamDir place the pod network.
	bridge, cniDir, ipamDir string
}

// plan is the node's whole desired data plane.
type plan struct {
	// peers are the WireGuard peers with the endpoints to use.
	peers []mesh.Peer
	// tunnelAddrs are the WireGuard interface's addresses, routes the
	// cluster CIDRs routed through it.
	tunnelAddrs []netip.Prefix
	routes      []netip.Prefix
	// vpnRoutes are routed to the VPN interface; advertise are the
	// routes the node advertises through the VPN (its pod CIDRs).
	vpnRoutes []netip.Prefix
	advertise []netip.Prefix
	// bridge, gateways and mtu describe the pod bridge; no gateways
	// means the bridge is not needed (yet).
	bridge   string
	gateways []netip.Prefix
	mtu      int
	// cni is the CNI conflist; nil means none may exist: the node has no
	// pod CIDR yet (Kubernetes has not given it one), and the kubelet
	// must report the network not ready.
	cni *cni.Config
	// forwardV4 and forwardV6 turn on forwarding.
	forwardV4, forwardV6 bool
}

// makePlan computes the desired data plane. It is pure: the loop applies
// the difference between it and the host.
//
// A node without a pod CIDR (in a Kubernetes cluster, until its Node has
// one) has no data plane at all: no peers (no other node has it as a
// peer either), addresses, routes, bridge or CNI config.
func makePlan(in planInput) plan {
	var p plan
	if in.carrier == carrierNone || len(in.self.PodCIDRs) == 0 {
		return p
	}
	p.bridge, p.mtu = in.bridge, in.mtu
	p.gateways = cni.Gateways(in.self.PodCIDRs)
	for _, pc := range in.self.PodCIDRs {
		p.forwardV4 = p.forwardV4 || pc.Addr().Is4()
		p.forwardV6 = p.forwardV6 || pc.Addr().Is6()
	}
	p.cni = &cni.Config{
		Dir:         in.cniDir,
		Bridge:      in.bridge,
		PodCIDRs:    slices.Clone(in.self.PodCIDRs),
		MTU:         in.mtu,
		IPAMDataDir: in.ipamDir,
	}
	switch in.carrier {
	case carrierWireGuard:
		for _, pc := range in.self.PodCIDRs {
			p.tunnelAddrs = append(p.tunnelAddrs, ipam.TunnelAddr(pc))
		}
		p.routes = slices.Clone(in.clusterCIDRs)
		p.peers = make([]mesh.Peer, len(in.peers))
		for i, peer := range in.peers {
			var cur *mesh.PeerStatus
			if st, ok := in.status[peer.PublicKey]; ok {
				cur = &st
			}
			desired := peer.Endpoint
			peer.Endpoint = chooseEndpoint(desired, in.applied[peer.PublicKey], cur, in.remembered[peer.PublicKey], in.now)
			p.peers[i] = peer
		}
	case carrierVPN:
		p.vpnRoutes = slices.Clone(in.clusterCIDRs)
		p.advertise = slices.Clone(in.self.PodCIDRs)
	}
	return p
}

// checkNetmap refuses a netmap the loop must not follow: cluster CIDRs that
// are missing, invalid, more than one per family, or so wide that they
// would route more than pods (a default route), or that differ from the
// ones the node follows (pinned; none before the first netmap): they are
// fixed when a cluster is created.
func checkNetmap(nm api.NetMap, pinned []netip.Prefix) error {
	if len(nm.ClusterCIDRs) == 0 {
		return fmt.Errorf("netmap version %d has no cluster CIDR", nm.Version)
	}
	v4, v6 := 0, 0
	for _, c := range nm.ClusterCIDRs {
		switch {
		case !c.IsValid() || c != c.Masked():
			return fmt.Errorf("netmap version %d: cluster CIDR %s is not a network prefix", nm.Version, c)
		case c.Addr().Is4() && c.Bits() < 8, c.Addr().Is6() && c.Bits() < 16:
			return fmt.Errorf("netmap version %d: cluster CIDR %s is wider than any pod network (it would route other traffic into the mesh)", nm.Version, c)
		case c.Addr().Is4():
			v4++
		default:
			v6++
		}
	}
	if v4 > 1 || v6 > 1 {
		return fmt.Errorf("netmap version %d: more than one cluster CIDR of a family (%v)", nm.Version, nm.ClusterCIDRs)
	}
	if pinned != nil && !slices.Equal(pinned, nm.ClusterCIDRs) {
		return fmt.Errorf("netmap version %d: the cluster CIDRs changed from %v to %v, which a cluster cannot do; restart the agent if the cluster was rebuilt", nm.Version, pinned, nm.ClusterCIDRs)
	}
	for _, p := range nm.Self.PodCIDRs {
		if !slices.ContainsFunc(nm.ClusterCIDRs, func(c netip.Prefix) bool { return c.Contains(p.Addr()) && p.Bits() > c.Bits() }) {
			return fmt.Errorf("netmap version %d: the node's pod CIDR %s is not inside the cluster CIDRs %v", nm.Version, p, nm.ClusterCIDRs)
		}
	}
	return nil
}

// sanitizePeers turns a netmap's peers into WireGuard peers, dropping
// what fails the checks the server applies too (an agent does not trust a
// server blindly with its routing table): no key or our own, allowed IPs
// outside the cluster CIDRs or inside our own pod CIDRs, an endpoint that
// is no valid unicast address. It returns what it dropped, for the log.
func sanitizePeers(nm api.NetMap, own api.Key) (peers []mesh.Peer, dropped []string) {
	peers = make([]mesh.Peer, 0, len(nm.Peers))
	for _, p := range nm.Peers {
		if p.PublicKey.IsZero() || p.PublicKey == own {
			dropped = append(dropped, fmt.Sprintf("peer %q: a missing key or our own", p.Name))
			continue
		}
		n := api.Node{PodCIDRs: p.AllowedIPs}
		allowed := netmap.AllowedIPs(&n, nm.ClusterCIDRs)
		for _, o := range nm.Self.PodCIDRs {
			allowed = slices.DeleteFunc(allowed, func(q netip.Prefix) bool { return q.Overlaps(o) })
		}
		if len(allowed) != len(p.AllowedIPs) {
			dropped = append(dropped, fmt.Sprintf("peer %q: allowed IPs outside the cluster's pod CIDRs or inside our own (sent %v, kept %v)", p.Name, p.AllowedIPs, allowed))
		}
		if len(allowed) == 0 && p.Via == "" {
			continue
		}
		ep := p.Endpoint
		if ep.IsValid() && !netmap.ValidEndpoint(ep.Addr()) {
			dropped = append(dropped, fmt.Sprintf("peer %q: invalid endpoint %s", p.Name, ep))
			ep = netip.AddrPort{}
		}
		peers = append(peers, mesh.Peer{
			PublicKey:           p.PublicKey,
			Endpoint:            ep,
			AllowedIPs:          allowed,
			PersistentKeepalive: time.Duration(p.PersistentKeepalive) * time.Second,
		})
	}
	return peers, dropped
}
