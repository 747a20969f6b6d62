package agent

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/mesh"
)

// rescueRun steps a handshakeRescue rescueInterval at a time from t0+from
// to t0+end, with the status status(offset) gives, and returns the
// offsets at which each peer was reset.
func rescueRun(r *handshakeRescue, t0 time.Time, from, end time.Duration, status func(time.Duration) []mesh.PeerStatus) map[[32]byte][]time.Duration {
	got := map[[32]byte][]time.Duration{}
	for d := from; d <= end; d += rescueInterval {
		reset, _, _ := r.due(status(d), t0.Add(d))
		for _, p := range reset {
			got[p.PublicKey] = append(got[p.PublicKey], d)
		}
	}
	return got
}

func TestHandshakeRescueNoHandshake(t *testing.T) {
	own := [32]byte{5}
	low, high := [32]byte{9}, [32]byte{1} // we are lower than the first, higher than the second
	ep := netip.MustParseAddrPort("198.18.0.1:51820")
	t0 := time.Unix(1_700_000_000, 0)
	noJitter := func() float64 { return 0.5 }
	ms := func(n int) time.Duration { return time.Duration(n) * time.Millisecond }

	// Crossed: each peer's initiation arrived (and was answered) at once,
	// 148 bytes; no session. The lower key resets 0.5 s after, the other
	// 1.5 s after; then every 2 s, 4 s, ... (a reset peer's counters
	// start from zero, and the crossing goes on).
	r := newHandshakeRescue(own)
	r.jitter = noJitter
	crossed := func(time.Duration) []mesh.PeerStatus {
		return []mesh.PeerStatus{
			{PublicKey: low, Endpoint: ep, ReceiveBytes: 148, TransmitBytes: 240},
			{PublicKey: high, Endpoint: ep, ReceiveBytes: 148, TransmitBytes: 240},
		}
	}
	got := rescueRun(r, t0, 0, 8*time.Second, crossed)
	want := map[[32]byte][]time.Duration{
		low:  {ms(500), ms(2500), ms(6500)},
		high: {ms(1500), ms(3500), ms(7500)},
	}
	for k, w := range want {
		if !slices.Equal(got[k], w) {
			t.Errorf("crossed, peer %x: resets at %v, want %v", k[0], got[k], w)
		}
	}

	// Silent: nothing from the peer (it may not know us yet); reset only
	// after WireGuard's own retry had its chance.
	r = newHandshakeRescue(own)
	r.jitter = noJitter
	silent := func(time.Duration) []mesh.PeerStatus {
		return []mesh.PeerStatus{{PublicKey: low, Endpoint: ep, TransmitBytes: 148}, {PublicKey: high, Endpoint: ep, TransmitBytes: 148}}
	}
	got = rescueRun(r, t0, 0, 9*time.Second, silent)
	if w := []time.Duration{silentFirst, silentFirst + rescueRetry}; !slices.Equal(got[low], w) {
		t.Errorf("silent, lower: resets at %v, want %v", got[low], w)
	}
	if w := []time.Duration{silentSecond}; !slices.Equal(got[high], w) {
		t.Errorf("silent, higher: resets at %v, want %v", got[high], w)
	}

	// Silent at first, then the peer's initiation arrives at 2 s (it
	// learned of us): crossed from then on.
	r = newHandshakeRescue(own)
	got = rescueRun(r, t0, 0, 3*time.Second, func(d time.Duration) []mesh.PeerStatus {
		p := mesh.PeerStatus{PublicKey: low, Endpoint: ep, TransmitBytes: 148}
		if d >= 2*time.Second {
			p.ReceiveBytes, p.TransmitBytes = 148, 240
		}
		return []mesh.PeerStatus{p}
	})
	if w := []time.Duration{ms(2500)}; !slices.Equal(got[low], w) {
		t.Errorf("heard at 2 s: resets at %v, want %v", got[low], w)
	}

	// A handshake ends the wait; losing it later starts a new one, where
	// only bytes received after the loss count as evidence.
	hs := t0.Add(3 * time.Second)
	ok := func(time.Duration) []mesh.PeerStatus {
		return []mesh.PeerStatus{{PublicKey: low, Endpoint: ep, LastHandshake: hs, ReceiveBytes: 5000, TransmitBytes: 5000}}
	}
	if got := rescueRun(r, t0, 3*time.Second, 4*time.Second, ok); len(got) != 0 {
		t.Fatalf("with a fresh handshake: resets %v", got)
	}
	later := 3*time.Second + handshakeValid
	got = rescueRun(r, t0, later, later+7*time.Second, ok)
	if w := []time.Duration{later + silentFirst}; !slices.Equal(got[low], w) {
		t.Errorf("after the handshake went stale: resets at %v, want %v", got[low], w)
	}

	// No endpoint: nothing to initiate to; never reset.
	r = newHandshakeRescue(own)
	if got := rescueRun(r, t0, 0, 20*time.Second, func(time.Duration) []mesh.PeerStatus {
		return []mesh.PeerStatus{{PublicKey: low, ReceiveBytes: 148}}
	}); len(got) != 0 {
		t.Errorf("peer without endpoint reset at %v", got)
	}

	// A peer gone from the device is forgotten.
	r.due(nil, t0)
	if len(r.peers) != 0 {
		t.Errorf("peers gone from the device still tracked: %v", r.peers)
	}

	// Backoff is capped.
	w := &rescuePeer{since: t0, attempts: 20}
	if d := r.resetAt(low, w).Sub(t0); d < rescueMaxWait*8/10 || d > rescueMaxWait*12/10 {
		t.Errorf("wait after 20 attempts = %v, want about %v", d, rescueMaxWait)
	}
}

