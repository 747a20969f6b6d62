package tunnel

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/hashicorp/yamux"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fastTiming detects a dead tunnel within a fraction of a second (the
// keepalive test); the other tests use loadTiming.
var fastTiming = Timing{PingInterval: 50 * time.Millisecond, Timeout: 300 * time.Millisecond}

var discard = slog.New(slog.DiscardHandler)

// testServer is a tunnel server behind an HTTPS test server whose
// Authenticate trusts the X-Test-Node header (the real check is the
// server package's, tested there).
type testServer struct {
	*Server
	https *httptest.Server
	pool  *x509.CertPool
	url   string
}

func startServer(t *testing.T, ln net.Listener) *testServer {
	t.Helper()
	return startServerTiming(t, ln, loadTiming)
}

// loadTiming is for tests that load the machine (race detector, many
// streams): they are not about keepalives, and a starved reader must not
// count as a dead tunnel.
var loadTiming = Timing{PingInterval: 200 * time.Millisecond, Timeout: 10 * time.Second}

func startServerTiming(t *testing.T, ln net.Listener, timing Timing) *testServer {
	t.Helper()
	srv, err := NewServer(ServerConfig{
		Timing: timing,
		Logger: discard,
		Authenticate: func(w http.ResponseWriter, r *http.Request) (string, bool) {
			node := r.Header.Get("X-Test-Node")
			if node == "" {
				writeError(w, http.StatusUnauthorized, "unauthorized", "this call needs a node credential")
				return "", false
			}
			return node, true
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if ln == nil {
		if ln, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	hs := httptest.NewUnstartedServer(srv)
	hs.Listener.Close()
	hs.Listener = ln
	hs.Config.ErrorLog = slog.NewLogLogger(discard.Handler(), slog.LevelDebug)
	hs.StartTLS()
	ts := &testServer{Server: srv, https: hs, pool: x509.NewCertPool(), url: hs.URL}
	ts.pool.AddCert(hs.Certificate())
	t.Cleanup(ts.stop)
	return ts
}

func (ts *testServer) stop() {
	ts.Server.Close()
	ts.https.Close()
}

// startClient runs a tunnel client for node against url until the test
// ends.
func startClient(t *testing.T, url string, pool *x509.CertPool, node string, allow ...int) *Client {
	t.Helper()
	return startClientTiming(t, loadTiming, url, pool, node, allow...)
}

func startClientTiming(t *testing.T, timing Timing, url string, pool *x509.CertPool, node string, allow ...int) *Client {
	t.Helper()
	return startClientConfig(t, ClientConfig{
		ServerURL:  url,
		NodeName:   node,
		TLSConfig:  func() (*tls.Config, error) { return &tls.Config{RootCAs: pool}, nil },
		StatusPort: 1, // never listened on in tests
		AllowPorts: allow,
		Timing:     timing,
		BackoffMin: 20 * time.Millisecond,
		BackoffMax: 200 * time.Millisecond,
		Logger:     discard,
	})
}

func startClientConfig(t *testing.T, cfg ClientConfig) *Client {
	t.Helper()
	node := cfg.NodeName
	c, err := NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	// The test server's Authenticate takes the node name from
	// X-Test-Node; a real agent proves it with its certificate.
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = c.run(ctx, http.Header{"X-Test-Node": {node}})
	}()
	t.Cleanup(func() { cancel(); <-done })
	return c
}

// waitUntil polls cond every 10 ms until it holds or timeout passes.
func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			t.Fatalf("%s: not true after %v", what, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}

func connected(s *Server, node string) func() bool {
	return func() bool { return s.State(node).Connected }
}

// echoServer echoes every connection on 127.0.0.1 until the test ends
// and returns its port.
func echoServer(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			})
		}
	})
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return ln.Addr().(*net.TCPAddr).Port
}

// closedPort returns a loopback port nothing listens on.
func closedPort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return port
}

// roundTrip sends payload through c, half-closes, and checks the echo.
func roundTrip(c net.Conn, payload []byte) error {
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.Close() // a yamux stream's Close is a half close
		}
		errc <- err
	}()
	got, err := io.ReadAll(c)
	if werr := <-errc; werr != nil {
		return fmt.Errorf("write: %w", werr)
	}
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if !bytes.Equal(got, payload) {
		return fmt.Errorf("echo: got %d bytes, want %d (equal prefix %v)", len(got), len(payload), bytes.HasPrefix(payload, got))
	}
	return nil
}

