package tunnel

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/hashicorp/yamux"

	"github.com/trellis-mesh/trellis/internal/api"
)

// ServerConfig configures a Server.
type ServerConfig struct {
	// Authenticate checks the credential of a connect request and returns
	// the node it belongs to. When it returns false it has written the
	// response. Required.
	Authenticate func(w http.ResponseWriter, r *http.Request) (node string, ok bool)
	// Timing sets the keepalives; zero fields get the defaults.
	Timing Timing
	// Logger receives the server's tunnel logs. Default slog.Default().
	Logger *slog.Logger
}

// Server accepts the agents' tunnels (it is the http.Handler of the
// connect path) and dials node-local ports through them. Create it with
// NewServer; stop it with Close.
type Server struct {
	cfg      ServerConfig
	log      *slog.Logger
	upgrader websocket.Upgrader

	mu       sync.Mutex
	closed   bool                 // guarded by mu
	sessions map[string]*session  // guarded by mu; by node name
	down     map[string]time.Time // guarded by mu; when a node's last session ended
	serving  sync.WaitGroup       // ServeHTTP calls holding a session, and Holds
}

type session struct {
	node       string
	mux        *yamux.Session
	since      time.Time
	statusPort int
	remote     string
}

// NewServer returns a Server.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Authenticate == nil {
		return nil, errors.New("tunnel server: Authenticate is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Server{
		cfg: cfg,
		log: cfg.Logger,
		upgrader: websocket.Upgrader{
			ReadBufferSize:  32 << 10,
			WriteBufferSize: 32 << 10,
			// The default origin check stays: agents send no Origin, and
			// a browser holding a node certificate must not be usable.
		},
		sessions: map[string]*session{},
		down:     map[string]time.Time{},
	}, nil
}

// State is what the server knows about one node's tunnel.
type State struct {
	// Connected reports whether the node has a tunnel now.
	Connected bool
	// Since is when the tunnel came up (Connected) or went down; zero if
	// the node has not connected since this server started.
	Since time.Time
	// StatusPort is the node's status port, as its agent announced it;
	// 0 if unknown or not connected.
	StatusPort int
}

// State returns the tunnel state of node.
func (s *Server) State(node string) State {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ss := s.sessions[node]; ss != nil {
		return State{Connected: true, Since: ss.since, StatusPort: ss.statusPort}
	}
	return State{Since: s.down[node]}
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(api.Error{Code: code, Message: msg})
}

// ServeHTTP upgrades an authenticated agent's request to a websocket and
// holds its session until it ends.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// Authenticate first: an anonymous caller learns nothing, not even
	// what the endpoint expects.
	node, ok := s.cfg.Authenticate(w, r)
	if !ok {
		return
	}
	if !websocket.IsWebSocketUpgrade(r) {
		writeError(w, http.StatusBadRequest, api.ErrCodeBadRequest, "this endpoint takes a websocket upgrade from a trellis agent")
		return
	}
	if claimed := r.Header.Get(HeaderNodeName); claimed != "" && claimed != node {
		s.log.Warn("tunnel refused: the agent claims another node's name", "node", node, "claimed", claimed, "remote", r.RemoteAddr)
		writeError(w, http.StatusForbidden, api.ErrCodeForbidden, fmt.Sprintf("the certificate belongs to node %q, not %q; a node can only open its own tunnel", node, claimed))
		return
	}
	statusPort := 0
	if v := r.Header.Get(HeaderStatusPort); v != "" {
		p, err := strconv.Atoi(v)
		if err != nil || p < 1 || p > 65535 {
			writeError(w, http.StatusBadRequest, api.ErrCodeBadRequest, fmt.Sprintf("%s %q is not a port number", HeaderStatusPort, v))
			return
		}
		statusPort = p
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, "the server is shutting down; the agent will reconnect")
		return
	}
	s.serving.Add(1)
	s.mu.Unlock()
	defer s.serving.Done()

	ws, err := s.upgrader.Upgrade(w, r, nil)
	if err != nil {
		s.log.Debug("tunnel upgrade failed", "node", node, "err", err)
		return // the upgrader has answered
	}
	// The HTTP server's read and write timeouts must not cut the tunnel.
	_ = ws.NetConn().SetDeadline(time.Time{})
	conn := NewConn(ws, s.cfg.Timing)
	mux, err := yamux.Client(conn, yamuxConfig(s.log.With("node", node)))
	if err != nil {
		_ = conn.Close()
		s.log.Error("tunnel session failed", "node", node, "err", err)
		return
	}
	ss := &session{node: node, mux: mux, since: time.Now(), statusPort: statusPort, remote: r.RemoteAddr}
	if !s.register(ss) {
		_ = mux.Close()
		return
	}
	s.log.Info("tunnel up", "node", node, "remote", r.RemoteAddr)
	<-mux.CloseChan()
	_ = mux.Close() // waits for yamux's goroutines
	if s.unregister(ss) {
		s.log.Info("tunnel down", "node", node, "remote", r.RemoteAddr, "up", time.Since(ss.since).Round(time.Second))
	}
}

