package cli

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/agent"
	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/server"
)

func freePort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// TestProxyThroughServerAndAgent runs a server and an agent (no data
// plane) in this process and proxies 50 concurrent HTTP requests to a
// service on the agent's loopback, as `trellis proxy` does.
func TestProxyThroughServerAndAgent(t *testing.T) {
	dir := t.TempDir()
	log := slog.New(slog.DiscardHandler)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.Start(context.Background(), server.Config{DataDir: dir, NodeName: "srv", Listener: ln, Logger: log,
		NodeIPs: []netip.Addr{netip.MustParseAddr("10.1.0.10")}})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()

	app := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello %s", r.URL.Path)
	})}
	appLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go app.Serve(appLn)
	defer app.Close()
	appPort := appLn.Addr().(*net.TCPAddr).Port

	ctx, cancel := context.WithCancel(context.Background())
	agentDone := make(chan error, 1)
	go func() {
		agentDone <- agent.Run(ctx, agent.Config{
			ServerURL: srv.URL(), Token: srv.Token(), DataDir: t.TempDir(), NodeName: "a",
			NodeIPs:    []netip.Addr{netip.MustParseAddr("10.1.0.20")},
			StatusPort: freePort(t), TunnelAllowPorts: []int{appPort}, Logger: log,
		})
	}()
	defer func() {
		cancel()
		if err := <-agentDone; err != nil {
			t.Errorf("agent: %v", err)
		}
	}()

	c, err := Load(filepath.Join(dir, "server", "admin.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		nodes, err := c.Nodes(ctx)
		if err == nil && len(nodes) == 1 && nodes[0].Tunnel != nil && nodes[0].Tunnel.Connected {
			var b bytes.Buffer
			if err := PrintNodes(&b, nodes, "table", time.Now()); err != nil || !strings.Contains(b.String(), "TUNNEL") || !strings.Contains(b.String(), "up ") {
				t.Errorf("node table without the tunnel column: %v\n%s", err, b.String())
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent a's tunnel not up after 20s: %+v %v", nodes, err)
		}
		time.Sleep(50 * time.Millisecond)
	}

	st, err := c.NodeStatus(ctx, "a")
	if err != nil || st.Name != "a" || !st.Tunnel.Connected || st.DataPlane != "none" {
		t.Fatalf("status of a: %+v, %v", st, err)
	}
	var b bytes.Buffer
	if err := PrintStatus(&b, st, "table", time.Now()); err != nil || !strings.Contains(b.String(), "TUNNEL:") {
		t.Errorf("status table: %v\n%s", err, b.String())
	}

	// A port a does not allow is refused, naming the flag.
	if _, err := c.DialNode(ctx, "a", appPort+1); err == nil || !strings.Contains(err.Error(), "--tunnel-allow-port") {
		t.Errorf("dial of a port a does not allow: %v, want an error naming --tunnel-allow-port", err)
	}

	pln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pctx, stopProxy := context.WithCancel(ctx)
	proxyDone := make(chan error, 1)
	go func() { proxyDone <- c.Proxy(pctx, "a", appPort, pln, log) }()

	const n = 50
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 20 * time.Second}
	var wg sync.WaitGroup
	errs := make(chan error, n)
	start := time.Now()
	for i := range n {
		wg.Go(func() {
			resp, err := hc.Get(fmt.Sprintf("http://%s/%d", pln.Addr(), i))
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			if want := fmt.Sprintf("hello /%d", i); string(body) != want {
				errs <- fmt.Errorf("request %d: got %q, want %q", i, body, want)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("%d concurrent requests through trellis proxy in %v", n, time.Since(start))
	stopProxy()
	if err := <-proxyDone; err != nil {
		t.Errorf("Proxy: %v", err)
	}
}

func TestTunnelColumn(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		in   *api.TunnelStatus
		want string
	}{
		{nil, "-"},
		{&api.TunnelStatus{}, "down"},
		{&api.TunnelStatus{Connected: true, Since: now.Add(-5 * time.Minute)}, "up 5m"},
		{&api.TunnelStatus{Since: now.Add(-30 * time.Second)}, "down 30s"},
	} {
		if got := TunnelColumn(tc.in, now); got != tc.want {
			t.Errorf("TunnelColumn(%+v) = %q, want %q", tc.in, got, tc.want)
		}
	}
	if got := bytesString(1536); got != "1.5 KiB" {
		t.Errorf("bytesString(1536) = %q", got)
	}
}