func TestAllowed(t *testing.T) {
	c := ClientConfig{StatusPort: 10251, AllowPorts: []int{8080, 9000}}
	for port, want := range map[int]bool{10251: true, 8080: true, 9000: true, 22: false, 0: false, -1: false, 65535: false, 10250: false} {
		if got := c.Allowed(port); got != want {
			t.Errorf("Allowed(%d) = %v, want %v", port, got, want)
		}
	}
	none := ClientConfig{}
	if none.Allowed(0) || none.Allowed(80) {
		t.Error("a client with no ports allows some")
	}
}

func TestValidate(t *testing.T) {
	ok := func() ClientConfig {
		return ClientConfig{ServerURL: "https://192.0.2.1:6443", NodeName: "a", TLSConfig: func() (*tls.Config, error) { return nil, nil }}
	}
	for name, mod := range map[string]func(*ClientConfig){
		"no url":     func(c *ClientConfig) { c.ServerURL = "" },
		"http":       func(c *ClientConfig) { c.ServerURL = "http://192.0.2.1:6443" },
		"no node":    func(c *ClientConfig) { c.NodeName = "" },
		"no tls":     func(c *ClientConfig) { c.TLSConfig = nil },
		"bad port":   func(c *ClientConfig) { c.AllowPorts = []int{70000} },
		"bad status": func(c *ClientConfig) { c.StatusPort = -2 },
	} {
		c := ok()
		mod(&c)
		if err := c.Validate(); err == nil {
			t.Errorf("%s: Validate accepted %+v", name, c)
		}
	}
	c := ok()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.BackoffMin != DefaultBackoffMin || c.BackoffMax != DefaultBackoffMax {
		t.Errorf("backoff defaults: got %v..%v", c.BackoffMin, c.BackoffMax)
	}
	if got, want := c.connectURL(), "wss://192.0.2.1:6443/v1/connect"; got != want {
		t.Errorf("connectURL = %q, want %q", got, want)
	}
	if d := (Timing{}).DetectWithin(); d > 15*time.Second {
		t.Errorf("default keepalives detect a dead tunnel within %v, want ≤ 15s", d)
	}
}

func TestDialAllowedRefusedUnreachable(t *testing.T) {
	ts := startServer(t, nil)
	echo := echoServer(t)
	closed := closedPort(t)
	startClient(t, ts.url, ts.pool, "a", echo, closed)
	waitUntil(t, 5*time.Second, "tunnel of a up", connected(ts.Server, "a"))

	ctx := context.Background()
	c, err := ts.Dial(ctx, "a", echo)
	if err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(c, []byte("hello through the tunnel")); err != nil {
		t.Fatal(err)
	}

	notAllowed := echo + 1
	if notAllowed == closed {
		notAllowed++
	}
	_, err = ts.Dial(ctx, "a", notAllowed)
	var de *DialError
	if !errors.As(err, &de) || de.Status != StatusNotAllowed {
		t.Fatalf("dial of a port that is not allowed: got %v, want a DialError with status %v", err, StatusNotAllowed)
	}
	if want := fmt.Sprintf("--tunnel-allow-port=%d", notAllowed); !strings.Contains(err.Error(), want) {
		t.Errorf("refusal %q does not say what to do (%s)", err, want)
	}

	_, err = ts.Dial(ctx, "a", closed)
	if !errors.As(err, &de) || de.Status != StatusUnreachable {
		t.Fatalf("dial of an allowed port nobody listens on: got %v, want status %v", err, StatusUnreachable)
	}

	_, err = ts.Dial(ctx, "b", echo)
	if !errors.Is(err, ErrNoSession) {
		t.Fatalf("dial of a node without a tunnel: got %v, want ErrNoSession", err)
	}
	if _, err := ts.Dial(ctx, "a", 0); err == nil {
		t.Fatal("dial of port 0 succeeded")
	}
}

