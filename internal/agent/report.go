package agent

import (
	"slices"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/mesh"
)

const (
	// handshakeGrace is how long a new peer may go without a handshake
	// before it is reported failing (and the pair relayed). WireGuard
	// retries a handshake after 5 s, and crossed handshakes are started
	// over within 2 s (handshake.go), so 6 s gives the direct path two
	// tries; a pair that needs a relay gets its first packet about 7 s
	// after it starts (docs/bench/join.md).
	handshakeGrace = 6 * time.Second
	// handshakeValid is how old the last handshake may be while the
	// session is alive: WireGuard rekeys after 120 s and rejects sessions
	// older than 180 s.
	handshakeValid = 180 * time.Second
)

func handshakeFresh(last, now time.Time) bool {
	return !last.IsZero() && now.Sub(last) < handshakeValid
}

// observe judges each peer's direct path from the device's status: a
// fresh handshake is OK; none within handshakeGrace of the peer's arrival,
// with an endpoint to try, is failing. A change to or from failing is
// logged once.
func (l *loop) observe(st []mesh.PeerStatus, now time.Time) []api.Observation {
	out := make([]api.Observation, 0, len(st))
	for _, p := range st {
		ps := l.peers[api.Key(p.PublicKey)]
		if ps == nil {
			continue
		}
		o := api.Observation{Peer: ps.name, Endpoint: p.Endpoint}
		switch {
		case handshakeFresh(p.LastHandshake, now):
			o.Handshake = api.HandshakeOK
		case now.Sub(ps.since) > handshakeGrace && (p.Endpoint.IsValid() || ps.desired.IsValid()):
			o.Handshake = api.HandshakeFailing
		}
		switch {
		case o.Handshake == api.HandshakeFailing && ps.handshake != api.HandshakeFailing:
			ep := p.Endpoint
			if !ep.IsValid() {
				ep = ps.desired
			}
			l.log.Info("no WireGuard handshake with a peer on its direct path; telling the server, which relays the pair through a node that reaches both", "peer", ps.name, "endpoint", ep, "waited", now.Sub(ps.since).Round(time.Second))
		case o.Handshake == api.HandshakeOK && ps.handshake == api.HandshakeFailing:
			l.log.Info("the direct WireGuard path to a peer works again; telling the server", "peer", ps.name, "endpoint", p.Endpoint)
		}
		ps.handshake = o.Handshake
		out = append(out, o)
	}
	slices.SortFunc(out, func(x, y api.Observation) int { return strings.Compare(x.Peer, y.Peer) })
	return out
}
