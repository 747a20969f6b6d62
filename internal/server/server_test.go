package server

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/pki"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("github.com/k3s-io/kine/pkg/logstructured/sqllog.(*SQLLog).compactor"))
}

type testServer struct {
	*Server
	dir string
}

func startServer(t *testing.T, dir string, mod func(*Config)) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{DataDir: dir, NodeName: "srv", Listener: ln, Logger: slog.New(slog.DiscardHandler),
		NodeIPs: []netip.Addr{netip.MustParseAddr("10.1.0.10")}}
	if mod != nil {
		mod(&cfg)
	}
	s, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return &testServer{Server: s, dir: dir}
}

func (ts *testServer) client(t *testing.T, cert *tls.Certificate) *http.Client {
	cfg := &tls.Config{RootCAs: ts.ca.Pool(), MinVersion: tls.VersionTLS12}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	tr := &http.Transport{TLSClientConfig: cfg}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

type joined struct {
	resp api.JoinResponse
	cert tls.Certificate
}

func (ts *testServer) join(t *testing.T, tok string, req api.JoinRequest) (*joined, int, api.Error) {
	t.Helper()
	keyPEM, csrPEM, err := pki.NewKeyAndCSR()
	if err != nil {
		t.Fatal(err)
	}
	if req.CSR == nil {
		req.CSR = csrPEM
	}
	body, _ := json.Marshal(req)
	hr, _ := http.NewRequest("POST", ts.URL()+api.PathJoin, bytes.NewReader(body))
	hr.Header.Set("Authorization", "Bearer "+tok)
	resp, err := ts.client(t, nil).Do(hr)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		var ae api.Error
		if err := json.Unmarshal(b, &ae); err != nil {
			t.Fatalf("error body %q is not JSON", b)
		}
		return nil, resp.StatusCode, ae
	}
	var j joined
	if err := json.Unmarshal(b, &j.resp); err != nil {
		t.Fatal(err)
	}
	if j.cert, err = tls.X509KeyPair(j.resp.Certificate, keyPEM); err != nil {
		t.Fatal(err)
	}
	return &j, 200, api.Error{}
}

func key(b byte) api.Key { var k api.Key; k[0] = b; return k }

func joinReq(name string, k byte, pw string) api.JoinRequest {
	return api.JoinRequest{
		NodeName: name, NodePassword: pw, PublicKey: key(k), ListenPort: 51820,
		InternalIPs: []netip.Addr{netip.AddrFrom4([4]byte{10, k, 0, 1})},
		ExternalIPs: []netip.Addr{netip.AddrFrom4([4]byte{203, 0, 113, k})},
	}
}

const pwA = "password-of-node-a-0123456789"

func mustJoin(t *testing.T, ts *testServer, req api.JoinRequest) *joined {
	t.Helper()
	j, code, ae := ts.join(t, ts.Token(), req)
	if code != 200 {
		t.Fatalf("join %s: %d %+v", req.NodeName, code, ae)
	}
	return j
}

func TestJoinAllocatesStableCIDRAndRefusesHijack(t *testing.T) {
	ts := startServer(t, t.TempDir(), nil)
	a := mustJoin(t, ts, joinReq("a", 1, pwA))
	b := mustJoin(t, ts, joinReq("b", 2, "password-of-node-b-0123456789"))
	if a.resp.Node.PodCIDRs[0] == b.resp.Node.PodCIDRs[0] {
		t.Fatalf("two nodes got the same pod CIDR %v", a.resp.Node.PodCIDRs)
	}
	// Same machine again (new key, same password): same CIDR, new key.
	again := mustJoin(t, ts, joinReq("a", 9, pwA))
	if again.resp.Node.PodCIDRs[0] != a.resp.Node.PodCIDRs[0] {
		t.Fatalf("re-join changed pod CIDR: %v -> %v", a.resp.Node.PodCIDRs, again.resp.Node.PodCIDRs)
	}
	if again.resp.Node.PublicKey != key(9) {
		t.Fatalf("re-join did not replace the key")
	}
	// Another machine claiming the name.
	_, code, ae := ts.join(t, ts.Token(), joinReq("a", 3, "some-other-password-123456"))
	if code != 409 || ae.Code != api.ErrCodeNameTaken || !strings.Contains(ae.Message, "--with-node-id") {
		t.Fatalf("hijack: got %d %+v, want 409 name-taken pointing to --with-node-id", code, ae)
	}
	rec, _, err := ts.reg.get(context.Background(), "a")
	if err != nil || rec.PublicKey != key(9) {
		t.Fatalf("refused hijack changed the record: %+v %v", rec, err)
	}
}