func TestConnectRefusals(t *testing.T) {
	ts := startServer(t, nil)
	d := websocket.Dialer{TLSClientConfig: &tls.Config{RootCAs: ts.pool}}
	url := "wss" + strings.TrimPrefix(ts.url, "https") + "/v1/connect"
	for name, tc := range map[string]struct {
		hdr  http.Header
		want int
	}{
		"no credential":         {http.Header{}, http.StatusUnauthorized},
		"claims another node":   {http.Header{"X-Test-Node": {"a"}, HeaderNodeName: {"b"}}, http.StatusForbidden},
		"status port not a num": {http.Header{"X-Test-Node": {"a"}, HeaderStatusPort: {"http"}}, http.StatusBadRequest},
	} {
		ws, resp, err := d.Dial(url, tc.hdr)
		if err == nil {
			ws.Close()
			t.Errorf("%s: connected, want %d", name, tc.want)
			continue
		}
		if resp == nil || resp.StatusCode != tc.want {
			t.Errorf("%s: got %v (%v), want status %d", name, resp, err, tc.want)
		}
		if e := connectError(resp, err); !strings.Contains(e.Error(), "server refused the tunnel") {
			t.Errorf("%s: error %q does not carry the server's reason", name, e)
		}
	}
	if ts.State("a").Connected || ts.State("b").Connected {
		t.Error("a refused connection registered a session")
	}
	// A plain GET is refused: anonymous, it is not told more; as a node,
	// it is told it is not a websocket.
	resp, err := ts.https.Client().Get(ts.url + "/v1/connect")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("anonymous plain GET: got %s, want 401", resp.Status)
	}
	req, _ := http.NewRequest("GET", ts.url+"/v1/connect", nil)
	req.Header.Set("X-Test-Node", "a")
	resp, err = ts.https.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("plain GET from a node: got %s, want 400", resp.Status)
	}
}

// rawSession connects as node with a bare yamux server that accepts
// streams and drops them.
func rawSession(t *testing.T, ts *testServer, node string) *yamux.Session {
	t.Helper()
	d := websocket.Dialer{TLSClientConfig: &tls.Config{RootCAs: ts.pool}}
	ws, _, err := d.Dial("wss"+strings.TrimPrefix(ts.url, "https")+"/v1/connect", http.Header{"X-Test-Node": {node}})
	if err != nil {
		t.Fatal(err)
	}
	mux, err := yamux.Server(NewConn(ws, loadTiming), yamuxConfig(discard))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mux.Close() })
	return mux
}

func TestSecondSessionReplacesFirst(t *testing.T) {
	ts := startServer(t, nil)
	first := rawSession(t, ts, "a")
	waitUntil(t, 5*time.Second, "first session registered", connected(ts.Server, "a"))
	since := ts.State("a").Since
	second := rawSession(t, ts, "a")
	select {
	case <-first.CloseChan():
	case <-time.After(5 * time.Second):
		t.Fatal("the first session of a node stays open after a second one connected")
	}
	if second.IsClosed() {
		t.Fatal("the second session was closed")
	}
	st := ts.State("a")
	if !st.Connected || !st.Since.After(since) {
		t.Errorf("state after replacement: %+v, want connected since after %v", st, since)
	}
	// Streams go to the second session.
	got := make(chan struct{})
	go func() {
		if s, err := second.AcceptStream(); err == nil {
			close(got)
			s.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, _ = ts.Dial(ctx, "a", 80) // no reply comes: the raw session drops it
	select {
	case <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("the dial did not reach the second session")
	}
	// Another node is another session: replacing is per node.
	rawSession(t, ts, "b")
	waitUntil(t, 5*time.Second, "b registered", connected(ts.Server, "b"))
	if second.IsClosed() {
		t.Fatal("b's session closed a's")
	}
	ts.Disconnect("a")
	waitUntil(t, 5*time.Second, "a disconnected", func() bool { return !ts.State("a").Connected })
	if st := ts.State("a"); st.Since.IsZero() {
		t.Error("a disconnected node has no down time")
	}
}

// freezer is a TCP proxy that can stop forwarding without closing
// anything: the connection looks alive to both ends, as across a cut link.
type freezer struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	frozen bool
	cond   *sync.Cond
	conns  []net.Conn
	closed bool
	wg     sync.WaitGroup
}

func newFreezer(t *testing.T, target string) *freezer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &freezer{ln: ln, target: target}
	f.cond = sync.NewCond(&f.mu)
	f.wg.Go(f.accept)
	t.Cleanup(f.close)
	return f
}

func (f *freezer) addr() string { return f.ln.Addr().String() }

func (f *freezer) accept() {
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", f.target)
		if err != nil {
			c.Close()
			continue
		}
		f.mu.Lock()
		f.conns = append(f.conns, c, u)
		f.mu.Unlock()
		f.wg.Go(func() { f.pipe(u, c) })
		f.wg.Go(func() { f.pipe(c, u) })
	}
}

func (f *freezer) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		f.mu.Lock()
		for f.frozen && !f.closed {
			f.cond.Wait()
		}
		closed := f.closed
		f.mu.Unlock()
		if closed {
			return
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			dst.Close()
			return
		}
	}
}

