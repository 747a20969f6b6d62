package agent

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/client"
	"github.com/trellis-mesh/trellis/internal/server"
	"github.com/trellis-mesh/trellis/internal/token"
)

// startTestServer runs a real Trellis server in this process.
func startTestServer(t *testing.T) (*server.Server, string) {
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
	return s, dir
}

// newTestSource is a serverSource of node name against srv.
func newTestSource(t *testing.T, srv *server.Server, name string, key byte, ip string) *serverSource {
	t.Helper()
	tok, err := token.Parse(srv.Token())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	c := Config{DataDir: dir}
	return newServerSource(serverSourceConfig{
		ServerURL: srv.URL(), Token: tok, NodeName: name, Password: "password-of-" + name + "-0123456789",
		PublicKey: api.Key{key, 31: 1}, ListenPort: 51820, Dir: c.dir, Logger: slog.New(slog.DiscardHandler),
	}, api.Report{InternalIPs: []netip.Addr{netip.MustParseAddr(ip)}})
}

// nextNetmap waits for the next netmap posted to out that satisfies ok.
func nextNetmap(t *testing.T, out *Mailbox[Update], what string, ok func(api.NetMap) bool) api.NetMap {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case <-out.C():
			if u, have := out.Take(); have && ok(u.NetMap) {
				return u.NetMap
			}
		case <-deadline:
			t.Fatalf("no netmap with %s", what)
		}
	}
}

// TestServerSource follows a real server: the join, the first netmap, a
// peer that joins, reports that reach the server, and the end when an
// administrator deletes the node.
func TestServerSource(t *testing.T) {
	srv, dir := startTestServer(t)
	a := newTestSource(t, srv, "a", 1, "10.1.0.1")
	b := newTestSource(t, srv, "b", 2, "10.1.0.2")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	outA, outB := NewMailbox[Update](), NewMailbox[Update]()
	doneA, doneB := make(chan error, 1), make(chan error, 1)
	go func() { doneA <- a.Run(ctx, outA) }()
	nm := nextNetmap(t, outA, "a's pod CIDR", func(nm api.NetMap) bool { return len(nm.Self.PodCIDRs) == 1 })
	if nm.Self.Name != "a" || len(nm.ClusterCIDRs) == 0 {
		t.Fatalf("a's first netmap %+v", nm)
	}
	select {
	case <-a.Joined():
	default:
		t.Fatal("Joined is not closed after the first netmap")
	}
	go func() { doneB <- b.Run(ctx, outB) }()
	nextNetmap(t, outA, "peer b", func(nm api.NetMap) bool { return len(nm.Peers) == 1 && nm.Peers[0].Name == "b" })

	// A report reaches the server: b learns a's new external IP.
	ext := netip.MustParseAddr("203.0.113.7")
	a.Report(api.Report{InternalIPs: []netip.Addr{netip.MustParseAddr("10.1.0.1")}, ExternalIPs: []netip.Addr{ext}})
	admin, err := client.ReadAdminConfig(filepath.Join(dir, "server", "admin.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	ac, err := client.New(admin)
	if err != nil {
		t.Fatal(err)
	}
	defer ac.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		nodes, err := ac.Nodes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		i := slices.IndexFunc(nodes, func(n api.Node) bool { return n.Name == "a" })
		if i >= 0 && slices.Equal(nodes[i].ExternalIPs, []netip.Addr{ext}) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the server did not get a's report: %+v", nodes)
		}
		time.Sleep(20 * time.Millisecond)
	}

	// Deleted by an administrator: b's source ends with ErrDeleted, and a
	// loses the peer.
	if err := ac.DeleteNode(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-doneB:
		if !errors.Is(err, ErrDeleted) {
			t.Fatalf("b's source ended with %v, want ErrDeleted", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("b's source did not end after b was deleted")
	}
	nextNetmap(t, outA, "no peers", func(nm api.NetMap) bool { return len(nm.Peers) == 0 })
	cancel()
	if err := <-doneA; err != nil {
		t.Fatalf("a's source ended with %v after ctx, want nil", err)
	}
}

// TestServerSourceWrongToken ends at once with the server's refusal.
func TestServerSourceWrongToken(t *testing.T) {
	srv, _ := startTestServer(t)
	s := newTestSource(t, srv, "a", 1, "10.1.0.1")
	tok, _ := token.Parse(srv.Token())
	tok.Secret = "wrong"
	s.cfg.Token = tok
	err := s.Run(context.Background(), NewMailbox[Update]())
	if err == nil || !client.IsPermanent(err) || !strings.Contains(err.Error(), "join ") {
		t.Fatalf("Run = %v, want a permanent join refusal", err)
	}
}
