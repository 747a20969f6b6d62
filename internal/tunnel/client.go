package tunnel

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/hashicorp/yamux"

	"github.com/trellis-mesh/trellis/internal/api"
)

// Defaults of ClientConfig.
const (
	DefaultBackoffMin = 500 * time.Millisecond
	DefaultBackoffMax = 10 * time.Second
	// localDialTimeout bounds the agent's dial of a loopback port.
	localDialTimeout = 5 * time.Second
	// requestTimeout bounds the wait for a stream's request header.
	requestTimeout = 10 * time.Second
)

// ClientConfig configures an agent's end of the tunnel.
type ClientConfig struct {
	// ServerURL is the server, https://HOST:PORT (or wss://). Required.
	ServerURL string
	// NodeName is the node the agent runs for. Required. The server
	// refuses the tunnel if the certificate names another node.
	NodeName string
	// TLSConfig returns the TLS settings of the next connection: the
	// cluster CA and the node's current certificate. It is called before
	// every attempt, so a renewed certificate is picked up. Required.
	TLSConfig func() (*tls.Config, error)
	// StatusPort is the loopback port of the agent's status endpoint. It
	// is always reachable through the tunnel; 0 means none.
	StatusPort int
	// AllowPorts are the other ports the server may reach, on the
	// loopback and on the node's own addresses (--tunnel-allow-port).
	AllowPorts []int
	// KubeletPort is the kubelet's port, which the server may reach on the
	// node's own addresses (kube-apiserver's logs, exec, port-forward);
	// 0 means none.
	KubeletPort int
	// Destinations, if set, returns the node's own addresses (where the
	// kubelet and the allowed ports are reached) and its pod CIDRs (whose
	// addresses are reached at any port: port-forward to a pod, the
	// API server's pod and service proxy). It is asked at every stream.
	// Nil allows the loopback only.
	Destinations func() (own []netip.Addr, pods []netip.Prefix)
	// Timing sets the keepalives; zero fields get the defaults.
	Timing Timing
	// BackoffMin and BackoffMax bound the wait between attempts, which
	// doubles after every failure and carries ±20 % jitter. Defaults
	// DefaultBackoffMin and DefaultBackoffMax.
	BackoffMin, BackoffMax time.Duration
	// Logger receives the tunnel's logs. Default slog.Default().
	Logger *slog.Logger
}

