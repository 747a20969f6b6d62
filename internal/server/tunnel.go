package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/gorilla/websocket"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/tunnel"
)

// tunnelDialTimeout bounds setting up a connection through a tunnel.
const tunnelDialTimeout = 15 * time.Second

// newTunnels returns the tunnel endpoint; agents authenticate with their
// node certificate (nodeAuth), and sessions are keyed by its node name.
func (s *Server) newTunnels() *tunnel.Server {
	t, err := tunnel.NewServer(tunnel.ServerConfig{Authenticate: s.nodeAuth, Logger: s.log})
	if err != nil {
		panic(err) // only a missing Authenticate fails
	}
	return t
}

// tunnelRoutes adds the tunnel endpoint and the admin calls that go
// through tunnels.
func (s *Server) tunnelRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET "+api.PathConnect, s.handleConnect)
	mux.HandleFunc("GET "+api.PathNodes+"/{name}/status", s.admin(s.handleNodeStatus))
	mux.HandleFunc("GET "+api.PathNodes+"/{name}/proxy/{port}", s.admin(s.handleNodeProxy))
}

func (s *Server) handleConnect(w http.ResponseWriter, r *http.Request) {
	if s.tunnels == nil {
		writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, "the server is starting; the agent will retry")
		return
	}
	s.tunnels.ServeHTTP(w, r)
}

// withTunnels fills in every node's tunnel state.
func (s *Server) withTunnels(nodes []api.Node) []api.Node {
	if s.tunnels == nil {
		return nodes
	}
	for i := range nodes {
		st := s.tunnels.State(nodes[i].Name)
		nodes[i].Tunnel = &api.TunnelStatus{Connected: st.Connected, Since: st.Since}
	}
	return nodes
}

// forgetTunnel closes a deleted node's tunnel.
func (s *Server) forgetTunnel(name string) {
	if s.tunnels != nil {
		s.tunnels.Forget(name)
	}
}

// closeTunnels ends every tunnel and proxied connection.
func (s *Server) closeTunnels() {
	if s.tunnels != nil {
		_ = s.tunnels.Close()
	}
}

// tunnelNode checks that the node exists and the tunnel endpoint runs.
func (s *Server) tunnelNode(w http.ResponseWriter, r *http.Request) (string, bool) {
	name := r.PathValue("name")
	if s.tunnels == nil {
		writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, "the server is starting; try again")
		return "", false
	}
	if _, ok := s.hub.record(name); !ok {
		writeError(w, http.StatusNotFound, api.ErrCodeNotFound, fmt.Sprintf("there is no node %q; 'trellis nodes' lists them", name))
		return "", false
	}
	return name, true
}

// writeDialError answers a failed dial through a tunnel.
func writeDialError(w http.ResponseWriter, err error) {
	var de *tunnel.DialError
	switch {
	case errors.As(err, &de) && de.Status == tunnel.StatusNotAllowed:
		writeError(w, http.StatusForbidden, api.ErrCodeTunnelRefused, de.Error())
	case errors.As(err, &de):
		writeError(w, http.StatusBadGateway, api.ErrCodeTunnelRefused, de.Error())
	case errors.Is(err, tunnel.ErrNoSession):
		writeError(w, http.StatusServiceUnavailable, api.ErrCodeTunnelDown, err.Error())
	default:
		writeError(w, http.StatusBadGateway, api.ErrCodeTunnelDown, err.Error()+"; the tunnel may be reconnecting, try again")
	}
}

// handleNodeStatus fetches the node's status from its agent through the
// tunnel.
func (s *Server) handleNodeStatus(w http.ResponseWriter, r *http.Request) {
	name, ok := s.tunnelNode(w, r)
	if !ok {
		return
	}
	port := s.tunnels.State(name).StatusPort
	if port == 0 {
		port = api.DefaultStatusPort
	}
	var dialErr error
	hc := &http.Client{
		Timeout: tunnelDialTimeout,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				c, err := s.tunnels.Dial(ctx, name, port)
				dialErr = err
				return c, err
			},
		},
	}
	req, err := http.NewRequestWithContext(r.Context(), http.MethodGet, "http://"+name+api.PathStatus, nil)
	if err != nil {
		writeError(w, http.StatusBadRequest, api.ErrCodeBadRequest, err.Error())
		return
	}
	resp, err := hc.Do(req)
	if err != nil {
		if dialErr != nil {
			writeDialError(w, dialErr)
			return
		}
		writeError(w, http.StatusBadGateway, api.ErrCodeTunnelDown, fmt.Sprintf("node %s: status request through the tunnel failed: %v", name, err))
		return
	}
	defer resp.Body.Close()
	var st api.NodeStatus
	if resp.StatusCode != http.StatusOK {
		writeError(w, http.StatusBadGateway, api.ErrCodeTunnelRefused, fmt.Sprintf("node %s: its status endpoint answered %s", name, resp.Status))
		return
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 8<<20)).Decode(&st); err != nil {
		writeError(w, http.StatusBadGateway, api.ErrCodeTunnelRefused, fmt.Sprintf("node %s: its status endpoint sent no status: %v", name, err))
		return
	}
	writeJSON(w, http.StatusOK, st)
}

var proxyUpgrader = websocket.Upgrader{ReadBufferSize: 32 << 10, WriteBufferSize: 32 << 10}

// handleNodeProxy carries one TCP connection to a port on the node's
// loopback: the request is upgraded to a websocket of binary messages
// once the node has accepted the port, so a refusal is a plain JSON error.
func (s *Server) handleNodeProxy(w http.ResponseWriter, r *http.Request) {
	name, ok := s.tunnelNode(w, r)
	if !ok {
		return
	}
	port, err := strconv.Atoi(r.PathValue("port"))
	if err != nil || port < 1 || port > 65535 {
		writeError(w, http.StatusBadRequest, api.ErrCodeBadRequest, fmt.Sprintf("port %q is not a TCP port (1-65535)", r.PathValue("port")))
		return
	}
	if !websocket.IsWebSocketUpgrade(r) {
		writeError(w, http.StatusBadRequest, api.ErrCodeBadRequest, "this endpoint takes a websocket upgrade; use 'trellis proxy NODE PORT'")
		return
	}
	release, ok := s.tunnels.Hold()
	if !ok {
		writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, "the server is shutting down")
		return
	}
	defer release()
	ctx, cancel := context.WithTimeout(r.Context(), tunnelDialTimeout)
	conn, err := s.tunnels.Dial(ctx, name, port)
	cancel()
	if err != nil {
		writeDialError(w, err)
		return
	}
	ws, err := proxyUpgrader.Upgrade(w, r, nil)
	if err != nil {
		_ = conn.Close()
		return // the upgrader has answered
	}
	_ = ws.NetConn().SetDeadline(time.Time{})
	id, _ := identity(r)
	s.log.Debug("proxy connection opened", "node", name, "port", port, "admin", id.Name, "remote", r.RemoteAddr)
	tunnel.Splice(tunnel.NewConn(ws, tunnel.Timing{}), conn)
	s.log.Debug("proxy connection closed", "node", name, "port", port)
}