func TestHandshakeRescueDeafSession(t *testing.T) {
	own, peer := [32]byte{5}, [32]byte{9}
	ep := netip.MustParseAddrPort("198.18.0.1:51820")
	t0 := time.Unix(1_700_000_000, 0)
	hs := t0.Add(500 * time.Millisecond)
	// status: a handshake at hs; from then on this node sends 1 kB/s and
	// receives rxRate bytes/s.
	status := func(rxRate int64) func(time.Duration) []mesh.PeerStatus {
		return func(d time.Duration) []mesh.PeerStatus {
			p := mesh.PeerStatus{PublicKey: peer, Endpoint: ep, TransmitBytes: 148, ReceiveBytes: 92}
			if at := t0.Add(d); !at.Before(hs) {
				p.LastHandshake = hs
				p.TransmitBytes += int64(at.Sub(hs).Seconds() * 1000)
				p.ReceiveBytes += int64(at.Sub(hs).Seconds() * float64(rxRate))
			}
			return []mesh.PeerStatus{p}
		}
	}
	for _, tc := range []struct {
		name   string
		rxRate int64
		from   time.Duration
		want   []time.Duration
	}{
		// The session is first seen at 0.5 s, 256 bytes are sent by 1 s.
		{"hears nothing: reset once, 1.5 s after sending", 0, 0, []time.Duration{2500 * time.Millisecond}},
		{"hears back: no reset", 1000, 0, nil},
		{"old peer: never", 0, newPeerFor, nil},
	} {
		r := newHandshakeRescue(own)
		if tc.from > 0 {
			r.peers[peer] = &rescuePeer{added: t0}
		}
		got := rescueRun(r, t0, tc.from, tc.from+10*time.Second, status(tc.rxRate))
		if !slices.Equal(got[peer], tc.want) {
			t.Errorf("%s: resets at %v, want %v", tc.name, got[peer], tc.want)
		}
	}
}

// TestHandshakeRescueWatch: the loop looks often only while a peer is new
// or has no session (for its first resets); a settled mesh is looked at
// every rescueIdle.
func TestHandshakeRescueWatch(t *testing.T) {
	own, peer := [32]byte{5}, [32]byte{9}
	ep := netip.MustParseAddrPort("198.18.0.1:51820")
	t0 := time.Unix(1_700_000_000, 0)
	watchAt := func(r *handshakeRescue, d time.Duration, p mesh.PeerStatus) bool {
		_, _, watch := r.due([]mesh.PeerStatus{p}, t0.Add(d))
		return watch
	}

	r := newHandshakeRescue(own)
	if !watchAt(r, 0, mesh.PeerStatus{PublicKey: peer, Endpoint: ep}) {
		t.Error("a new peer without a session is not watched")
	}
	// A session; the peer has not been heard through it yet: watched (a
	// deaf session is caught within deafAfter).
	hs := t0.Add(time.Second)
	if !watchAt(r, time.Second, mesh.PeerStatus{PublicKey: peer, Endpoint: ep, LastHandshake: hs, TransmitBytes: 100}) {
		t.Error("a new session not heard from yet is not watched")
	}
	if watchAt(r, 2*time.Second, mesh.PeerStatus{PublicKey: peer, Endpoint: ep, LastHandshake: hs, TransmitBytes: 1000, ReceiveBytes: 500}) {
		t.Error("a session that works is still watched")
	}

	// An old peer's session is settled even if it is quiet.
	r = newHandshakeRescue(own)
	quiet := mesh.PeerStatus{PublicKey: peer, Endpoint: ep, LastHandshake: t0.Add(time.Minute)}
	watchAt(r, 0, quiet)
	if watchAt(r, newPeerFor+time.Minute, quiet) {
		t.Error("an old quiet session is watched")
	}

	// No endpoint: nothing to do, nothing to watch.
	r = newHandshakeRescue(own)
	if watchAt(r, 0, mesh.PeerStatus{PublicKey: peer}) {
		t.Error("a peer without an endpoint is watched")
	}

	// A silent peer is watched for its first resets, then not.
	r = newHandshakeRescue(own)
	silent := mesh.PeerStatus{PublicKey: peer, Endpoint: ep}
	var last bool
	for d := time.Duration(0); d <= 2*time.Minute; d += rescueInterval {
		last = watchAt(r, d, silent)
		if !last {
			break
		}
	}
	if last || r.peers[peer].attempts != watchAttempts {
		t.Errorf("silent peer: watched %v after %d resets, want not after %d", last, r.peers[peer].attempts, watchAttempts)
	}
}