// Validate fills in defaults and checks the values.
func (c *ClientConfig) Validate() error {
	u, err := url.Parse(c.ServerURL)
	if err != nil || u.Host == "" {
		return fmt.Errorf("tunnel: server URL %q is not valid: use https://<server>:6443", c.ServerURL)
	}
	switch u.Scheme {
	case "https", "wss":
	default:
		return fmt.Errorf("tunnel: server URL %q must start with https://", c.ServerURL)
	}
	if c.NodeName == "" {
		return errors.New("tunnel: node name is empty")
	}
	if c.TLSConfig == nil {
		return errors.New("tunnel: TLSConfig is required")
	}
	for _, p := range append([]int{c.StatusPort, c.KubeletPort}, c.AllowPorts...) {
		if p < 0 || p > 65535 {
			return fmt.Errorf("tunnel: port %d is out of range 1-65535", p)
		}
	}
	if c.BackoffMin <= 0 {
		c.BackoffMin = DefaultBackoffMin
	}
	if c.BackoffMax < c.BackoffMin {
		c.BackoffMax = max(DefaultBackoffMax, c.BackoffMin)
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

// Allowed reports whether the tunnel may reach port on the loopback: the
// status port and the allowed ports.
func (c *ClientConfig) Allowed(port int) bool {
	return port > 0 && (port == c.StatusPort || slices.Contains(c.AllowPorts, port))
}

// allowedAddr says whether the tunnel may reach addr:port (addr not the
// loopback), and if not, why, in a sentence for the server's caller: the
// node's own addresses at the kubelet port and the allowed ports, and the
// addresses of its pods at any port. Nothing else: the tunnel is not a
// way into the node's networks. The first two addresses of a pod CIDR
// (the node's tunnel address and the bridge's gateway) are the node's
// own, whether or not the host's address list has them yet.
func (c *ClientConfig) allowedAddr(addr netip.Addr, port int) (bool, string) {
	var own []netip.Addr
	var pods []netip.Prefix
	if c.Destinations != nil {
		own, pods = c.Destinations()
	}
	hostOfPods := slices.ContainsFunc(pods, func(p netip.Prefix) bool {
		first := p.Masked().Addr()
		return addr == first || addr == first.Next()
	})
	switch {
	case slices.Contains(own, addr) || hostOfPods:
		if port > 0 && (port == c.KubeletPort || slices.Contains(c.AllowPorts, port)) {
			return true, ""
		}
		return false, fmt.Sprintf("port %d of node %s's address %s is not open to the tunnel (the kubelet's port %d and --tunnel-allow-port are); to open it, restart that node's agent with --tunnel-allow-port=%d",
			port, c.NodeName, addr, c.KubeletPort, port)
	case slices.ContainsFunc(pods, func(p netip.Prefix) bool { return p.Contains(addr) }):
		return true, ""
	}
	return false, fmt.Sprintf("%s is neither an address of node %s nor of its pods; the tunnel reaches only those", addr, c.NodeName)
}

// destination is where a stream for addr:port (an invalid addr: the
// loopback) goes, or why it may not (a sentence for the server's caller).
func (c *ClientConfig) destination(addr netip.Addr, port int) (netip.AddrPort, string) {
	if addr.IsValid() && !addr.IsLoopback() {
		if ok, why := c.allowedAddr(addr, port); !ok {
			return netip.AddrPort{}, why
		}
		return netip.AddrPortFrom(addr, uint16(port)), ""
	}
	if !c.Allowed(port) {
		return netip.AddrPort{}, fmt.Sprintf("port %d is not open to the tunnel on node %s; to open it, restart that node's agent with --tunnel-allow-port=%d",
			port, c.NodeName, port)
	}
	if !addr.IsValid() {
		addr = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	return netip.AddrPortFrom(addr, uint16(port)), ""
}

// connectURL returns the websocket URL of the connect path.
func (c *ClientConfig) connectURL() string {
	u, _ := url.Parse(c.ServerURL)
	u.Scheme = "wss"
	u.Path = strings.TrimSuffix(u.Path, "/") + api.PathConnect
	u.RawQuery = ""
	return u.String()
}

// Client is an agent's end of the tunnel: it keeps one websocket to the
// server open, reconnecting forever, and serves the streams the server
// opens.
type Client struct {
	cfg ClientConfig
	log *slog.Logger

	mu        sync.Mutex
	connected bool      // guarded by mu
	since     time.Time // guarded by mu; of the last transition
	connects  int64     // guarded by mu; times the tunnel came up
}

// NewClient returns a client; Run starts it.
func NewClient(cfg ClientConfig) (*Client, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Client{cfg: cfg, log: cfg.Logger.With("server", cfg.ServerURL)}, nil
}

// State reports whether the tunnel is up and since when (or since when it
// is down; zero before the first attempt ended).
func (c *Client) State() (connected bool, since time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.connected, c.since
}

func (c *Client) setState(up bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if up && !c.connected {
		c.connects++
	}
	c.connected, c.since = up, time.Now()
}

// Connects reports how many times the tunnel came up since the client
// started: 1 for a tunnel that never dropped.
func (c *Client) Connects() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.connects
}

// Run keeps the tunnel up until ctx ends, then closes it and waits for
// every stream it serves. It logs once per transition (up, down), not per
// failed attempt.
func (c *Client) Run(ctx context.Context) error { return c.run(ctx, nil) }

// run is Run with extra request headers (tests).
func (c *Client) run(ctx context.Context, extra http.Header) error {
	warned := false
	for attempt := 0; ; attempt++ {
		up, err := c.session(ctx, extra)
		if ctx.Err() != nil {
			if up {
				c.setState(false)
			}
			return nil
		}
		if up {
			c.setState(false)
			c.log.Warn("tunnel down; reconnecting", "err", err)
			attempt, warned = 0, true
		} else if !warned {
			c.log.Warn("tunnel not connected; retrying in the background", "err", err)
			warned = true
			c.mu.Lock()
			if c.since.IsZero() {
				c.since = time.Now()
			}
			c.mu.Unlock()
		} else {
			c.log.Debug("tunnel attempt failed", "err", err)
		}
		t := time.NewTimer(c.backoff(attempt))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

func (c *Client) backoff(n int) time.Duration {
	d := c.cfg.BackoffMin << min(n, 16)
	if d <= 0 || d > c.cfg.BackoffMax {
		d = c.cfg.BackoffMax
	}
	return time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
}

// session opens one tunnel and serves it until it ends. up reports
// whether it was established.
func (c *Client) session(ctx context.Context, extra http.Header) (up bool, err error) {
	tc, err := c.cfg.TLSConfig()
	if err != nil {
		return false, fmt.Errorf("tunnel credentials: %w", err)
	}
	tc = tc.Clone()
	tc.NextProtos = []string{"http/1.1"} // websockets need HTTP/1.1
	d := websocket.Dialer{
		NetDialContext:   (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 15 * time.Second}).DialContext,
		TLSClientConfig:  tc,
		HandshakeTimeout: 10 * time.Second,
		ReadBufferSize:   32 << 10,
		WriteBufferSize:  32 << 10,
	}
	hdr := extra.Clone()
	if hdr == nil {
		hdr = http.Header{}
	}
	hdr.Set(HeaderNodeName, c.cfg.NodeName)
	if c.cfg.StatusPort > 0 {
		hdr.Set(HeaderStatusPort, strconv.Itoa(c.cfg.StatusPort))
	}
	ws, resp, err := d.DialContext(ctx, c.cfg.connectURL(), hdr)
	if err != nil {
		return false, connectError(resp, err)
	}
	conn := NewConn(ws, c.cfg.Timing)
	mux, err := yamux.Server(conn, yamuxConfig(c.log))
	if err != nil {
		_ = conn.Close()
		return false, err
	}
	stop := context.AfterFunc(ctx, func() { _ = mux.Close() })
	defer stop()
	c.setState(true)
	c.log.Info("tunnel up")

	var streams sync.WaitGroup
	defer streams.Wait()
	defer mux.Close()
	for {
		st, err := mux.AcceptStream()
		if err != nil {
			if errors.Is(err, yamux.ErrSessionShutdown) {
				// Say why: keepalive timeout, server gone, ...
				select {
				case <-mux.CloseChan():
				default:
				}
				return true, errors.New("the session ended (server closed it, or keepalives failed)")
			}
			return true, err
		}
		streams.Go(func() { c.serveStream(st) })
	}
}

// connectError turns a failed websocket handshake into an error that
// carries the server's explanation.
func connectError(resp *http.Response, err error) error {
	if resp == nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	var ae api.Error
	if json.Unmarshal(body, &ae) == nil && ae.Message != "" {
		return fmt.Errorf("server refused the tunnel (%s): %s", resp.Status, ae.Message)
	}
	if msg := bytes.TrimSpace(body); len(msg) > 0 {
		return fmt.Errorf("server refused the tunnel (%s): %s", resp.Status, msg)
	}
	return fmt.Errorf("server refused the tunnel (%s): %w", resp.Status, err)
}

// serveStream answers one stream: checks its destination and splices it to
// the connection to it.
func (c *Client) serveStream(st *yamux.Stream) {
	_ = st.SetDeadline(time.Now().Add(requestTimeout))
	addr, port, err := readRequest(st)
	if err != nil {
		_, _ = st.Write(encodeReply(StatusBadRequest, err.Error()))
		_ = st.Close()
		return
	}
	dst, why := c.cfg.destination(addr, port)
	if why != "" {
		c.log.Info("tunnel refused a destination that is not allowed", "address", addr, "port", port)
		_, _ = st.Write(encodeReply(StatusNotAllowed, why))
		_ = st.Close()
		return
	}
	local, err := net.DialTimeout("tcp", dst.String(), localDialTimeout)
	if err != nil {
		_, _ = st.Write(encodeReply(StatusUnreachable, fmt.Sprintf(
			"nothing accepts connections on %s on node %s (%v); is the service running?", dst, c.cfg.NodeName, err)))
		_ = st.Close()
		return
	}
	if _, err := st.Write(encodeReply(StatusOK, "")); err != nil {
		_ = st.Close()
		_ = local.Close()
		return
	}
	_ = st.SetDeadline(time.Time{})
	Splice(st, local)
}