func (f *freezer) freeze(on bool) {
	f.mu.Lock()
	f.frozen = on
	f.cond.Broadcast()
	f.mu.Unlock()
}

func (f *freezer) close() {
	f.ln.Close()
	f.mu.Lock()
	f.closed = true
	f.cond.Broadcast()
	for _, c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}

func TestKeepaliveDetectsDeadTunnel(t *testing.T) {
	ts := startServerTiming(t, nil, fastTiming)
	f := newFreezer(t, ts.https.Listener.Addr().String())
	c := startClientTiming(t, fastTiming, "https://"+f.addr(), ts.pool, "a")
	waitUntil(t, 5*time.Second, "tunnel up", connected(ts.Server, "a"))
	waitUntil(t, 5*time.Second, "client reports up", func() bool { up, _ := c.State(); return up })

	f.freeze(true)
	frozeAt := time.Now()
	limit := fastTiming.DetectWithin()
	waitUntil(t, 10*limit, "the server to notice the frozen tunnel", func() bool { return !ts.State("a").Connected })
	serverTook := time.Since(frozeAt)
	waitUntil(t, 10*limit, "the client to notice the frozen tunnel", func() bool { up, _ := c.State(); return !up })
	clientTook := time.Since(frozeAt)
	t.Logf("dead tunnel noticed after %v (server), %v (client); keepalives promise %v", serverTook, clientTook, limit)
	if serverTook > 3*limit || clientTook > 3*limit {
		t.Errorf("took longer than 3× the keepalive bound %v", limit)
	}

	f.freeze(false) // new connections pass again
	d := waitUntil(t, 10*time.Second, "the tunnel to come back", connected(ts.Server, "a"))
	t.Logf("tunnel back %v after the link thawed", d)
}

func TestReconnectAfterServerRestart(t *testing.T) {
	ts := startServer(t, nil)
	addr := ts.https.Listener.Addr().String()
	echo := echoServer(t)
	startClient(t, ts.url, ts.pool, "a", echo)
	waitUntil(t, 5*time.Second, "tunnel up", connected(ts.Server, "a"))

	ts.stop()
	stopped := time.Now()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen again on %s: %v", addr, err)
	}
	ts2 := startServer(t, ln)
	d := waitUntil(t, 10*time.Second, "the tunnel to the restarted server", connected(ts2.Server, "a"))
	t.Logf("tunnel back %v after the server restarted (%v after it stopped)", d, time.Since(stopped))
	c, err := ts2.Dial(context.Background(), "a", echo)
	if err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(c, []byte("after restart")); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrentStreams(t *testing.T) {
	ts := startServerTiming(t, nil, loadTiming)
	echo := echoServer(t)
	startClientTiming(t, loadTiming, ts.url, ts.pool, "a", echo)
	waitUntil(t, 5*time.Second, "tunnel up", connected(ts.Server, "a"))

	const n, size = 50, 256 << 10
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			payload := make([]byte, size)
			_, _ = rand.Read(payload)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c, err := ts.Dial(ctx, "a", echo)
			if err != nil {
				errs <- fmt.Errorf("stream %d: %w", i, err)
				return
			}
			_ = c.SetDeadline(time.Now().Add(30 * time.Second))
			if err := roundTrip(c, payload); err != nil {
				errs <- fmt.Errorf("stream %d: %w", i, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	el := time.Since(start)
	t.Logf("%d concurrent streams × %d KiB echoed in %v (%.1f MiB/s each way)", n, size>>10, el, float64(n*size)/(1<<20)/el.Seconds())
}

func TestClientStopsWhileServerUnreachable(t *testing.T) {
	port := closedPort(t)
	c, err := NewClient(ClientConfig{
		ServerURL: fmt.Sprintf("https://127.0.0.1:%d", port), NodeName: "a",
		TLSConfig: func() (*tls.Config, error) { return &tls.Config{}, nil },
		Logger:    discard, BackoffMin: 10 * time.Millisecond, BackoffMax: 20 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- c.Run(ctx) }()
	time.Sleep(100 * time.Millisecond) // let it fail a few times
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after its context ended")
	}
	if up, since := c.State(); up || since.IsZero() {
		t.Errorf("State = %v, %v; want down since the first failure", up, since)
	}
}

func TestWebsocketConnHalfClose(t *testing.T) {
	upgrader := websocket.Upgrader{}
	serverSide := make(chan net.Conn, 1)
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := upgrader.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		serverSide <- NewConn(ws, loadTiming)
	}))
	defer hs.Close()
	ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(hs.URL, "http"), nil)
	if err != nil {
		t.Fatal(err)
	}
	client := NewConn(ws, loadTiming)
	defer client.Close()
	server := <-serverSide
	defer server.Close()

	// client → server, then the client half-closes; the server still
	// answers afterwards.
	if _, err := client.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Write(nil); err != nil { // no message: not an EOF
		t.Fatal(err)
	}
	if err := client.(closeWriter).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(server)
	if err != nil || string(got) != "request" {
		t.Fatalf("server read %q, %v", got, err)
	}
	if _, err := server.Write([]byte("response")); err != nil {
		t.Fatal(err)
	}
	server.(closeWriter).CloseWrite()
	got, err = io.ReadAll(client)
	if err != nil || string(got) != "response" {
		t.Fatalf("client read %q, %v", got, err)
	}
}

