package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/mesh"
)

const (
	// reportInterval is how often the agent checks its addresses and its
	// peers' handshakes; a report is sent only when something changed.
	reportInterval = time.Second
	// handshakeGrace is how long a new peer may go without a handshake
	// before it is reported failing (and the pair relayed). WireGuard
	// retries a handshake every 5 s, so this allows three tries. 6 s
	// would do now that crossed handshakes are started over (a pair that
	// needs a relay would get its first packet 10 s sooner), once the
	// netmap stops giving every node the LAN address a same-network peer
	// observed for a node behind NAT (docs/bench/join.md).
	handshakeGrace = 6 * time.Second
	// handshakeValid is how old the last handshake may be while the
	// session is alive: WireGuard rekeys after 120 s and rejects sessions
	// older than 180 s.
	handshakeValid = 180 * time.Second
)

func handshakeFresh(last, now time.Time) bool {
	return !last.IsZero() && now.Sub(last) < handshakeValid
}

// addrSet is the node's own addresses as last detected.
type addrSet struct {
	internal []netip.Addr
	networks []netip.Prefix
	// local is every address on the host's interfaces: when one goes,
	// connections bound to it are dead even if the node IPs are pinned.
	local []netip.Addr
}

func (s addrSet) equal(o addrSet) bool {
	return slices.Equal(s.internal, o.internal) && slices.Equal(s.networks, o.networks)
}

// detectAddrs returns the node's internal addresses: --node-ip if given,
// else the source address of the default route of each family; and the
// subnets they are on.
func (a *Agent) detectAddrs() addrSet {
	var s addrSet
	s.internal = slices.Clone(a.cfg.NodeIPs)
	if len(s.internal) == 0 {
		for _, v6 := range []bool{false, true} {
			if ip, ok := defaultAddr(v6); ok {
				s.internal = append(s.internal, ip)
			}
		}
	}
	nets, err := networksOf(s.internal)
	if err != nil {
		a.log.Debug("cannot tell which networks the node is on", "err", err)
	}
	s.networks = nets
	s.local = localAddrs()
	return s
}

func (a *Agent) currentAddrs() addrSet {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.addrs
}

// observations turns the device's view of its peers into what the server
// needs: where each peer's packets come from and whether the direct path
// completes handshakes.
func (a *Agent) observations(now time.Time) []api.Observation {
	if a.dev == nil {
		return nil
	}
	st, err := a.dev.Status()
	if err != nil {
		return nil
	}
	a.rememberWorking(st, now)
	return a.observe(st, now)
}

// observe judges each peer's direct path from the device's status: a
// fresh handshake is OK; none within handshakeGrace of the peer's arrival,
// with an endpoint to try, is failing. A change to or from failing is
// logged once.
func (a *Agent) observe(st []mesh.PeerStatus, now time.Time) []api.Observation {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]api.Observation, 0, len(st))
	for _, p := range st {
		ps := a.peers[api.Key(p.PublicKey)]
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
			a.log.Info("no WireGuard handshake with a peer on its direct path; telling the server, which relays the pair through a node that reaches both", "peer", ps.name, "endpoint", ep, "waited", now.Sub(ps.since).Round(time.Second))
		case o.Handshake == api.HandshakeOK && ps.handshake == api.HandshakeFailing:
			a.log.Info("the direct WireGuard path to a peer works again; telling the server", "peer", ps.name, "endpoint", p.Endpoint)
		}
		ps.handshake = o.Handshake
		out = append(out, o)
	}
	slices.SortFunc(out, func(x, y api.Observation) int { return strings.Compare(x.Peer, y.Peer) })
	return out
}

// reportLoop notices changes of the node's addresses and of its peers'
// handshakes and tells the server, so that a new public IP or a NAT
// mapping reaches every peer within seconds, without a restart.
func (a *Agent) reportLoop(ctx context.Context) {
	t := time.NewTicker(reportInterval)
	defer t.Stop()
	var last []byte
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case r := <-a.cfg.Reload:
			a.mu.Lock()
			if !slices.Equal(a.external, r.ExternalIPs) {
				a.log.Info("external IPs changed by reload; telling the server", "from", a.external, "to", r.ExternalIPs)
				a.external = r.ExternalIPs
			}
			a.mu.Unlock()
		}
		addrs := a.detectAddrs()
		a.mu.Lock()
		prev := a.addrs
		a.addrs = addrs
		c := a.client
		external := a.external
		a.mu.Unlock()
		if !addrs.equal(prev) {
			a.log.Info("node addresses changed; telling the server", "from", prev.internal, "to", addrs.internal)
		}
		if gone := goneAddrs(prev.local, addrs.local); len(gone) > 0 {
			// Connections to the server may be bound to an address that
			// is gone: start them afresh rather than wait for timeouts.
			// (New addresses break nothing, and the agent adds its own
			// at start: the tunnel's and the pod bridge's.)
			a.log.Debug("addresses went away; reconnecting to the server", "gone", gone)
			if c != nil {
				c.close()
			}
			select {
			case a.kick <- struct{}{}:
			default:
			}
		}
		a.checkWaits(time.Now())
		rep := api.Report{
			InternalIPs:  addrs.internal,
			Networks:     addrs.networks,
			ExternalIPs:  external,
			Observations: a.observations(time.Now()),
			VPN:          a.vpnReport(ctx, time.Now()),
		}
		body, err := json.Marshal(rep)
		if err != nil || bytes.Equal(body, last) || c == nil {
			continue
		}
		if err := c.report(ctx, body); err != nil {
			a.log.Debug("report failed; will retry", "err", err)
			c.close() // the next try dials afresh
			continue
		}
		last = body
	}
}

// goneAddrs returns the addresses of prev that are not in cur (both
// sorted).
func goneAddrs(prev, cur []netip.Addr) []netip.Addr {
	var gone []netip.Addr
	for _, a := range prev {
		if _, found := slices.BinarySearchFunc(cur, a, netip.Addr.Compare); !found {
			gone = append(gone, a)
		}
	}
	return gone
}

func (c *apiClient) report(ctx context.Context, body []byte) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, c.base+api.PathReport, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent && resp.StatusCode != http.StatusOK {
		return fmt.Errorf("report: %w", decodeError(resp))
	}
	return nil
}
