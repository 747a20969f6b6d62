package agent

import (
	"bytes"
	"math/rand/v2"
	"time"

	"github.com/trellis-mesh/trellis/internal/mesh"
)

// Crossed handshakes. Nodes that join together learn of each other from
// the same netmap push, and each sends a WireGuard handshake initiation to
// the other at once. When both initiations are in flight at the same time
// (the path's one-way delay, or a busy node's processing time), each node
// answers the other's and drops the answer to its own: neither has a
// session. WireGuard retries after 5 s, but the answer a node sent counts
// as its last handshake message, so with traffic on both sides both retry
// at the same moment and cross again, every 5 s, for as long as chance
// keeps them in step. Worse, wireguard-go handles the two messages of a
// crossing on parallel workers, and can end up with a session whose
// receiving half is gone: the node sends, the peer decrypts, but the
// peer's packets are dropped, until WireGuard gives up on hearing back
// after 15 s. Both were seen with 20 nodes joining on one machine (first
// packets after 5-25 s).
//
// The agent watches for both and starts the handshake over on its side
// (mesh.Device.ResetPeer): one fresh initiation, sent between the peer's
// retries, completes in a round trip. A reset is itself an initiation
// that can cross the peer's, so the agent resets only on evidence. A
// peer without a session that sent us an initiation (it knows us, and we
// answered; the received bytes grew): the node with the lower public key
// resets it soon, the other later, so that their fresh initiations do not
// cross as well. Without such evidence the peer may not know us yet (its
// netmap comes later, and it initiates when it does), or does not answer
// at all: reset only after WireGuard's own first retry would have had its
// chance, backing off for a peer that stays silent (down, or unreachable
// directly and relayed).
//
// A session is reset only when it is new (the peer was added less than
// newPeerFor ago), this node sent it data and heard nothing back within
// deafAfter, and only once per peer: an idle peer sends nothing, and a
// one-way flow hears only WireGuard's keepalive after 10 s. The fresh
// initiation goes to the session's endpoint, where the peer's packets
// came from (chooseEndpoint keeps it), so it passes the peer's NAT too.
const (
	// rescueInterval is how often the agent looks at its peers while one
	// of them is new or without a session; rescueIdle while all are
	// settled. A status read costs 0.7 ms at 100 peers and 4.4 ms at 1000
	// (BenchmarkStatus in internal/mesh): every 250 ms at 1000 peers that
	// is 1.8 % of a core for nothing once the mesh is up. A new netmap
	// wakes the loop (Agent.rescueWake).
	rescueInterval = 250 * time.Millisecond
	rescueIdle     = 2 * time.Second
	// watchAttempts is how many resets of a peer without a session are
	// watched at rescueInterval.
	watchAttempts = 3
	// crossedFirst is how long after the peer's initiation arrived a peer
	// may stay without a handshake before the node with the lower key
	// starts it over (the peer's confirmation takes one round trip, and a
	// premature reset costs one more); crossedSecond is the same for the
	// node with the higher key.
	crossedFirst  = 500 * time.Millisecond
	crossedSecond = 1500 * time.Millisecond
	// silentFirst and silentSecond are the same for a peer that sent
	// nothing, from when the wait began.
	silentFirst  = 6 * time.Second
	silentSecond = 8 * time.Second
	// rescueRetry is the wait after an attempt, doubled per attempt up
	// to rescueMaxWait, with ±20 % jitter.
	rescueRetry   = 2 * time.Second
	rescueMaxWait = 30 * time.Second
	// A session of a peer added less than newPeerFor ago that has heard
	// nothing from the peer deafAfter after this node had sent it
	// deafBytes (two small packets) is reset, once per peer. Replies take
	// a round trip, longer on a busy node.
	newPeerFor = 30 * time.Second
	deafAfter  = 1500 * time.Millisecond
	deafBytes  = 256
)

// handshakeRescue decides when to start a peer's handshake over. It holds
// no device: rescueLoop feeds it the device's status.
type handshakeRescue struct {
	own    [32]byte
	jitter func() float64 // in [0, 1)
	peers  map[[32]byte]*rescuePeer
}

// rescuePeer is what the rescue knows of one of the device's peers.
type rescuePeer struct {
	added time.Time // first seen on the device
	// Without a fresh handshake: since when (or the last reset), the
	// received bytes then, when they grew (zero until then), and the
	// resets so far. since is zero while the handshake is fresh.
	since    time.Time
	rxSince  int64
	heard    time.Time
	attempts int
	// The current session: its handshake, the counters when first seen,
	// whether a packet from the peer came since, and when this node had
	// sent deafBytes in it.
	session      time.Time
	rx0, tx0     int64
	sessionHeard bool
	sent         time.Time
	deaf         bool // a session that heard nothing was reset once
}

