package agent

import (
	"bytes"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/mesh"
)

func TestObserveJudgesTheDirectPathAndLogsChanges(t *testing.T) {
	var logs bytes.Buffer
	t0 := time.Unix(1_700_000_000, 0)
	key, quiet := [32]byte{1}, [32]byte{2}
	ep := netip.MustParseAddrPort("198.18.0.1:51820")
	a := &loop{loopConfig: loopConfig{log: slog.New(slog.NewTextHandler(&logs, nil))}, peers: map[api.Key]*peerState{
		api.Key(key):   {name: "home2", since: t0, desired: ep},
		api.Key(quiet): {name: "nowhere", since: t0}, // no endpoint: waits for the peer, never failing
	}}
	status := func(last time.Time) []mesh.PeerStatus {
		return []mesh.PeerStatus{{PublicKey: key, Endpoint: ep, LastHandshake: last}, {PublicKey: quiet}}
	}
	step := func(at time.Duration, last time.Time, want string, wantLogs int) {
		t.Helper()
		obs := a.observe(status(last), t0.Add(at))
		if len(obs) != 2 || obs[0].Peer != "home2" || obs[1].Peer != "nowhere" {
			t.Fatalf("at %v: observations %+v", at, obs)
		}
		if obs[0].Handshake != want {
			t.Errorf("at %v: home2 %q, want %q", at, obs[0].Handshake, want)
		}
		if obs[1].Handshake != "" {
			t.Errorf("at %v: a peer without an endpoint is %q, want pending", at, obs[1].Handshake)
		}
		if n := strings.Count(logs.String(), "\n"); n != wantLogs {
			t.Errorf("at %v: %d log lines, want %d:\n%s", at, n, wantLogs, logs.String())
		}
	}
	step(time.Second, time.Time{}, "", 0)
	step(handshakeGrace-time.Second, time.Time{}, "", 0)
	step(handshakeGrace+time.Second, time.Time{}, api.HandshakeFailing, 1)
	step(handshakeGrace+2*time.Second, time.Time{}, api.HandshakeFailing, 1) // said once
	if !strings.Contains(logs.String(), "peer=home2") || !strings.Contains(logs.String(), "relays the pair") {
		t.Errorf("the failing line should name the peer and what happens next: %s", logs.String())
	}
	// The direct peer stays as a probe; its first handshake is news too.
	hs := t0.Add(20 * time.Second)
	step(21*time.Second, hs, api.HandshakeOK, 2)
	step(22*time.Second, hs, api.HandshakeOK, 2)
	if !strings.Contains(logs.String(), "works again") {
		t.Errorf("no line for the direct path working again: %s", logs.String())
	}
	// A handshake older than a session lives is stale: failing again.
	step(20*time.Second+handshakeValid+time.Second, hs, api.HandshakeFailing, 3)
}