func TestAllowedAddr(t *testing.T) {
	own := []netip.Addr{netip.MustParseAddr("10.1.0.5"), netip.MustParseAddr("2001:db8::5")}
	pods := []netip.Prefix{netip.MustParsePrefix("10.42.3.0/24")}
	c := ClientConfig{NodeName: "home1", KubeletPort: 10250, AllowPorts: []int{9100}, Destinations: func() ([]netip.Addr, []netip.Prefix) { return own, pods }}
	for _, tc := range []struct {
		addr string
		port int
		ok   bool
		why  string
	}{
		{"10.1.0.5", 10250, true, ""},
		{"2001:db8::5", 10250, true, ""},
		{"10.1.0.5", 9100, true, ""},
		{"10.1.0.5", 22, false, "--tunnel-allow-port=22"},
		{"10.42.3.17", 8080, true, ""},
		{"10.42.3.1", 22, false, "--tunnel-allow-port=22"}, // the bridge's gateway: the node's own
		{"10.42.3.0", 22, false, "--tunnel-allow-port=22"}, // the tunnel address: the node's own
		{"10.42.3.1", 10250, true, ""},
		{"10.42.4.17", 8080, false, "neither an address of node home1 nor of its pods"},
		{"10.1.0.6", 10250, false, "neither an address"},
		{"192.0.2.1", 443, false, "neither an address"},
	} {
		ok, why := c.allowedAddr(netip.MustParseAddr(tc.addr), tc.port)
		if ok != tc.ok || !strings.Contains(why, tc.why) {
			t.Errorf("%s:%d: %v %q, want %v and a reason with %q", tc.addr, tc.port, ok, why, tc.ok, tc.why)
		}
	}
	if ok, _ := (&ClientConfig{KubeletPort: 10250}).allowedAddr(own[0], 10250); ok {
		t.Error("a client without Destinations reaches an address")
	}
}

// TestDialAddrRefusals checks, through a real tunnel, that a node refuses
// addresses that are not its own or its pods', and ports of its own
// addresses that are not open, with a reason for the caller.
func TestDialAddrRefusals(t *testing.T) {
	ts := startServer(t, nil)
	echo := echoServer(t)
	startClientConfig(t, ClientConfig{
		ServerURL: ts.url, NodeName: "a", Timing: loadTiming, Logger: discard,
		TLSConfig:   func() (*tls.Config, error) { return &tls.Config{RootCAs: ts.pool}, nil },
		AllowPorts:  []int{echo},
		KubeletPort: 10250,
		Destinations: func() ([]netip.Addr, []netip.Prefix) {
			return []netip.Addr{netip.MustParseAddr("10.1.0.5")}, []netip.Prefix{netip.MustParsePrefix("10.42.3.0/24")}
		},
	})
	waitUntil(t, 5*time.Second, "tunnel of a up", connected(ts.Server, "a"))
	ctx := context.Background()
	for _, dst := range []string{"192.0.2.9:10250", "10.42.9.1:80", "10.1.0.5:22"} {
		_, err := ts.DialAddr(ctx, "a", netip.MustParseAddrPort(dst))
		var de *DialError
		if !errors.As(err, &de) || de.Status != StatusNotAllowed {
			t.Errorf("dial %s: got %v, want a refusal", dst, err)
		}
	}
	// The loopback by address is the loopback: the allowed ports only.
	conn, err := ts.DialAddr(ctx, "a", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(echo)))
	if err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(conn, []byte("hello")); err != nil {
		t.Fatal(err)
	}
}
