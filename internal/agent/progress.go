package agent

import (
	"strconv"
	"time"
)

// waitGrace is how long a wait may last before the agent says what it is
// waiting for: most first handshakes and route approvals take less.
const waitGrace = 5 * time.Second

// progress tells the operator what the agent is waiting for beyond the
// server (joinUntilDone has its own waitLog): the first WireGuard
// handshake, and the VPN's approval of the pod CIDR routes. Each is said
// once, then again at growing intervals, and its end is said once. Only
// the report loop touches it.
type progress struct {
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

// checkWaits is called by the report loop every reportInterval.
func (a *Agent) checkWaits(now time.Time) {
	a.checkFirstHandshake(now)
	a.checkRouteApproval(now)
}

func (a *Agent) checkFirstHandshake(now time.Time) {
	s := &a.waits.handshake
	if s.done || a.dev == nil {
		return
	}
	a.mu.Lock()
	peers := len(a.peers)
	a.mu.Unlock()
	if peers == 0 {
		return // nothing to shake hands with yet (a single node)
	}
	st, err := a.dev.Status()
	if err != nil {
		return
	}
	for _, p := range st {
		if !p.LastHandshake.IsZero() {
			name := p.PublicKey
			a.mu.Lock()
			peer := ""
			if ps := a.peers[name]; ps != nil {
				peer = ps.name
			}
			a.mu.Unlock()
			s.ended(now, "first WireGuard handshake completed; the mesh carries traffic", "peer", peer)
			return
		}
	}
	s.still(&waitLog{log: a.log, what: "the first WireGuard handshake with a peer (is UDP " + strconv.Itoa(a.cfg.WireGuard.ListenPort) + " open between the nodes? 'trellis check' names the pairs that fail)"},
		now, "peers", peers)
}

func (a *Agent) checkRouteApproval(now time.Time) {
	v := a.vpn
	s := &a.waits.approval
	if v == nil {
		return
	}
	v.mu.Lock()
	routes, approved := v.routes, v.approved
	v.mu.Unlock()
	if len(routes) == 0 {
		return
	}
	if approved {
		s.ended(now, "route approval wait over", "routes", routes)
		*s = waitState{} // a later withdrawal is waited for again
		return
	}
	s.done = false
	s.still(&waitLog{log: a.log, what: "the VPN to approve this node's pod CIDR routes ('trellis nodes' shows the autoApprovers stanza once the approval timeout passes)"},
		now, "routes", joinPrefixList(routes))
}