func newHandshakeRescue(own [32]byte) *handshakeRescue {
	return &handshakeRescue{own: own, jitter: rand.Float64, peers: map[[32]byte]*rescuePeer{}}
}

// resetAt is when a peer without a handshake is due to be reset.
func (r *handshakeRescue) resetAt(peer [32]byte, w *rescuePeer) time.Time {
	if w.attempts > 0 {
		d := min(rescueRetry<<min(w.attempts-1, 5), rescueMaxWait)
		return w.since.Add(time.Duration(float64(d) * (0.8 + 0.4*r.jitter())))
	}
	first := bytes.Compare(r.own[:], peer[:]) < 0
	switch {
	case !w.heard.IsZero() && first:
		return w.heard.Add(crossedFirst)
	case !w.heard.IsZero():
		return w.heard.Add(crossedSecond)
	case first:
		return w.since.Add(silentFirst)
	default:
		return w.since.Add(silentSecond)
	}
}

// due returns the peers to reset now, given the device's peers, and why.
// A peer with no endpoint is left alone: it must reach us first.
// due also reports whether a peer needs watching (watch): one with an
// endpoint and no fresh session (for its first watchAttempts resets), or a
// new one whose session has not been heard from yet. Otherwise the loop
// may look less often.
func (r *handshakeRescue) due(st []mesh.PeerStatus, now time.Time) (reset []mesh.PeerStatus, why []string, watch bool) {
	seen := make(map[[32]byte]bool, len(st))
	for _, p := range st {
		seen[p.PublicKey] = true
		w := r.peers[p.PublicKey]
		if w == nil {
			w = &rescuePeer{added: now}
			r.peers[p.PublicKey] = w
		}
		if !p.Endpoint.IsValid() {
			w.since, w.heard, w.attempts = time.Time{}, time.Time{}, 0
			continue
		}
		if handshakeFresh(p.LastHandshake, now) {
			w.since, w.heard, w.attempts = time.Time{}, time.Time{}, 0
			if r.deaf(w, p, now) {
				reset, why = append(reset, p), append(why, "new session hears nothing back")
			}
			watch = watch || !w.sessionHeard && !w.deaf && now.Sub(w.added) < newPeerFor
			continue
		}
		// A crossing is caught within rescueInterval for a peer's first
		// tries; one that stays silent after them (down, or reachable only
		// through a relay) is looked at every rescueIdle.
		watch = watch || w.attempts < watchAttempts
		if w.since.IsZero() {
			w.since, w.rxSince = now, p.ReceiveBytes
			if p.LastHandshake.IsZero() {
				w.rxSince = 0 // never a session: all it received is handshakes
			}
		}
		if w.heard.IsZero() && p.ReceiveBytes > w.rxSince {
			w.heard = now
		}
		if now.Before(r.resetAt(p.PublicKey, w)) {
			continue
		}
		reason := "no handshake, the peer's initiation crossed ours"
		if w.heard.IsZero() {
			reason = "no handshake, nothing heard"
		}
		// The peer is added anew: its counters start from zero.
		w.since, w.rxSince, w.heard = now, 0, time.Time{}
		w.attempts++
		reset, why = append(reset, p), append(why, reason)
	}
	for k := range r.peers {
		if !seen[k] {
			delete(r.peers, k)
		}
	}
	return reset, why, watch
}

// deaf follows a peer's session and reports whether it is due for a
// reset: new, sending, hearing nothing.
func (r *handshakeRescue) deaf(w *rescuePeer, p mesh.PeerStatus, now time.Time) bool {
	if !p.LastHandshake.Equal(w.session) {
		w.session, w.rx0, w.tx0, w.sessionHeard, w.sent = p.LastHandshake, p.ReceiveBytes, p.TransmitBytes, false, time.Time{}
		return false
	}
	w.sessionHeard = w.sessionHeard || p.ReceiveBytes > w.rx0
	if w.sent.IsZero() && p.TransmitBytes-w.tx0 >= deafBytes {
		w.sent = now
	}
	if w.sessionHeard || w.deaf || w.sent.IsZero() || now.Sub(w.added) >= newPeerFor || now.Sub(w.sent) < deafAfter {
		return false
	}
	w.deaf = true
	return true
}
