package agent

import (
	"encoding/json"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/tunnel"
)

// tunnelStatus is the tunnel client, set once it runs.
type tunnelStatus = atomic.Pointer[tunnel.Client]

// statusHandler serves the agent's status (api.NodeStatus) at
// api.PathStatus.
func (a *Agent) statusHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+api.PathStatus, func(w http.ResponseWriter, _ *http.Request) {
		writeStatusJSON(w, a.status(time.Now()))
	})
	mux.HandleFunc("GET "+api.PathProbe, a.handleProbe)
	return mux
}

// writeStatusJSON answers v as JSON, never cached.
func writeStatusJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_ = json.NewEncoder(w).Encode(v)
}

// status reports the node's tunnel and data plane as the loop last saw
// them (at most a status tick old).
func (a *Agent) status(now time.Time) api.NodeStatus {
	st := api.NodeStatus{Name: a.cfg.NodeName, ServerURL: a.cfg.ServerURL, DataPlane: "none", Peers: []api.PeerStatus{}, Time: now, StatusPort: a.cfg.StatusPort}
	if tc := a.tunnelState.Load(); tc != nil {
		st.Tunnel.Connected, st.Tunnel.Since = tc.State()
	}
	snap := a.loop.snapshot()
	switch {
	case a.dev != nil:
		st.DataPlane, st.Interface, st.MTU, st.ListenPort = a.dev.Kind(), a.dev.Name(), a.dev.MTU(), a.cfg.WireGuard.ListenPort
		st.Peers = append(st.Peers, snap.peers...)
	case a.vpn != nil:
		st.DataPlane, st.MTU = "vpn:"+a.vpn.p.Name(), snap.vpnMTU
	}
	return st
}
