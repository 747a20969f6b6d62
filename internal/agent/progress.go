package agent

import (
	"strconv"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/mesh"
)

// waitGrace is how long a wait may last before the agent says what it is
// waiting for: most first handshakes and route approvals take less.
const waitGrace = 5 * time.Second

// progress tells the operator what the agent is waiting for beyond the
// server (the source has its own waitLog): a pod CIDR, the first WireGuard
// handshake, and the VPN's approval of the pod CIDR routes. Each is said
// once, then again at growing intervals, and its end is said once. Only
// the loop touches it.
type progress struct {
	podCIDR   waitState
	handshake waitState
	approval  waitState
}

// waitState is one thing waited for.
type waitState struct {
	since time.Time // when the wait began; zero when not waiting
	done  bool      // the wait ended once; not logged again
	wl    *waitLog
}

// still records that the wait goes on at now and logs at growing
// intervals once waitGrace has passed.
func (s *waitState) still(w *waitLog, now time.Time, args ...any) {
	if s.since.IsZero() {
		s.since, s.wl = now, w
		return
	}
	if now.Sub(s.since) < waitGrace {
		return
	}
	s.wl.still(now, append(args, "for", now.Sub(s.since).Round(time.Second))...)
}

// ended records that the wait is over and says so if it was long enough
// to have been announced.
func (s *waitState) ended(now time.Time, msg string, args ...any) {
	if s.since.IsZero() || s.done {
		s.done = true
		return
	}
	if s.wl != nil && !s.wl.next.IsZero() {
		s.wl.log.Info(msg, append(args, "after", now.Sub(s.since).Round(100*time.Millisecond))...)
	}
	s.done = true
}

// still logs "waiting for ..." at info level, first at once, then at
// growing intervals (as failed does for errors).
func (w *waitLog) still(now time.Time, args ...any) {
	if now.Before(w.next) {
		return
	}
	w.log.Info("waiting for "+w.what, args...)
	if w.gap == 0 {
		w.gap = 5 * time.Second
	} else {
		w.gap = min(2*w.gap, 5*time.Minute)
	}
	w.next = now.Add(w.gap)
}

// checkWaits is called by every pass of the loop with the device's status
// (nil without a device).
func (l *loop) checkWaits(st []mesh.PeerStatus, now time.Time) {
	l.checkPodCIDR(now)
	l.checkFirstHandshake(st, now)
	l.checkRouteApproval(now)
}

// checkPodCIDR says when a node of a Kubernetes cluster waits for its
// Node's pod CIDR (no CNI config is written until then).
func (l *loop) checkPodCIDR(now time.Time) {
	s := &l.waits.podCIDR
	if !l.have || l.carrier == carrierNone {
		return
	}
	if len(l.nm.Self.PodCIDRs) > 0 {
		if !s.since.IsZero() {
			s.ended(now, "the node has its pod CIDR; pods can start", "podCIDRs", l.nm.Self.PodCIDRs)
		}
		*s = waitState{} // a later loss is waited for again
		return
	}
	s.done = false
	s.still(&waitLog{log: l.log, what: "a pod CIDR for this node (in a Kubernetes cluster: its Node's spec.podCIDRs; 'kubectl describe node' shows why it has none). No CNI config is written until then, so the kubelet reports the network not ready"}, now)
}

func (l *loop) checkFirstHandshake(st []mesh.PeerStatus, now time.Time) {
	s := &l.waits.handshake
	if s.done || l.dev == nil || len(l.peers) == 0 {
		return // nothing to shake hands with yet (a single node)
	}
	for _, p := range st {
		if !p.LastHandshake.IsZero() {
			peer := ""
			if ps := l.peers[api.Key(p.PublicKey)]; ps != nil {
				peer = ps.name
			}
			s.ended(now, "first WireGuard handshake completed; the mesh carries traffic", "peer", peer)
			return
		}
	}
	s.still(&waitLog{log: l.log, what: l.waitWhat}, now, "peers", len(l.peers))
}

func (l *loop) checkRouteApproval(now time.Time) {
	v := l.vpn
	s := &l.waits.approval
	if v == nil || len(v.routes) == 0 {
		return
	}
	if v.approved {
		s.ended(now, "route approval wait over", "routes", v.routes)
		*s = waitState{} // a later withdrawal is waited for again
		return
	}
	s.done = false
	s.still(&waitLog{log: l.log, what: "the VPN to approve this node's pod CIDR routes ('trellis nodes' shows the autoApprovers stanza once the approval timeout passes)"},
		now, "routes", joinPrefixList(v.routes))
}

// firstHandshakeWait describes the first-handshake wait.
func firstHandshakeWait(port int) string {
	return "the first WireGuard handshake with a peer (is UDP " + strconv.Itoa(port) + " open between the nodes? 'trellis check' names the pairs that fail)"
}
