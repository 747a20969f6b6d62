package agent

import (
	"encoding/json"
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
//     netmap announces that the peer moved (its endpoint went from one IP
//     address to another). A new port on the same address, or an address
//     where the netmap knew none, is not a move but where some node saw
//     the peer's packets come from: behind a symmetric NAT that mapping
//     works for that node only, while the current endpoint is where the
//     peer's packets to this node come from. Overwriting it cut this
//     node's packets to the peer off until the peer's next packet (up to
//     a 25 s keepalive);
//   - when the netmap knows no endpoint, the one that last worked, kept
//     across restarts, is tried;
//   - otherwise the netmap's.
func chooseEndpoint(desired, lastDesired netip.AddrPort, cur *mesh.PeerStatus, remembered netip.AddrPort, now time.Time) netip.AddrPort {
	moved := desired.IsValid() && lastDesired.IsValid() && desired.Addr() != lastDesired.Addr()
	if cur != nil && !moved && cur.Endpoint.IsValid() && handshakeFresh(cur.LastHandshake, now) {
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
