package client_test

// The typed calls against a real server in this process: the paths,
// bodies and answers are the server's own, not a mock's.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/client"
	"github.com/trellis-mesh/trellis/internal/pki"
	"github.com/trellis-mesh/trellis/internal/server"
	"github.com/trellis-mesh/trellis/internal/token"
	"github.com/trellis-mesh/trellis/internal/tunnel"
)

type testServer struct {
	*server.Server
	dir string
	ca  []byte
}

func startServer(t *testing.T) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	s, err := server.Start(context.Background(), server.Config{DataDir: dir, NodeName: "srv", Listener: ln,
		Logger: slog.New(slog.DiscardHandler), NodeIPs: []netip.Addr{netip.MustParseAddr("10.1.0.10")}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	ca, err := os.ReadFile(filepath.Join(dir, "server", "tls", pki.CACertFile))
	if err != nil {
		t.Fatal(err)
	}
	return &testServer{Server: s, dir: dir, ca: ca}
}

// admin returns a client with the server's admin config.
func (ts *testServer) admin(t *testing.T) *client.Client {
	t.Helper()
	cfg, err := client.ReadAdminConfig(filepath.Join(ts.dir, "server", "admin.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	c, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func newClient(t *testing.T, cfg client.Config) *client.Client {
	t.Helper()
	c, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// join joins node name (k: its key and addresses) and returns a client
// with its certificate.
func (ts *testServer) join(t *testing.T, name string, k byte) (*client.Client, *api.JoinResponse) {
	t.Helper()
	keyPEM, csr, err := pki.NewKeyAndCSR()
	if err != nil {
		t.Fatal(err)
	}
	boot := newClient(t, client.Config{URL: ts.URL(), CA: ts.ca})
	jr, err := boot.Join(context.Background(), ts.Token(), joinReq(name, k, csr))
	if err != nil {
		t.Fatalf("join %s: %v", name, err)
	}
	cert, err := tls.X509KeyPair(jr.Certificate, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return newClient(t, client.Config{URL: ts.URL(), CA: ts.ca, Certificate: &cert}), jr
}

func joinReq(name string, k byte, csr []byte) api.JoinRequest {
	return api.JoinRequest{
		NodeName: name, NodePassword: "password-of-" + name + "-0123456789", PublicKey: api.Key{k}, CSR: csr, ListenPort: 51820,
		InternalIPs: []netip.Addr{netip.AddrFrom4([4]byte{10, k, 0, 1})},
		ExternalIPs: []netip.Addr{netip.AddrFrom4([4]byte{203, 0, 113, k})},
	}
}

// wantRefusal checks that err is the server's refusal of op with status
// and code.
func wantRefusal(t *testing.T, err error, op string, status int, code string) *client.Error {
	t.Helper()
	var e *client.Error
	if !errors.As(err, &e) || e.Status != status || e.API.Code != code {
		t.Fatalf("err = %v, want a refusal %d %s", err, status, code)
	}
	if !strings.HasPrefix(err.Error(), op+" https://127.0.0.1:") {
		t.Errorf("%q does not begin with the operation %q and the server", err, op)
	}
	if client.IsPermanent(err) != (status/100 == 4 && status != http.StatusTooManyRequests) {
		t.Errorf("IsPermanent(%v) = %v", err, client.IsPermanent(err))
	}
	return e
}

func TestFetchCA(t *testing.T) {
	ts := startServer(t)
	ctx := context.Background()
	tok, err := token.Parse(ts.Token())
	if err != nil {
		t.Fatal(err)
	}
	ca, err := client.FetchCA(ctx, ts.URL()+"/", tok)
	if err != nil || !bytes.Equal(ca, ts.ca) {
		t.Fatalf("FetchCA = %d bytes, %v; want the server's CA", len(ca), err)
	}
	// Without a CA hash: trusted on first use.
	if ca, err := client.FetchCA(ctx, ts.URL(), token.Token{Kind: token.KindNode, Secret: "s"}); err != nil || !bytes.Equal(ca, ts.ca) {
		t.Fatalf("FetchCA without a hash = %v; want the CA", err)
	}
	// A token of another cluster is refused, naming the CA presented.
	_, err = client.FetchCA(ctx, ts.URL(), token.New([]byte("another CA"), token.KindNode, "s"))
	var m *client.CAMismatchError
	sum := sha256.Sum256(ts.ca)
	if !errors.As(err, &m) || !client.IsPermanent(err) || !strings.Contains(err.Error(), hex.EncodeToString(sum[:])[:16]) ||
		!strings.Contains(err.Error(), "presents a CA") || !strings.Contains(err.Error(), ts.URL()) {
		t.Errorf("another cluster's token: %v; want a permanent CA mismatch naming the hash", err)
	}
	// Nothing listens: unreachable, and worth retrying.
	_, err = client.FetchCA(ctx, closedURL(t), tok)
	var u *client.UnreachableError
	if !errors.As(err, &u) || client.IsPermanent(err) || !strings.HasPrefix(err.Error(), "fetch CA https://127.0.0.1:") {
		t.Errorf("closed port: %v; want an UnreachableError", err)
	}
}

// closedURL is an https URL of a loopback port nothing listens on.
func closedURL(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	return "https://" + ln.Addr().String()
}

// TestNodeCalls: join, the netmap stream with deltas and resuming,
// reports, and the end of the stream of a deleted node.
func TestNodeCalls(t *testing.T) {
	ts := startServer(t)
	ctx := context.Background()
	admin := ts.admin(t)

	boot := newClient(t, client.Config{URL: ts.URL(), CA: ts.ca})
	_, err := boot.Join(ctx, "K10::server:wrong-secret", joinReq("a", 1, nil))
	wantRefusal(t, err, "join", http.StatusUnauthorized, api.ErrCodeUnauthorized)

	a, jr := ts.join(t, "a", 1)
	if jr.Node.Name != "a" || len(jr.Node.PodCIDRs) == 0 || len(jr.Certificate) == 0 {
		t.Fatalf("join answer %+v", jr)
	}
	// The name is taken by a's password.
	_, csr, _ := pki.NewKeyAndCSR()
	req := joinReq("a", 3, csr)
	req.NodePassword = "another-password-0123456789"
	_, err = boot.Join(ctx, ts.Token(), req)
	wantRefusal(t, err, "join", http.StatusConflict, api.ErrCodeNameTaken)

	type update struct {
		nm    api.NetMap
		delta bool
	}
	follow := func(last *api.NetMap) (chan update, func() error) {
		ch := make(chan update, 16)
		sctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() {
			done <- a.StreamNetmaps(sctx, last, func(nm api.NetMap, delta bool) {
				select {
				case ch <- update{nm, delta}:
				case <-sctx.Done():
				}
			})
		}()
		return ch, func() error { cancel(); return <-done }
	}
	next := func(ch chan update, what string) update {
		t.Helper()
		select {
		case u := <-ch:
			return u
		case <-time.After(10 * time.Second):
			t.Fatalf("no netmap: %s", what)
		}
		return update{}
	}
	ch, stop := follow(nil)
	first := next(ch, "first")
	if first.delta || first.nm.Self.Name != "a" || len(first.nm.Peers) != 0 {
		t.Fatalf("first netmap %+v", first)
	}
	b, _ := ts.join(t, "b", 2)
	u := next(ch, "after b joined")
	if !u.delta || len(u.nm.Peers) != 1 || u.nm.Peers[0].Name != "b" {
		t.Fatalf("after b joined: %+v, want b as a delta", u)
	}
	ext := netip.MustParseAddr("198.51.100.7")
	if err := b.Report(ctx, api.Report{ExternalIPs: []netip.Addr{ext}}); err != nil {
		t.Fatal(err)
	}
	for u.nm.Peers[0].Endpoint.Addr() != ext {
		u = next(ch, "after b's report")
	}
	if err := stop(); !errors.Is(err, context.Canceled) {
		t.Errorf("stream stopped: %v, want context.Canceled", err)
	}
	nodes, err := admin.Nodes(ctx)
	if err != nil || len(nodes) != 2 {
		t.Fatalf("nodes = %+v, %v", nodes, err)
	}

	// Resuming from the last netmap: the server starts with a delta.
	last := u.nm
	ch, stop = follow(&last)
	if r := next(ch, "resumed"); !r.delta || r.nm.Version < last.Version || len(r.nm.Peers) != 1 {
		t.Errorf("resumed stream began with %+v, want a delta to the same netmap", r)
	}
	_ = stop()

	// A node cannot list nodes; a is deleted, and its stream ends for
	// good.
	_, err = a.Nodes(ctx)
	wantRefusal(t, err, "list nodes", http.StatusForbidden, api.ErrCodeForbidden)
	if err := admin.DeleteNode(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	err = a.StreamNetmaps(ctx, nil, func(api.NetMap, bool) {})
	if e := wantRefusal(t, err, "netmap stream", http.StatusForbidden, api.ErrCodeNodeDeleted); !strings.Contains(e.API.Message, "was deleted") {
		t.Errorf("deleted node: %v", err)
	}
	err = a.Report(ctx, api.Report{})
	wantRefusal(t, err, "report", http.StatusForbidden, api.ErrCodeNodeDeleted)
	err = admin.DeleteNode(ctx, "a")
	wantRefusal(t, err, "delete node a", http.StatusNotFound, api.ErrCodeNotFound)
}

func TestAdminCalls(t *testing.T) {
	ts := startServer(t)
	ctx := context.Background()
	admin := ts.admin(t)
	if admin.Base() != ts.URL() {
		t.Errorf("admin config names %s, want %s", admin.Base(), ts.URL())
	}
	ts.join(t, "a", 1)
	ts.join(t, "b", 2)
	// The server learns of joins through its store's watch: wait for it.
	var paths []api.Path
	var err error
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if paths, err = admin.Paths(ctx); err != nil || len(paths) == 2 || time.Now().After(deadline) {
			break
		}
	}
	if err != nil || len(paths) != 2 {
		t.Fatalf("paths = %+v, %v; want a→b and b→a", paths, err)
	}
	// No tunnel: the status cannot be fetched.
	_, err = admin.NodeStatus(ctx, "a")
	var e *client.Error
	if !errors.As(err, &e) || e.API.Code != api.ErrCodeTunnelDown || !strings.HasPrefix(err.Error(), "status of node a https://") {
		t.Errorf("status of a node without a tunnel: %v", err)
	}
	_, err = admin.NodeStatus(ctx, "nobody")
	wantRefusal(t, err, "status of node nobody", http.StatusNotFound, api.ErrCodeNotFound)

	// Tokens: create, list, join with it, revoke, rotate.
	ti, err := admin.CreateToken(ctx, 90*time.Minute, "ci")
	if err != nil || ti.Token == "" || ti.Description != "ci" || ti.ExpiresAt.Sub(ti.CreatedAt) != 90*time.Minute {
		t.Fatalf("CreateToken = %+v, %v", ti, err)
	}
	list, err := admin.Tokens(ctx)
	if err != nil || len(list) != 1 || list[0].ID != ti.ID || list[0].Token != "" {
		t.Fatalf("Tokens = %+v, %v; want the one token without its secret", list, err)
	}
	boot := newClient(t, client.Config{URL: ts.URL(), CA: ts.ca})
	_, csr, _ := pki.NewKeyAndCSR()
	if _, err := boot.Join(ctx, ti.Token, joinReq("c", 3, csr)); err != nil {
		t.Fatalf("join with the created token: %v", err)
	}
	if err := admin.RevokeToken(ctx, ti.ID); err != nil {
		t.Fatal(err)
	}
	err = admin.RevokeToken(ctx, ti.ID)
	wantRefusal(t, err, "revoke token "+ti.ID, http.StatusNotFound, api.ErrCodeNotFound)
	_, err = admin.CreateToken(ctx, 0, strings.Repeat("x", 300))
	wantRefusal(t, err, "create token", http.StatusBadRequest, api.ErrCodeBadRequest)
	old := ts.Token()
	rot, err := admin.RotateServerToken(ctx)
	if err != nil || rot.Token == "" || rot.Token == old || ts.Token() != rot.Token {
		t.Fatalf("RotateServerToken = %+v, %v", rot, err)
	}

	// A server on SQLite: no etcd members, nothing to leave.
	_, err = admin.LeaveServer(ctx)
	wantRefusal(t, err, "leave", http.StatusConflict, api.ErrCodeBadRequest)
	members, err := boot.EtcdMembers(ctx, rot.Token)
	if err != nil || members.Embedded {
		t.Errorf("EtcdMembers = %+v, %v; want not embedded", members, err)
	}
	_, err = boot.EtcdMembers(ctx, old)
	wantRefusal(t, err, "list etcd members", http.StatusUnauthorized, api.ErrCodeUnauthorized)
	jr, err := boot.JoinEtcd(ctx, rot.Token, api.EtcdJoinRequest{Name: "srv2"})
	if err != nil || !bytes.Equal(jr.CACert, ts.ca) || len(jr.CAKey) == 0 {
		t.Errorf("JoinEtcd for the CA: %v", err)
	}
	_, err = boot.JoinEtcd(ctx, rot.Token, api.EtcdJoinRequest{Name: "srv2", PeerURL: "https://10.1.0.11:2380"})
	wantRefusal(t, err, "join etcd cluster", http.StatusConflict, api.ErrCodeBadRequest)

	// WithBase: another name of the same server, the same credential.
	other := admin.WithBase("https://localhost:" + ts.URL()[strings.LastIndex(ts.URL(), ":")+1:] + "/")
	if nodes, err := other.Nodes(ctx); err != nil || len(nodes) != 3 || other.Base() == admin.Base() {
		t.Errorf("WithBase(%s).Nodes = %d nodes, %v", other.Base(), len(nodes), err)
	}
	if err := other.Ping(ctx); err != nil {
		t.Error(err)
	}

	// Nothing listens: the call was not answered.
	gone := admin.WithBase(closedURL(t))
	_, err = gone.Nodes(ctx)
	var u *client.UnreachableError
	if !errors.As(err, &u) || client.IsPermanent(err) || client.IsTemporary(err) || !strings.HasPrefix(err.Error(), "list nodes "+gone.Base()+": ") {
		t.Errorf("closed port: %v; want an UnreachableError", err)
	}
}

// TestTunnelCalls: a node's tunnel (the real tunnel client, with a fake
// agent's status endpoint behind it) carries NodeStatus, Probe and
// DialNode.
func TestTunnelCalls(t *testing.T) {
	ts := startServer(t)
	ctx := context.Background()
	admin := ts.admin(t)
	keyPEM, csr, err := pki.NewKeyAndCSR()
	if err != nil {
		t.Fatal(err)
	}
	boot := newClient(t, client.Config{URL: ts.URL(), CA: ts.ca})
	jr, err := boot.Join(ctx, ts.Token(), joinReq("a", 1, csr))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(jr.Certificate, keyPEM)
	if err != nil {
		t.Fatal(err)
	}

	var probeQuery string
	agent := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case api.PathStatus:
			_ = json.NewEncoder(w).Encode(api.NodeStatus{Name: "a", DataPlane: "none", Tunnel: api.TunnelStatus{Connected: true}})
		case api.PathProbe:
			probeQuery = r.URL.RawQuery
			_ = json.NewEncoder(w).Encode(api.ProbeReport{Node: "a", MTU: 1420, Results: []api.ProbeResult{{Target: netip.MustParseAddr("10.42.1.1"), Sent: 2, Received: 2}}})
		default:
			http.NotFound(w, r)
		}
	})}
	agentLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go agent.Serve(agentLn)
	defer agent.Close()
	echoLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echoLn.Close()
	go func() {
		for {
			c, err := echoLn.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	statusPort, echoPort := agentLn.Addr().(*net.TCPAddr).Port, echoLn.Addr().(*net.TCPAddr).Port

	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ts.ca)
	tc, err := tunnel.NewClient(tunnel.ClientConfig{ServerURL: ts.URL(), NodeName: "a", StatusPort: statusPort, AllowPorts: []int{echoPort},
		TLSConfig: func() (*tls.Config, error) {
			return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
		}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	tctx, stopTunnel := context.WithCancel(ctx)
	tunnelDone := make(chan struct{})
	go func() { defer close(tunnelDone); _ = tc.Run(tctx) }()
	defer func() { stopTunnel(); <-tunnelDone }()

	deadline := time.Now().Add(10 * time.Second)
	var st *api.NodeStatus
	for {
		if st, err = admin.NodeStatus(ctx, "a"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no status through the tunnel: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if st.Name != "a" || st.DataPlane != "none" {
		t.Errorf("status %+v", st)
	}
	rep, err := admin.Probe(ctx, "a", statusPort, client.ProbeRequest{Targets: []netip.Addr{netip.MustParseAddr("10.42.1.1"), netip.MustParseAddr("fd00:42::1")}, Count: 2, Size: -1})
	if err != nil || rep.Node != "a" || len(rep.Results) != 1 || rep.Results[0].Received != 2 {
		t.Fatalf("Probe = %+v, %v", rep, err)
	}
	if probeQuery != "count=2&target=10.42.1.1&target=fd00%3A42%3A%3A1" {
		t.Errorf("probe query %q", probeQuery)
	}

	conn, err := admin.DialNode(ctx, "a", echoPort)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write([]byte("hello\n")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "hello\n" {
		t.Errorf("echo through the tunnel: %q, %v", buf, err)
	}
	conn.Close()

	// A port the node does not allow: the refusal names the flag.
	_, err = admin.DialNode(ctx, "a", echoPort+1)
	e := wantRefusal(t, err, "dial port "+strconv.Itoa(echoPort+1)+" of node a", http.StatusForbidden, api.ErrCodeTunnelRefused)
	if !strings.Contains(e.API.Message, "--tunnel-allow-port") {
		t.Errorf("refusal %q does not name --tunnel-allow-port", e.API.Message)
	}
	// Probe through a port that is refused: DialNode's refusal.
	_, err = admin.Probe(ctx, "a", echoPort+1, client.ProbeRequest{Targets: []netip.Addr{netip.MustParseAddr("10.42.1.1")}})
	wantRefusal(t, err, "dial port "+strconv.Itoa(echoPort+1)+" of node a", http.StatusForbidden, api.ErrCodeTunnelRefused)
}