func TestJoinRejectsBadInput(t *testing.T) {
	ts := startServer(t, t.TempDir(), nil)
	for _, tc := range []struct {
		name string
		tok  string
		req  api.JoinRequest
		code int
	}{
		{"wrong token", "K10" + strings.Repeat("0", 64) + "::server:wrong", joinReq("a", 1, pwA), 401},
		{"bare wrong secret", "nope", joinReq("a", 1, pwA), 401},
		{"bad name", ts.Token(), joinReq("A_B", 1, pwA), 400},
		{"short password", ts.Token(), joinReq("a", 1, "short"), 400},
		{"loopback external IP", ts.Token(), func() api.JoinRequest {
			r := joinReq("a", 1, pwA)
			r.ExternalIPs = []netip.Addr{netip.MustParseAddr("127.0.0.1")}
			return r
		}(), 400},
		{"garbage CSR", ts.Token(), func() api.JoinRequest { r := joinReq("a", 1, pwA); r.CSR = []byte("junk"); return r }(), 400},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, code, ae := ts.join(t, tc.tok, tc.req)
			if code != tc.code || ae.Message == "" {
				t.Fatalf("got %d %+v, want %d with a message", code, ae, tc.code)
			}
		})
	}
	if recs, _, _ := ts.reg.list(context.Background()); len(recs) != 0 {
		t.Fatalf("refused joins stored %d records", len(recs))
	}
	// A truncated body.
	hr, _ := http.NewRequest("POST", ts.URL()+api.PathJoin, strings.NewReader(`{"nodeName":"a",`))
	hr.Header.Set("Authorization", "Bearer "+ts.Token())
	resp, err := ts.client(t, nil).Do(hr)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 400 {
		t.Fatalf("truncated body: %d, want 400", resp.StatusCode)
	}
}

func TestExhaustedClusterCIDR(t *testing.T) {
	ts := startServer(t, t.TempDir(), func(c *Config) { c.ClusterCIDRs = []netip.Prefix{netip.MustParsePrefix("10.42.0.0/23")} })
	mustJoin(t, ts, joinReq("a", 1, pwA))
	mustJoin(t, ts, joinReq("b", 2, pwA))
	_, code, ae := ts.join(t, ts.Token(), joinReq("c", 3, pwA))
	if code != 507 || ae.Code != api.ErrCodeExhausted || !strings.Contains(ae.Message, "--cluster-cidr") {
		t.Fatalf("got %d %+v, want 507 exhausted naming --cluster-cidr", code, ae)
	}
}

// stream opens the netmap stream of a joined node and returns a channel of
// netmaps.
func (ts *testServer) stream(t *testing.T, j *joined) (<-chan api.NetMap, int) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	resp := ts.openNetmap(ctx, t, j, nil)
	if resp.StatusCode != 200 {
		resp.Body.Close()
		return nil, resp.StatusCode
	}
	ch := make(chan api.NetMap, 16)
	go func() {
		defer resp.Body.Close()
		defer close(ch)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			if len(bytes.TrimSpace(sc.Bytes())) == 0 {
				continue
			}
			var nm api.NetMap
			if json.Unmarshal(sc.Bytes(), &nm) == nil {
				ch <- nm
			}
		}
	}()
	return ch, 200
}

func waitFor(t *testing.T, ch <-chan api.NetMap, what string, ok func(api.NetMap) bool) api.NetMap {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case nm, open := <-ch:
			if !open {
				t.Fatalf("stream closed while waiting for %s", what)
			}
			if ok(nm) {
				return nm
			}
		case <-timeout:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func peerNames(nm api.NetMap) string {
	var n []string
	for _, p := range nm.Peers {
		n = append(n, p.Name)
	}
	return strings.Join(n, ",")
}

func TestNetmapStreamFollowsJoinsAndDeletes(t *testing.T) {
	ts := startServer(t, t.TempDir(), func(c *Config) { c.ForceExternal = true })
	a := mustJoin(t, ts, joinReq("a", 1, pwA))
	ch, code := ts.stream(t, a)
	if code != 200 {
		t.Fatalf("stream: %d", code)
	}
	waitFor(t, ch, "initial netmap with no peers", func(nm api.NetMap) bool { return nm.Self.Name == "a" && len(nm.Peers) == 0 })
	start := time.Now()
	mustJoin(t, ts, joinReq("b", 2, pwA))
	nm := waitFor(t, ch, "peer b", func(nm api.NetMap) bool { return peerNames(nm) == "b" })
	t.Logf("join -> netmap on other node: %v", time.Since(start))
	if nm.Peers[0].Endpoint.String() != "203.0.113.2:51820" {
		t.Fatalf("peer b endpoint %v, want its external IP", nm.Peers[0].Endpoint)
	}
	// Admin deletes b: a's netmap loses it.
	admin := ts.adminClient(t)
	hr, _ := http.NewRequest("DELETE", ts.URL()+api.PathNodes+"/b", nil)
	resp, err := admin.Do(hr)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("delete: %v %v", resp, err)
	}
	resp.Body.Close()
	waitFor(t, ch, "peer b gone", func(nm api.NetMap) bool { return len(nm.Peers) == 0 })
}

