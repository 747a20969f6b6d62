package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/client"
	"github.com/trellis-mesh/trellis/internal/server"
)

// TestExplain: the operator commands print the server's sentence for a
// refusal, "server answered STATUS" without one, and "cannot reach the
// server at URL: ..." when the server did not answer, as they always
// have.
func TestExplain(t *testing.T) {
	dir := t.TempDir()
	srv := startTestServer(t, dir)
	c, err := Load(filepath.Join(dir, "server", "admin.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	op := func(err error) error { return fmt.Errorf("list nodes %s: %w", c.api.Base(), err) }
	refusal := &client.Error{Status: 404, API: api.Error{Code: api.ErrCodeNotFound, Message: "there is no node x"}}
	raw := &client.Error{Status: 502, API: api.Error{Message: "<html>bad gateway</html>"}, Raw: true}
	inner := errors.New(`Get "https://192.0.2.1:6443/v1/nodes": dial tcp 192.0.2.1:6443: i/o timeout`)
	other := op(errors.New("decode answer: unexpected EOF"))
	for _, tc := range []struct {
		err  error
		want string
	}{
		{op(refusal), "there is no node x"},
		{op(raw), "server answered 502 Bad Gateway"},
		{op(&client.UnreachableError{Err: inner}), "cannot reach the server at " + srv.URL() + ": " + inner.Error()},
		{other, other.Error()},
	} {
		got := c.explain(tc.err)
		if got.Error() != tc.want {
			t.Errorf("explain(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
	var ae *api.Error
	if !errors.As(c.explain(op(refusal)), &ae) || ae.Code != api.ErrCodeNotFound {
		t.Error("a refusal is not an *api.Error")
	}
	if c.explain(nil) != nil {
		t.Error("explain(nil) != nil")
	}
	// The real thing: a refusal and a server that is gone.
	if err := c.DeleteNode(context.Background(), "nobody"); err == nil || !errors.As(err, &ae) || err.Error() != ae.Message {
		t.Errorf("delete of an unknown node: %v, want the server's sentence alone", err)
	}
	srv.Close()
	_, err = c.Nodes(context.Background())
	if want := "cannot reach the server at " + srv.URL() + `: Get "` + srv.URL() + api.PathNodes + `": `; err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Errorf("server gone: %v, want it to begin %q", err, want)
	}
}

func TestLoadMissing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "admin.yaml")
	_, err := Load(path)
	if want := "admin config " + path + " does not exist: run this on a server, or point --admin-config (TRELLIS_ADMIN_CONFIG) at a copy of <data-dir>/server/admin.yaml"; err == nil || err.Error() != want {
		t.Errorf("Load of a missing file: %v", err)
	}
	if err := os.WriteFile(path, []byte("server: https://192.0.2.1:6443\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(path); err == nil || err.Error() != "admin config "+path+": certificate-authority-data is missing or not base64" {
		t.Errorf("Load without a CA: %v", err)
	}
}

// startTestServer runs a server in this process with its data in dir.
func startTestServer(t *testing.T, dir string) *server.Server {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.Start(context.Background(), server.Config{DataDir: dir, NodeName: "srv", Listener: ln,
		Logger: slog.New(slog.DiscardHandler), NodeIPs: []netip.Addr{netip.MustParseAddr("10.1.0.10")}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv
}
