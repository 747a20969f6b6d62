package agent

import (
	"encoding/json"
	"net/netip"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/mesh"
)

// testNetmap is a netmap of a node with pod CIDR 10.42.0.0/24 in cluster
// 10.42.0.0/16 and the peers given, and the node's own key.
func testNetmap(t testing.TB, peers ...api.Peer) (api.NetMap, api.Key) {
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return api.NetMap{
		ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.42.0.0/16")},
		Self:         api.Node{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.42.0.0/24")}},
		Peers:        peers,
	}, api.Key(k.PublicKey())
}

// sanitizeOne is sanitizePeers of a netmap with one peer.
func sanitizeOne(nm api.NetMap, own api.Key, p api.Peer) (mesh.Peer, bool) {
	nm.Peers = []api.Peer{p}
	peers, _ := sanitizePeers(nm, own)
	if len(peers) == 0 {
		return mesh.Peer{}, false
	}
	return peers[0], true
}

func TestSanitizeDropsHostileEntries(t *testing.T) {
	nm, own := testNetmap(t)
	pfx := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	for _, tc := range []struct {
		name     string
		peer     api.Peer
		keep     bool
		allowed  []netip.Prefix
		endpoint string
	}{
		{"normal", api.Peer{Name: "b", PublicKey: api.Key{1}, Endpoint: netip.MustParseAddrPort("203.0.113.1:51820"), AllowedIPs: pfx("10.42.1.0/24")}, true, pfx("10.42.1.0/24"), "203.0.113.1:51820"},
		{"our own key", api.Peer{Name: "x", PublicKey: own, AllowedIPs: pfx("10.42.1.0/24")}, false, nil, ""},
		{"no key", api.Peer{Name: "x", AllowedIPs: pfx("10.42.1.0/24")}, false, nil, ""},
		{"default route", api.Peer{Name: "x", PublicKey: api.Key{2}, AllowedIPs: pfx("0.0.0.0/0")}, false, nil, ""},
		{"cluster CIDR", api.Peer{Name: "x", PublicKey: api.Key{2}, AllowedIPs: pfx("10.42.0.0/16")}, false, nil, ""},
		{"our own pod CIDR", api.Peer{Name: "x", PublicKey: api.Key{2}, AllowedIPs: pfx("10.42.0.0/24", "10.42.5.0/24")}, true, pfx("10.42.5.0/24"), ""},
		{"outside the cluster", api.Peer{Name: "x", PublicKey: api.Key{2}, AllowedIPs: pfx("192.168.0.0/24")}, false, nil, ""},
		{"loopback endpoint", api.Peer{Name: "x", PublicKey: api.Key{2}, Endpoint: netip.MustParseAddrPort("127.0.0.1:51820"), AllowedIPs: pfx("10.42.6.0/24")}, true, pfx("10.42.6.0/24"), "invalid AddrPort"},
		{"link-local endpoint", api.Peer{Name: "x", PublicKey: api.Key{2}, Endpoint: netip.MustParseAddrPort("[fe80::1]:51820"), AllowedIPs: pfx("10.42.6.0/24")}, true, pfx("10.42.6.0/24"), "invalid AddrPort"},
		{"relayed probe", api.Peer{Name: "x", PublicKey: api.Key{3}, Via: "r"}, true, nil, "invalid AddrPort"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mp, ok := sanitizeOne(nm, own, tc.peer)
			if ok != tc.keep {
				t.Fatalf("kept = %v, want %v", ok, tc.keep)
			}
			if !ok {
				return
			}
			if len(mp.AllowedIPs) != len(tc.allowed) {
				t.Fatalf("allowed = %v, want %v", mp.AllowedIPs, tc.allowed)
			}
			for i := range tc.allowed {
				if mp.AllowedIPs[i] != tc.allowed[i] {
					t.Fatalf("allowed = %v, want %v", mp.AllowedIPs, tc.allowed)
				}
			}
			if tc.endpoint != "" && mp.Endpoint.String() != tc.endpoint {
				t.Fatalf("endpoint = %v, want %s", mp.Endpoint, tc.endpoint)
			}
		})
	}
}

// FuzzNetmapMessage feeds arbitrary netmap lines to the agent's checks:
// nothing may panic, and nothing that passes may route traffic outside
// the cluster's pod ranges, into our own pods, or to an unusable endpoint.
func FuzzNetmapMessage(f *testing.F) {
	f.Add([]byte(`{"version":3,"peers":[{"name":"b","publicKey":"AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","endpoint":"203.0.113.1:51820","allowedIPs":["10.42.1.0/24","0.0.0.0/0"]}]}`))
	f.Add([]byte(`{"peers":[{"publicKey":"","allowedIPs":["10.42.0.0/16"],"via":"r"}]}`))
	f.Add([]byte(`{"peers":[{"publicKey":"AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","endpoint":"[::ffff:127.0.0.1]:1","allowedIPs":["10.42.0.0/25"]}]}`))
	f.Add([]byte(`{"clusterCIDRs":["0.0.0.0/0"],"self":{"podCIDRs":["10.0.0.0/24"]},"peers":[{"publicKey":"AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","allowedIPs":["10.1.0.0/24"]}]}`))
	f.Add([]byte(`{"clusterCIDRs":["10.42.0.0/16","fd00:42::/56"],"self":{"podCIDRs":["10.42.0.0/24","fd00:42::/64"]},"peers":[{"publicKey":"AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","allowedIPs":["fd00:42:0:1::/64","10.42.1.0/24"]}]}`))
	base, own := testNetmap(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		var nm api.NetMap
		if json.Unmarshal(data, &nm) != nil {
			return
		}
		if len(nm.ClusterCIDRs) == 0 {
			nm.ClusterCIDRs, nm.Self = base.ClusterCIDRs, base.Self
		}
		if checkNetmap(nm, nil) != nil {
			return // the loop ignores such a netmap
		}
		peers, _ := sanitizePeers(nm, own)
		for _, mp := range peers {
			if mp.PublicKey == own {
				t.Fatalf("kept our own key")
			}
			for _, q := range mp.AllowedIPs {
				in := false
				for _, c := range nm.ClusterCIDRs {
					in = in || c.Contains(q.Addr()) && q.Bits() > c.Bits()
				}
				if !in || q.Bits() == 0 {
					t.Fatalf("kept allowed IP %v outside the cluster CIDRs %v", q, nm.ClusterCIDRs)
				}
				for _, o := range nm.Self.PodCIDRs {
					if q.Overlaps(o) {
						t.Fatalf("kept allowed IP %v inside our own pod CIDR %v", q, o)
					}
				}
			}
			if mp.Endpoint.IsValid() && (mp.Endpoint.Addr().Unmap().IsLoopback() || mp.Endpoint.Addr().IsLinkLocalUnicast()) {
				t.Fatalf("kept endpoint %v", mp.Endpoint)
			}
		}
	})
}
