package agent

import (
	"encoding/json"
	"errors"
	"maps"
	"net/netip"
	"os"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/mesh"
	"github.com/trellis-mesh/trellis/internal/netmap"
	"github.com/trellis-mesh/trellis/internal/pki"
)

// chooseEndpoint decides where the device sends a peer's packets:
//   - a working path (a fresh handshake at the device's current endpoint)
//     is kept: WireGuard follows a peer that roams, for instance behind a
//     NAT that maps it elsewhere than the server observed; unless the
//     netmap announces a new address for the peer (desired changed);
//   - when the netmap knows no endpoint, the one that last worked, kept
//     across restarts, is tried;
//   - otherwise the netmap's.
func chooseEndpoint(desired, lastDesired netip.AddrPort, cur *mesh.PeerStatus, remembered netip.AddrPort, now time.Time) netip.AddrPort {
	if cur != nil && desired == lastDesired && cur.Endpoint.IsValid() && handshakeFresh(cur.LastHandshake, now) {
		return cur.Endpoint
	}
	if !desired.IsValid() && remembered.IsValid() && netmap.ValidEndpoint(remembered.Addr()) {
		return remembered
	}
	return desired
}

// endpointMemory is the endpoint that last completed a handshake, per
// peer key, kept in DATA-DIR/agent/endpoints.json.
type endpointMemory map[api.Key]netip.AddrPort

func loadEndpoints(path string) endpointMemory {
	m := endpointMemory{}
	b, err := os.ReadFile(path)
	if err != nil {
		return m
	}
	var raw map[string]netip.AddrPort
	if json.Unmarshal(b, &raw) != nil {
		return m
	}
	for k, ep := range raw {
		if key, err := api.ParseKey(k); err == nil && ep.IsValid() {
			m[key] = ep
		}
	}
	return m
}

func (m endpointMemory) save(path string) error {
	raw := make(map[string]netip.AddrPort, len(m))
	for k, ep := range m {
		raw[k.String()] = ep
	}
	b, err := json.Marshal(raw)
	if err != nil {
		return err
	}
	return pki.WriteFileAtomic(path, b, 0o600)
}

// rememberWorking records the endpoints of peers with a fresh handshake
// and saves the memory when it changed.
func (a *Agent) rememberWorking(st []mesh.PeerStatus, now time.Time) {
	a.mu.Lock()
	next := maps.Clone(a.endpoints)
	if next == nil {
		next = endpointMemory{}
	}
	for _, p := range st {
		if p.Endpoint.IsValid() && handshakeFresh(p.LastHandshake, now) {
			next[api.Key(p.PublicKey)] = p.Endpoint
		}
	}
	changed := !maps.Equal(next, a.endpoints)
	a.endpoints = next
	a.mu.Unlock()
	if changed {
		if err := next.save(a.cfg.dir("endpoints.json")); err != nil && !errors.Is(err, os.ErrNotExist) {
			a.log.Debug("saving working endpoints failed", "err", err)
		}
	}
}
