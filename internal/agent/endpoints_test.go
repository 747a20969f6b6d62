package agent

import (
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/mesh"
)

func TestChooseEndpoint(t *testing.T) {
	now := time.Now()
	ap := netip.MustParseAddrPort
	fresh := &mesh.PeerStatus{Endpoint: ap("198.18.0.50:40001"), LastHandshake: now.Add(-10 * time.Second)}
	stale := &mesh.PeerStatus{Endpoint: ap("198.18.0.50:40001"), LastHandshake: now.Add(-10 * time.Minute)}
	none := netip.AddrPort{}
	for _, tc := range []struct {
		name                 string
		desired, lastDesired netip.AddrPort
		cur                  *mesh.PeerStatus
		remembered           netip.AddrPort
		want                 netip.AddrPort
	}{
		{"new peer: the netmap's", ap("203.0.113.1:51820"), none, nil, none, ap("203.0.113.1:51820")},
		{"roamed and working: kept", ap("198.18.0.50:51820"), ap("198.18.0.50:51820"), fresh, none, ap("198.18.0.50:40001")},
		{"roamed but stale: the netmap's", ap("198.18.0.50:51820"), ap("198.18.0.50:51820"), stale, none, ap("198.18.0.50:51820")},
		{"new address announced: the netmap's", ap("198.51.100.41:51820"), ap("198.51.100.40:51820"), fresh, none, ap("198.51.100.41:51820")},
		{"an address appears where none was known, path working: kept", ap("198.18.0.50:6622"), none, fresh, none, ap("198.18.0.50:40001")},
		{"another NAT mapping of the same address, path working: kept", ap("198.18.0.50:7733"), ap("198.18.0.50:6622"), fresh, none, ap("198.18.0.50:40001")},
		{"another NAT mapping of the same address, path stale: the netmap's", ap("198.18.0.50:7733"), ap("198.18.0.50:6622"), stale, none, ap("198.18.0.50:7733")},
		{"an address appears where none was known, path stale: the netmap's", ap("198.18.0.50:6622"), none, stale, none, ap("198.18.0.50:6622")},
		{"an address appears for a new peer: the netmap's", ap("198.18.0.50:6622"), none, nil, none, ap("198.18.0.50:6622")},
		{"no endpoint known: the one that worked last", none, none, nil, ap("198.18.0.50:40001"), ap("198.18.0.50:40001")},
		{"no endpoint known, hostile memory: none", none, none, nil, ap("127.0.0.1:51820"), none},
		{"endpoint known: memory not used", ap("203.0.113.1:51820"), none, nil, ap("198.18.0.50:40001"), ap("203.0.113.1:51820")},
	} {
		if got := chooseEndpoint(tc.desired, tc.lastDesired, tc.cur, tc.remembered, now); got != tc.want {
			t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestEndpointMemorySurvivesRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "endpoints.json")
	m := endpointMemory{api.Key{1}: netip.MustParseAddrPort("198.18.0.50:40001")}
	if err := m.save(path); err != nil {
		t.Fatal(err)
	}
	got := loadEndpoints(path)
	if got[api.Key{1}] != m[api.Key{1}] || len(got) != 1 {
		t.Fatalf("loaded %v, want %v", got, m)
	}
	if len(loadEndpoints(filepath.Join(t.TempDir(), "missing.json"))) != 0 {
		t.Fatal("a missing file must load as empty")
	}
}
