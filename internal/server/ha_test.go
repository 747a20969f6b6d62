package server

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/token"
)

// haPort returns a free loopback port below the ephemeral range, so that
// no outgoing connection takes it before the member listens on it.
func haPort(t *testing.T) int {
	t.Helper()
	for range 1000 {
		p := 20000 + rand.IntN(12000)
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue
		}
		ln.Close()
		return p
	}
	t.Fatal("no free port")
	return 0
}

// haServer configures a server with an embedded etcd member on loopback.
func haServer(t *testing.T, name string, mod func(*HAConfig)) func(*Config) {
	return func(c *Config) {
		c.NodeName = name
		c.NodeIPs = []netip.Addr{netip.MustParseAddr("127.0.0.1")}
		c.HA = HAConfig{EtcdPeerPort: haPort(t), EtcdClientPort: haPort(t)}
		if mod != nil {
			mod(&c.HA)
		}
	}
}

// members calls PathEtcdMembers with bearer tok.
func (ts *testServer) members(t *testing.T, tok string) (api.EtcdMembersResponse, int) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, ts.URL()+api.PathEtcdMembers, nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := ts.client(t, nil).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out api.EtcdMembersResponse
	_ = json.NewDecoder(resp.Body).Decode(&out)
	_, _ = io.Copy(io.Discard, resp.Body)
	return out, resp.StatusCode
}