// register makes ss the node's session, closing the one it replaces.
func (s *Server) register(ss *session) bool {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return false
	}
	old := s.sessions[ss.node]
	s.sessions[ss.node] = ss
	s.mu.Unlock()
	if old != nil {
		s.log.Info("tunnel replaced by a new connection of the same node", "node", ss.node, "old", old.remote, "new", ss.remote)
		_ = old.mux.Close()
	}
	return true
}

// unregister removes ss if it is still the node's session.
func (s *Server) unregister(ss *session) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sessions[ss.node] != ss {
		return false
	}
	delete(s.sessions, ss.node)
	s.down[ss.node] = time.Now()
	return true
}

// Disconnect closes node's tunnel, if it has one (the node was deleted).
func (s *Server) Disconnect(node string) {
	s.mu.Lock()
	ss := s.sessions[node]
	s.mu.Unlock()
	if ss != nil {
		_ = ss.mux.Close()
	}
}

// Forget drops what the server remembers about a node that is gone.
func (s *Server) Forget(node string) {
	s.Disconnect(node)
	s.mu.Lock()
	delete(s.down, node)
	s.mu.Unlock()
}

// Dial opens a connection to 127.0.0.1:port on node through its tunnel.
// It fails with an error wrapping ErrNoSession if the node has no tunnel,
// and with a *DialError if the node refuses the port or cannot reach it.
// ctx bounds the set-up only, not the connection.
func (s *Server) Dial(ctx context.Context, node string, port int) (net.Conn, error) {
	if port < 1 || port > 65535 {
		return nil, fmt.Errorf("dial node %s: port %d is out of range 1-65535", node, port)
	}
	return s.DialAddr(ctx, node, netip.AddrPortFrom(netip.Addr{}, uint16(port)))
}

// DialAddr is Dial to another address of the node (its node IP, a pod's
// address); an invalid address means the loopback. The node decides what
// it lets the tunnel reach (ClientConfig.Destinations).
func (s *Server) DialAddr(ctx context.Context, node string, dst netip.AddrPort) (net.Conn, error) {
	port := int(dst.Port())
	req, err := encodeRequest(dst.Addr(), port)
	if err != nil {
		return nil, fmt.Errorf("dial node %s: %w", node, err)
	}
	s.mu.Lock()
	ss := s.sessions[node]
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return nil, fmt.Errorf("dial node %s: %w", node, ErrClosed)
	}
	if ss == nil {
		return nil, fmt.Errorf("node %s: %w; check that its agent runs and can reach the server ('trellis nodes' shows the tunnel column)", node, ErrNoSession)
	}
	st, err := ss.mux.OpenStream()
	if err != nil {
		return nil, fmt.Errorf("open a stream to node %s: %w", node, err)
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(15 * time.Second)
	}
	_ = st.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = st.SetDeadline(time.Now()) })
	status, msg, err := func() (Status, string, error) {
		if _, err := st.Write(req); err != nil {
			return 0, "", fmt.Errorf("send stream request: %w", err)
		}
		return readReply(st)
	}()
	stop()
	if err != nil {
		_ = st.Close()
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, fmt.Errorf("dial node %s port %d: %w", node, port, err)
	}
	if status != StatusOK {
		_ = st.Close()
		return nil, &DialError{Node: node, Port: port, Status: status, Message: msg}
	}
	_ = st.SetDeadline(time.Time{})
	return st, nil
}

// Hold registers a caller that serves a connection from Dial (a proxy)
// so that Close waits for it; Close ends its stream by ending the
// sessions. It returns false after Close. Call release when done.
func (s *Server) Hold() (release func(), ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, false
	}
	s.serving.Add(1)
	return sync.OnceFunc(s.serving.Done), true
}

// Close ends every session and waits for them and for the holders. It is
// idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	sessions := make([]*session, 0, len(s.sessions))
	for _, ss := range s.sessions {
		sessions = append(sessions, ss)
	}
	s.mu.Unlock()
	for _, ss := range sessions {
		_ = ss.mux.Close()
	}
	s.serving.Wait()
	return nil
}
