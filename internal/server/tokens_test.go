package server

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/token"
)

func (ts *testServer) adminJSON(t *testing.T, method, path string, in, out any) int {
	t.Helper()
	var body io.Reader
	if in != nil {
		b, _ := json.Marshal(in)
		body = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, ts.URL()+path, body)
	resp, err := ts.adminClient(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if out != nil && resp.StatusCode < 300 {
		if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
			t.Fatal(err)
		}
	}
	return resp.StatusCode
}

func TestCreatedTokensExpireAndRevoke(t *testing.T) {
	ts := startServer(t, t.TempDir(), nil)
	var ti api.TokenInfo
	if code := ts.adminJSON(t, "POST", api.PathTokens, api.TokenCreateRequest{TTL: 3600, Description: "ci"}, &ti); code != 200 {
		t.Fatalf("create token: %d", code)
	}
	tok, err := token.Parse(ti.Token)
	if err != nil || !tok.CAMatches(ts.ca.CertPEM()) || tok.Kind != token.KindNode {
		t.Fatalf("created token %q: %+v %v, want a node token pinning the CA", ti.Token, tok, err)
	}
	if _, code, ae := ts.join(t, ti.Token, joinReq("a", 1, pwA)); code != 200 {
		t.Fatalf("join with a created token: %d %+v", code, ae)
	}
	// A node token cannot join as the server's node.
	if _, code, _ := ts.join(t, ti.Token, joinReq("srv", 2, pwA)); code != 403 {
		t.Fatalf("node token joining as the server: %d, want 403", code)
	}
	// The store keeps no secret.
	kvs, _, _ := ts.store.List(context.Background(), prefixTokens)
	secret := strings.SplitN(tok.Secret, ".", 2)[1]
	for _, kv := range kvs {
		if strings.Contains(string(kv.Value), secret) {
			t.Fatalf("token secret stored in the clear: %s", kv.Value)
		}
	}
	var list []api.TokenInfo
	ts.adminJSON(t, "GET", api.PathTokens, nil, &list)
	if len(list) != 1 || list[0].ID != ti.ID || list[0].Token != "" {
		t.Fatalf("token list = %+v, want one entry without its secret", list)
	}
	if code := ts.adminJSON(t, "DELETE", api.PathTokens+"/"+ti.ID, nil, nil); code != 204 {
		t.Fatalf("revoke: %d", code)
	}
	if _, code, _ := ts.join(t, ti.Token, joinReq("b", 3, pwA)); code != 401 {
		t.Fatalf("join with a revoked token: %d, want 401", code)
	}
	// An expired token.
	var short api.TokenInfo
	ts.adminJSON(t, "POST", api.PathTokens, api.TokenCreateRequest{TTL: 1}, &short)
	var jt joinToken
	b, rev, _ := ts.store.Get(context.Background(), prefixTokens+short.ID)
	json.Unmarshal(b, &jt)
	jt.ExpiresAt = time.Now().Add(-time.Second)
	b, _ = json.Marshal(jt)
	if _, err := ts.store.Update(context.Background(), prefixTokens+short.ID, b, rev); err != nil {
		t.Fatal(err)
	}
	if _, code, _ := ts.join(t, short.Token, joinReq("c", 4, pwA)); code != 401 {
		t.Fatalf("join with an expired token: %d, want 401", code)
	}
	// Forged ids and secrets.
	for _, forged := range []string{
		token.New(ts.ca.CertPEM(), token.KindNode, ti.ID+".wrongsecret").String(),
		token.New(ts.ca.CertPEM(), token.KindNode, "zzzzzz.x").String(),
		token.New(ts.ca.CertPEM(), token.KindNode, "../../x.y").String(),
	} {
		if _, code, _ := ts.join(t, forged, joinReq("d", 5, pwA)); code != 401 {
			t.Errorf("forged token %q: %d, want 401", forged, code)
		}
	}
}

func TestRotateServerTokenKeepsNodes(t *testing.T) {
	ts := startServer(t, t.TempDir(), nil)
	old := ts.Token()
	a := mustJoin(t, ts, joinReq("a", 1, pwA))
	var ti api.TokenInfo
	if code := ts.adminJSON(t, "POST", api.PathTokens+"/rotate-server", nil, &ti); code != 200 || ti.Token == old || ti.Token != ts.Token() {
		t.Fatalf("rotate: %d %+v", code, ti)
	}
	// The joined node's credential still works.
	if ch, code := ts.stream(t, a); code != 200 {
		t.Fatalf("netmap stream after rotation: %d", code)
	} else {
		waitFor(t, ch, "a netmap", func(api.NetMap) bool { return true })
	}
	if _, code, _ := ts.join(t, old, joinReq("b", 2, pwA)); code != 401 {
		t.Fatalf("join with the old server token: %d, want 401", code)
	}
	mustJoin(t, ts, joinReq("b", 2, pwA))
}

func TestAgentTokenJoinsAgentsOnly(t *testing.T) {
	ts := startServer(t, t.TempDir(), func(c *Config) { c.AgentToken = "agent-secret-0123456789" })
	if _, code, ae := ts.join(t, "agent-secret-0123456789", joinReq("a", 1, pwA)); code != 200 {
		t.Fatalf("agent token: %d %+v", code, ae)
	}
	if _, code, _ := ts.join(t, "agent-secret-0123456789", joinReq("srv", 2, pwA)); code != 403 {
		t.Fatalf("agent token as server: %d, want 403", code)
	}
}

func TestJoinRateLimitedPerSource(t *testing.T) {
	ts := startServer(t, t.TempDir(), nil)
	limited := false
	for i := 0; i < 40; i++ {
		_, code, _ := ts.join(t, "wrong", joinReq("a", 1, pwA))
		if code == 429 {
			limited = true
			break
		}
	}
	if !limited {
		t.Fatal("40 join attempts from one address in a burst were never rate-limited")
	}
}

func TestRefusesTLSBelow12(t *testing.T) {
	ts := startServer(t, t.TempDir(), nil)
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ts.ca.Pool(), MaxVersion: tls.VersionTLS11}}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	resp, err := c.Get(ts.URL() + api.PathPing)
	if err == nil {
		resp.Body.Close()
		t.Fatal("a TLS 1.1 client was served; want the handshake refused")
	}
}

// The join token is good for joining only: presented anywhere else it
// opens nothing.
func TestJoinTokenOpensNothingElse(t *testing.T) {
	ts := startServer(t, t.TempDir(), nil)
	mustJoin(t, ts, joinReq("a", 1, pwA))
	c := ts.client(t, nil)
	for _, tc := range []struct{ method, path string }{
		{"GET", api.PathNodes}, {"DELETE", api.PathNodes + "/a"}, {"GET", api.PathNetmap},
		{"PUT", api.PathReport}, {"GET", api.PathTokens}, {"POST", api.PathTokens},
		{"GET", api.PathPaths}, {"GET", api.PathConnect}, {"GET", api.PathNodes + "/a/status"},
	} {
		req, _ := http.NewRequest(tc.method, ts.URL()+tc.path, strings.NewReader("{}"))
		req.Header.Set("Authorization", "Bearer "+ts.Token())
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("join token on %s %s: %d, want 401", tc.method, tc.path, resp.StatusCode)
		}
	}
}
