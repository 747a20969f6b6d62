package agent

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/mesh"
)

func TestMakePlan(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	ep := func(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }
	self := api.Node{PodCIDRs: pfxs("10.42.3.0/24", "fd00:42:0:3::/64")}
	cidrs := pfxs("10.42.0.0/16", "fd00:42::/56")
	peer := mesh.Peer{PublicKey: peerA, Endpoint: ep("198.51.100.1:51820"), AllowedIPs: pfxs("10.42.1.0/24")}
	base := planInput{carrier: carrierWireGuard, self: self, clusterCIDRs: cidrs, peers: []mesh.Peer{peer}, now: now, mtu: 1420, bridge: "cni0", cniDir: "/etc/cni/net.d", ipamDir: "/var/lib/trellis/agent/cni-ipam"}

	t.Run("WireGuard", func(t *testing.T) {
		p := makePlan(base)
		if !slices.Equal(p.tunnelAddrs, pfxs("10.42.3.0/32", "fd00:42:0:3::/128")) {
			t.Errorf("tunnel addresses %v", p.tunnelAddrs)
		}
		if !slices.Equal(p.routes, cidrs) || p.vpnRoutes != nil || p.advertise != nil {
			t.Errorf("routes %v, VPN routes %v, advertise %v", p.routes, p.vpnRoutes, p.advertise)
		}
		if !slices.Equal(p.gateways, pfxs("10.42.3.1/24", "fd00:42:0:3::1/64")) || p.mtu != 1420 || p.bridge != "cni0" {
			t.Errorf("bridge %s %v mtu %d", p.bridge, p.gateways, p.mtu)
		}
		if !p.forwardV4 || !p.forwardV6 {
			t.Error("forwarding of both families should be on")
		}
		if p.cni == nil || !slices.Equal(p.cni.PodCIDRs, self.PodCIDRs) || p.cni.MTU != 1420 || p.cni.IPAMDataDir != base.ipamDir {
			t.Errorf("CNI config %+v", p.cni)
		}
		if len(p.peers) != 1 || p.peers[0].Endpoint != peer.Endpoint {
			t.Errorf("peers %+v", p.peers)
		}
	})
	t.Run("VPN", func(t *testing.T) {
		in := base
		in.carrier = carrierVPN
		p := makePlan(in)
		if p.peers != nil || p.tunnelAddrs != nil || p.routes != nil {
			t.Errorf("WireGuard parts with a VPN: %+v", p)
		}
		if !slices.Equal(p.vpnRoutes, cidrs) || !slices.Equal(p.advertise, self.PodCIDRs) || p.cni == nil {
			t.Errorf("VPN routes %v, advertise %v, CNI %v", p.vpnRoutes, p.advertise, p.cni)
		}
	})
	t.Run("none", func(t *testing.T) {
		in := base
		in.carrier = carrierNone
		if p := makePlan(in); p.cni != nil || p.peers != nil || p.gateways != nil || p.forwardV4 {
			t.Errorf("--flannel-backend=none sets something up: %+v", p)
		}
	})
	t.Run("no pod CIDR yet", func(t *testing.T) {
		in := base
		in.self = api.Node{}
		if p := makePlan(in); p.cni != nil || p.peers != nil || p.tunnelAddrs != nil || p.routes != nil || p.gateways != nil {
			t.Errorf("a node without a pod CIDR has a data plane: %+v", p)
		}
	})
	// Endpoints (chooseEndpoint has its own table): a working session at
	// another endpoint is kept until the netmap moves the peer.
	roamed := ep("198.51.100.1:40000")
	working := mesh.PeerStatus{PublicKey: peerA, Endpoint: roamed, LastHandshake: now.Add(-time.Second)}
	for _, tc := range []struct {
		name    string
		status  map[api.Key]mesh.PeerStatus
		applied map[api.Key]netip.AddrPort
		want    netip.AddrPort
	}{
		{"new peer: the netmap's", nil, nil, peer.Endpoint},
		{"working at another port: kept", map[api.Key]mesh.PeerStatus{peerA: working}, map[api.Key]netip.AddrPort{peerA: peer.Endpoint}, roamed},
		{"moved to another address: the netmap's", map[api.Key]mesh.PeerStatus{peerA: working}, map[api.Key]netip.AddrPort{peerA: ep("203.0.113.9:51820")}, peer.Endpoint},
		{"stale session: the netmap's", map[api.Key]mesh.PeerStatus{peerA: {PublicKey: peerA, Endpoint: roamed, LastHandshake: now.Add(-time.Hour)}}, map[api.Key]netip.AddrPort{peerA: peer.Endpoint}, peer.Endpoint},
	} {
		in := base
		in.status, in.applied = tc.status, tc.applied
		if got := makePlan(in).peers[0].Endpoint; got != tc.want {
			t.Errorf("%s: endpoint %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestCheckNetmap(t *testing.T) {
	good := api.NetMap{ClusterCIDRs: pfxs("10.42.0.0/16", "fd00:42::/56"), Self: api.Node{PodCIDRs: pfxs("10.42.3.0/24")}}
	if err := checkNetmap(good, nil); err != nil {
		t.Fatalf("good netmap refused: %v", err)
	}
	if err := checkNetmap(good, good.ClusterCIDRs); err != nil {
		t.Fatalf("good netmap refused when pinned: %v", err)
	}
	for _, tc := range []struct {
		name   string
		cidrs  []netip.Prefix
		self   []netip.Prefix
		pinned []netip.Prefix
	}{
		{"no cluster CIDR", nil, nil, nil},
		{"default route", pfxs("0.0.0.0/0"), nil, nil},
		{"too wide IPv6", pfxs("::/8"), nil, nil},
		{"not masked", pfxs("10.42.0.1/16"), nil, nil},
		{"two IPv4", pfxs("10.42.0.0/16", "10.43.0.0/16"), nil, nil},
		{"changed", pfxs("10.43.0.0/16"), nil, pfxs("10.42.0.0/16")},
		{"own CIDR outside", pfxs("10.42.0.0/16"), pfxs("10.50.0.0/24"), nil},
		{"own CIDR is the cluster", pfxs("10.42.0.0/16"), pfxs("10.42.0.0/16"), nil},
	} {
		nm := api.NetMap{ClusterCIDRs: tc.cidrs, Self: api.Node{PodCIDRs: tc.self}}
		if err := checkNetmap(nm, tc.pinned); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
}