func (ts *testServer) adminClient(t *testing.T) *http.Client {
	certPEM, keyPEM, err := ts.ca.IssueClient("admin", pki.OrgAdmins, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return ts.client(t, &cert)
}

func TestAuthorization(t *testing.T) {
	ts := startServer(t, t.TempDir(), nil)
	a := mustJoin(t, ts, joinReq("a", 1, pwA))
	anon := ts.client(t, nil)
	node := ts.client(t, &a.cert)
	admin := ts.adminClient(t)
	for _, tc := range []struct {
		who    string
		c      *http.Client
		method string
		path   string
		want   int
	}{
		{"anonymous", anon, "GET", api.PathCACerts, 200},
		{"anonymous", anon, "GET", api.PathPing, 200},
		{"anonymous", anon, "GET", api.PathNodes, 401},
		{"anonymous", anon, "DELETE", api.PathNodes + "/a", 401},
		{"anonymous", anon, "GET", api.PathNetmap, 401},
		{"node", node, "GET", api.PathNodes, 403},
		{"node", node, "DELETE", api.PathNodes + "/a", 403},
		{"admin", admin, "GET", api.PathNodes, 200},
		{"admin", admin, "GET", api.PathNetmap, 401},
	} {
		hr, _ := http.NewRequest(tc.method, ts.URL()+tc.path, nil)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		resp, err := tc.c.Do(hr.WithContext(ctx))
		if err != nil {
			cancel()
			t.Fatalf("%s %s %s: %v", tc.who, tc.method, tc.path, err)
		}
		resp.Body.Close()
		cancel()
		if resp.StatusCode != tc.want {
			t.Errorf("%s %s %s: %d, want %d", tc.who, tc.method, tc.path, resp.StatusCode, tc.want)
		}
	}
	// A re-join retires the old node certificate.
	mustJoin(t, ts, joinReq("a", 1, pwA))
	if _, code := ts.stream(t, a); code != 403 {
		t.Fatalf("old certificate after re-join: %d, want 403", code)
	}
}

func TestRestartKeepsStateAndRefusesCIDRChange(t *testing.T) {
	dir := t.TempDir()
	ts := startServer(t, dir, nil)
	a := mustJoin(t, ts, joinReq("a", 1, pwA))
	tok := ts.Token()
	ts.Close()

	ts2 := startServer(t, dir, nil)
	if ts2.Token() != tok {
		t.Fatalf("token changed across restart")
	}
	again := mustJoin(t, ts2, joinReq("a", 1, pwA))
	if again.resp.Node.PodCIDRs[0] != a.resp.Node.PodCIDRs[0] || !again.resp.Node.CreatedAt.Equal(a.resp.Node.CreatedAt) {
		t.Fatalf("record not kept across restart")
	}
	ts2.Close()

	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	_, err := Start(context.Background(), Config{DataDir: dir, NodeName: "srv", Listener: ln, Logger: slog.New(slog.DiscardHandler),
		ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.99.0.0/16")}})
	if err == nil || !strings.Contains(err.Error(), "--cluster-cidr=10.42.0.0/16") {
		t.Fatalf("changed cluster CIDR: err = %v, want refusal naming the original", err)
	}
	for _, f := range []string{"token", "admin.yaml", "tls/ca.key"} {
		st, err := os.Stat(filepath.Join(dir, "server", f))
		if err != nil || st.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s: mode %v err %v, want 0600", f, st.Mode(), err)
		}
	}
}

// TestJoinMembersOnlyWhenAsked: the member list (O(nodes)) goes only to
// nodes that ask for it (VPN carriers).
func TestJoinMembersOnlyWhenAsked(t *testing.T) {
	ts := startServer(t, t.TempDir(), nil)
	mustJoin(t, ts, joinReq("a", 1, pwA))
	b := mustJoin(t, ts, joinReq("b", 2, pwA))
	if len(b.resp.Members) != 0 {
		t.Fatalf("members sent without asking: %+v", b.resp.Members)
	}
	req := joinReq("c", 3, pwA)
	req.Members = true
	c := mustJoin(t, ts, req)
	var names []string
	for _, m := range c.resp.Members {
		names = append(names, m.Name)
	}
	if strings.Join(names, ",") != "a,b,c" {
		t.Fatalf("members = %v, want a,b,c", names)
	}
}