// TestHAJoin: a second server joins the embedded etcd cluster of the
// first with the server token (agent tokens cannot), ends up with the same
// CA and token and sees the same nodes; one too far away is refused
// citing the rule; deleting the server removes its etcd member.
func TestHAJoin(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd members; skipped with -short")
	}
	// Runs last: etcd's peer connections between members end some
	// seconds after the members closed (cmux conns ignore the deadline
	// net/http sets), and the leak check must not count them.
	t.Cleanup(waitPeerConnsClosed)
	a := startServer(t, t.TempDir(), func(c *Config) {
		haServer(t, "srv-a", func(h *HAConfig) { h.ClusterInit = true })(c)
		c.AgentToken = "agent-secret-0123456789"
		if testing.Verbose() {
			c.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
		}
	})
	if !a.store.IsEmbedded() {
		t.Fatal("--cluster-init did not start embedded etcd")
	}

	// Only the server token reaches the members endpoint.
	agentTok := token.New(a.ca.CertPEM(), token.KindNode, "agent-secret-0123456789").String()
	for _, tok := range []string{"", agentTok, "K10::server:wrong-secret"} {
		if _, code := a.members(t, tok); code != http.StatusUnauthorized {
			t.Errorf("members with token %q: %d, want 401", tok, code)
		}
	}
	req, _ := http.NewRequest(http.MethodPost, a.URL()+api.PathEtcdMembers, bytes.NewReader([]byte(`{"name":"evil","peerURL":"https://127.0.0.1:1"}`)))
	req.Header.Set("Authorization", "Bearer "+agentTok)
	resp, err := a.client(t, nil).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("member add with the agent token: %d, want 401", resp.StatusCode)
	}
	m, code := a.members(t, a.Token())
	if code != http.StatusOK || !m.Embedded || len(m.Members) != 1 {
		t.Fatalf("members = %+v, %d", m, code)
	}

	// A node joined through the first server.
	j1 := mustJoin(t, a, joinReq("n1", 1, pwA))

	// A server too far away (any round trip is over 1 ns) is refused.
	_, err = Start(context.Background(), func() Config {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		c := Config{DataDir: t.TempDir(), Listener: ln, Token: a.Token(), Logger: a.log}
		haServer(t, "srv-far", func(h *HAConfig) { h.JoinURL = a.URL(); h.MaxPeerRTT = time.Nanosecond })(&c)
		return c
	}())
	if err == nil || !strings.Contains(err.Error(), "same location") || !strings.Contains(err.Error(), "--etcd-allow-remote-peers") {
		t.Fatalf("far server: %v; want a refusal citing the rule", err)
	}
	// An agent token cannot join a server.
	_, err = Start(context.Background(), func() Config {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		c := Config{DataDir: t.TempDir(), Listener: ln, Token: agentTok, Logger: a.log}
		haServer(t, "srv-agent", func(h *HAConfig) { h.JoinURL = a.URL() })(&c)
		return c
	}())
	if err == nil || !strings.Contains(err.Error(), "server token") {
		t.Fatalf("server with an agent token: %v; want a refusal", err)
	}
	if m, _ := a.members(t, a.Token()); len(m.Members) != 1 {
		t.Fatalf("refused joins left members: %+v", m)
	}

	b := startServer(t, t.TempDir(), func(c *Config) {
		haServer(t, "srv-b", func(h *HAConfig) { h.JoinURL = a.URL() })(c)
		c.Token = a.Token()
	})
	if b.Token() != a.Token() || !bytes.Equal(b.ca.CertPEM(), a.ca.CertPEM()) {
		t.Fatal("the joined server has another CA or token")
	}
	if m, _ := a.members(t, a.Token()); len(m.Members) != 2 {
		t.Fatalf("members after the join: %+v", m)
	}
	// The node joined through a is known to b, and a node joins through b.
	if _, _, err := b.reg.get(context.Background(), "n1"); err != nil {
		t.Fatalf("node n1 on the second server: %v", err)
	}
	mustJoin(t, b, joinReq("n2", 2, pwA))
	if _, _, err := a.reg.get(context.Background(), "n2"); err != nil {
		t.Fatalf("node n2 on the first server: %v", err)
	}
	// Agents learn both servers.
	deadline := time.Now().Add(10 * time.Second)
	for len(a.hub.serverList()) != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("servers = %+v, want both", a.hub.serverList())
		}
		time.Sleep(50 * time.Millisecond)
	}

	// n1's netmap stream on a lists both servers, and b sees n1 ready
	// (readiness keys), though the stream is not on b.
	ch, code := a.stream(t, j1)
	if code != http.StatusOK {
		t.Fatalf("stream: %d", code)
	}
	waitFor(t, ch, "a netmap listing both servers", func(nm api.NetMap) bool {
		return len(nm.Servers) == 2 && nm.ServerName == "srv-a"
	})
	deadline = time.Now().Add(10 * time.Second)
	for {
		ready := false
		for _, n := range b.hub.nodesWithStatus() {
			ready = ready || (n.Name == "n1" && n.Ready)
		}
		if ready {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the second server does not see n1 ready while its stream is open on the first")
		}
		time.Sleep(50 * time.Millisecond)
	}

	// A third server joins and dies; deleting it (it runs no node here)
	// removes its member, and the two left keep their quorum.
	c := startServer(t, t.TempDir(), func(c *Config) {
		haServer(t, "srv-c", func(h *HAConfig) { h.JoinURL = b.URL() })(c)
		c.Token = a.Token()
	})
	if m, _ := a.members(t, a.Token()); len(m.Members) != 3 {
		t.Fatalf("members after the third join: %+v", m)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	req, _ = http.NewRequest(http.MethodDelete, a.URL()+api.PathNodes+"/srv-c", nil)
	resp, err = a.adminClient(t).Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("delete srv-c: %v %v", resp, err)
	}
	resp.Body.Close()
	if m, _ := a.members(t, a.Token()); len(m.Members) != 2 {
		t.Fatalf("members after deleting srv-c: %+v", m)
	}
	if _, _, err := b.reg.get(context.Background(), "n1"); err != nil {
		t.Fatalf("the two servers left do not answer: %v", err)
	}

	// b leaves by itself (trellis server leave); a, the last server,
	// cannot.
	for _, tc := range []struct {
		ts   *testServer
		want int
	}{{b, http.StatusOK}, {a, http.StatusConflict}} {
		req, _ = http.NewRequest(http.MethodPost, tc.ts.URL()+api.PathServerLeave, nil)
		resp, err = tc.ts.adminClient(t).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Fatalf("leave %s: %d, want %d", tc.ts.cfg.NodeName, resp.StatusCode, tc.want)
		}
	}
	if m, _ := a.members(t, a.Token()); len(m.Members) != 1 || m.Members[0].Name != "srv-a" {
		t.Fatalf("members after srv-b left: %+v", m)
	}
	if a.isServerName(context.Background(), "srv-b") {
		t.Error("srv-b is still registered after it left")
	}
	_ = b.Close()
}

// waitPeerConnsClosed waits (up to 15 s) until the connections between
// etcd members of closed servers are gone.
func waitPeerConnsClosed() {
	deadline := time.Now().Add(15 * time.Second)
	buf := make([]byte, 1<<20)
	for time.Now().Before(deadline) {
		n := runtime.Stack(buf, true)
		s := string(buf[:n])
		if !strings.Contains(s, "net/http.(*connReader).abortPendingRead") && !strings.Contains(s, "net/http.(*persistConn).readLoop") {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}
