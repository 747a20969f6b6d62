package server

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/pki"
	"github.com/trellis-mesh/trellis/internal/tunnel"
)

func (ts *testServer) adminCert(t *testing.T) tls.Certificate {
	certPEM, keyPEM, err := ts.ca.IssueClient("admin", pki.OrgAdmins, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func (ts *testServer) wsURL(path string) string {
	return "wss" + strings.TrimPrefix(ts.URL(), "https") + path
}

// wsDial opens a websocket to path with cert (nil: none) and returns the
// HTTP status of the handshake and the error body, if it failed.
func (ts *testServer) wsDial(t *testing.T, path string, cert *tls.Certificate, hdr http.Header) (*websocket.Conn, int, api.Error) {
	t.Helper()
	cfg := &tls.Config{RootCAs: ts.ca.Pool(), NextProtos: []string{"http/1.1"}}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	d := websocket.Dialer{TLSClientConfig: cfg, HandshakeTimeout: 5 * time.Second}
	ws, resp, err := d.Dial(ts.wsURL(path), hdr)
	if err == nil {
		t.Cleanup(func() { ws.Close() })
		return ws, resp.StatusCode, api.Error{}
	}
	if resp == nil {
		t.Fatalf("websocket %s: %v", path, err)
	}
	defer resp.Body.Close()
	var ae api.Error
	b, _ := io.ReadAll(resp.Body)
	_ = json.Unmarshal(b, &ae)
	return nil, resp.StatusCode, ae
}

// runAgentTunnel runs the agent end of a tunnel for a joined node.
func (ts *testServer) runAgentTunnel(t *testing.T, name string, cert tls.Certificate, statusPort int, allow ...int) *tunnel.Client {
	t.Helper()
	c, err := tunnel.NewClient(tunnel.ClientConfig{
		ServerURL: ts.URL(), NodeName: name,
		TLSConfig: func() (*tls.Config, error) {
			return &tls.Config{RootCAs: ts.ca.Pool(), Certificates: []tls.Certificate{cert}}, nil
		},
		StatusPort: statusPort, AllowPorts: allow,
		BackoffMin: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond,
		Logger: ts.log,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = c.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return c
}

func waitTunnel(t *testing.T, ts *testServer, name string, up bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for ts.tunnels.State(name).Connected != up {
		if time.Now().After(deadline) {
			t.Fatalf("tunnel of %s: want connected=%v after 10s", name, up)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestTunnelAuthentication(t *testing.T) {
	ts := startServer(t, t.TempDir(), nil)
	a := mustJoin(t, ts, joinReq("a", 1, pwA))
	mustJoin(t, ts, joinReq("b", 2, "password-of-node-b-0123456789"))
	admin := ts.adminCert(t)

	if _, code, _ := ts.wsDial(t, api.PathConnect, nil, nil); code != http.StatusUnauthorized {
		t.Errorf("tunnel without a credential: %d, want 401", code)
	}
	if _, code, _ := ts.wsDial(t, api.PathConnect, &admin, nil); code != http.StatusUnauthorized {
		t.Errorf("tunnel with the admin credential: %d, want 401 (only nodes open tunnels)", code)
	}
	_, code, ae := ts.wsDial(t, api.PathConnect, &a.cert, http.Header{tunnel.HeaderNodeName: {"b"}})
	if code != http.StatusForbidden || !strings.Contains(ae.Message, "only open its own tunnel") {
		t.Errorf("node a claiming b: %d %q, want 403", code, ae.Message)
	}
	if ts.tunnels.State("b").Connected {
		t.Fatal("node a registered a tunnel as b")
	}
	if _, code, _ := ts.wsDial(t, api.PathConnect, &a.cert, nil); code != http.StatusSwitchingProtocols {
		t.Fatalf("node a's own tunnel: %d, want 101", code)
	}
	waitTunnel(t, ts, "a", true)
	if ts.tunnels.State("b").Connected {
		t.Fatal("a's tunnel shows up as b's")
	}

	// A re-join retires the certificate: it opens no tunnel any more.
	again := mustJoin(t, ts, joinReq("a", 1, pwA))
	if _, code, _ := ts.wsDial(t, api.PathConnect, &a.cert, nil); code != http.StatusForbidden {
		t.Errorf("retired certificate: %d, want 403", code)
	}
	if _, code, _ := ts.wsDial(t, api.PathConnect, &again.cert, nil); code != http.StatusSwitchingProtocols {
		t.Fatalf("new certificate: %d, want 101", code)
	}

	// Deleting the node closes its tunnel, and it cannot come back.
	hr, _ := http.NewRequest(http.MethodDelete, ts.URL()+api.PathNodes+"/a", nil)
	resp, err := ts.adminClient(t).Do(hr)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("delete a: %s", resp.Status)
	}
	waitTunnel(t, ts, "a", false)
	if _, code, ae := ts.wsDial(t, api.PathConnect, &again.cert, nil); code != http.StatusForbidden || ae.Code != api.ErrCodeNodeDeleted {
		t.Errorf("deleted node: %d %+v, want 403 %s", code, ae, api.ErrCodeNodeDeleted)
	}
}

// serveOn serves h on 127.0.0.1 until the test ends and returns the port.
func serveOn(t *testing.T, h http.Handler) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close(); <-done })
	return ln.Addr().(*net.TCPAddr).Port
}

func TestTunnelAdminCalls(t *testing.T) {
	ts := startServer(t, t.TempDir(), nil)
	a := mustJoin(t, ts, joinReq("a", 1, pwA))
	b := mustJoin(t, ts, joinReq("b", 2, "password-of-node-b-0123456789"))
	statusPort := serveOn(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != api.PathStatus {
			http.NotFound(w, r)
			return
		}
		_ = json.NewEncoder(w).Encode(api.NodeStatus{Name: "a", DataPlane: "userspace", Peers: []api.PeerStatus{{Name: "b", RxBytes: 7}}})
	}))
	appPort := serveOn(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from a%s", r.URL.Path)
	}))
	hiddenPort := serveOn(t, http.NotFoundHandler())
	ts.runAgentTunnel(t, "a", a.cert, statusPort, appPort)
	waitTunnel(t, ts, "a", true)

	admin := ts.adminClient(t)
	adminCert := ts.adminCert(t)
	node := ts.client(t, &b.cert)

	// The node list carries the tunnel state.
	resp, err := admin.Get(ts.URL() + api.PathNodes)
	if err != nil {
		t.Fatal(err)
	}
	var nodes []api.Node
	err = json.NewDecoder(resp.Body).Decode(&nodes)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		want := n.Name == "a"
		if n.Tunnel == nil || n.Tunnel.Connected != want || (want && n.Tunnel.Since.IsZero()) {
			t.Errorf("node %s: tunnel %+v, want connected=%v with a time", n.Name, n.Tunnel, want)
		}
	}

	// Status through the tunnel: admin only.
	statusPath := api.PathNodes + "/a/status"
	resp, err = admin.Get(ts.URL() + statusPath)
	if err != nil {
		t.Fatal(err)
	}
	var st api.NodeStatus
	err = json.NewDecoder(resp.Body).Decode(&st)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 200 || st.Name != "a" || len(st.Peers) != 1 || st.Peers[0].RxBytes != 7 {
		t.Fatalf("status of a: %s %+v %v", resp.Status, st, err)
	}
	for path, want := range map[string]int{
		api.PathNodes + "/b/status":    http.StatusServiceUnavailable, // no tunnel
		api.PathNodes + "/nope/status": http.StatusNotFound,
	} {
		resp, err := admin.Get(ts.URL() + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("GET %s: %s, want %d", path, resp.Status, want)
		}
	}

	// A node credential reaches nothing through tunnels.
	for _, path := range []string{statusPath, fmt.Sprintf("%s/a/proxy/%d", api.PathNodes, appPort)} {
		resp, err := node.Get(ts.URL() + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("node b GET %s: %s, want 403", path, resp.Status)
		}
	}
	if _, code, _ := ts.wsDial(t, fmt.Sprintf("%s/a/proxy/%d", api.PathNodes, appPort), &b.cert, nil); code != http.StatusForbidden {
		t.Errorf("node b's proxy websocket to a: %d, want 403", code)
	}
	if _, code, _ := ts.wsDial(t, fmt.Sprintf("%s/a/proxy/%d", api.PathNodes, appPort), nil, nil); code != http.StatusUnauthorized {
		t.Errorf("anonymous proxy websocket: %d, want 401", code)
	}

	// The proxy refuses a port the node does not allow, saying how to.
	_, code, ae := ts.wsDial(t, fmt.Sprintf("%s/a/proxy/%d", api.PathNodes, hiddenPort), &adminCert, nil)
	if code != http.StatusForbidden || !strings.Contains(ae.Message, "--tunnel-allow-port") {
		t.Errorf("proxy to a port a does not allow: %d %q, want 403 naming --tunnel-allow-port", code, ae.Message)
	}
	if _, code, _ := ts.wsDial(t, api.PathNodes+"/a/proxy/0", &adminCert, nil); code != http.StatusBadRequest {
		t.Errorf("proxy to port 0: %d, want 400", code)
	}

	// 50 concurrent HTTP requests, each over its own proxied connection.
	const n = 50
	var wg sync.WaitGroup
	errs := make(chan error, n)
	start := time.Now()
	for i := range n {
		wg.Go(func() {
			ws, code, ae := ts.wsDial(t, fmt.Sprintf("%s/a/proxy/%d", api.PathNodes, appPort), &adminCert, nil)
			if ws == nil {
				errs <- fmt.Errorf("connection %d: %d %s", i, code, ae.Message)
				return
			}
			c := tunnel.NewConn(ws, tunnel.Timing{})
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(20 * time.Second))
			fmt.Fprintf(c, "GET /%d HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", i)
			b, err := io.ReadAll(c)
			if want := fmt.Sprintf("hello from a/%d", i); !strings.Contains(string(b), want) {
				errs <- fmt.Errorf("connection %d: got %q (%v), want %q", i, b, err, want)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("%d proxied HTTP requests in %v", n, time.Since(start))
}
