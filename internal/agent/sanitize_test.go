package agent

import (
	"encoding/json"
	"io"
	"log/slog"
	"net/netip"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/trellis-mesh/trellis/internal/api"
)

func testAgent(t testing.TB) *Agent {
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return &Agent{
		log:   slog.New(slog.NewTextHandler(io.Discard, nil)),
		id:    identity{privateKey: k, publicKey: api.Key(k.PublicKey())},
		cidrs: []netip.Prefix{netip.MustParsePrefix("10.42.0.0/16")},
		self:  api.Node{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.42.0.0/24")}},
	}
}

func TestSanitizeDropsHostileEntries(t *testing.T) {
	a := testAgent(t)
	own := api.Key(a.id.privateKey.PublicKey())
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
			mp, ok := a.sanitize(tc.peer)
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
	a := testAgent(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		var nm api.NetMap
		if json.Unmarshal(data, &nm) != nil {
			return
		}
		for _, p := range nm.Peers {
			mp, ok := a.sanitize(p)
			if !ok {
				continue
			}
			for _, q := range mp.AllowedIPs {
				if !a.cidrs[0].Contains(q.Addr()) || q.Bits() != 24 || q.Overlaps(a.self.PodCIDRs[0]) {
					t.Fatalf("kept allowed IP %v", q)
				}
			}
			if mp.Endpoint.IsValid() && (mp.Endpoint.Addr().Unmap().IsLoopback() || mp.Endpoint.Addr().IsLinkLocalUnicast()) {
				t.Fatalf("kept endpoint %v", mp.Endpoint)
			}
		}
	})
}
