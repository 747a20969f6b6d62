package hostnet_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/trellis-mesh/trellis/internal/hostnet"
	"github.com/trellis-mesh/trellis/internal/mesh/meshtest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestWatch changes links, addresses, routes and files of a namespace's
// watcher and checks that each is told, also after the watched directory
// was removed and made again, and that Close stops everything.
func TestWatch(t *testing.T) {
	meshtest.RequireRoot(t)
	ns := meshtest.NetNS(t, meshtest.Name("trh-watch"))
	dir := filepath.Join(t.TempDir(), "net.d")
	var w *hostnet.Watcher
	if err := meshtest.InNetNS(ns, func() (err error) { w, err = hostnet.Watch(nil, dir); return err }); err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("the watched directory was not created: %v", err)
	}
	drain := func() {
		for {
			select {
			case <-w.C():
			case <-time.After(50 * time.Millisecond):
				return
			}
		}
	}
	told := func(what string, change func()) {
		t.Helper()
		drain()
		start := time.Now()
		change()
		select {
		case <-w.C():
			t.Logf("%s: told after %v", what, time.Since(start))
		case <-time.After(3 * time.Second):
			t.Fatalf("%s: not told", what)
		}
	}
	ip := func(args ...string) func() {
		return func() { meshtest.IP(t, append([]string{"-n", ns}, args...)...) }
	}
	told("link added", ip("link", "add", "v0", "type", "veth", "peer", "name", "v1"))
	told("link up", ip("link", "set", "v0", "up"))
	told("address added", ip("addr", "add", "192.0.2.5/24", "dev", "v0"))
	told("route added", ip("route", "add", "198.51.100.0/24", "via", "192.0.2.1"))
	told("route deleted", ip("route", "del", "198.51.100.0/24"))
	told("address flushed", ip("addr", "flush", "dev", "v0"))
	told("link deleted", ip("link", "del", "v0"))
	file := filepath.Join(dir, "10-trellis.conflist")
	told("file written", func() {
		if err := os.WriteFile(file, []byte("{}"), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	told("file removed", func() { os.Remove(file) })
	told("directory removed", func() { os.RemoveAll(dir) })
	// The watcher makes the directory again and goes on watching it.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(dir); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the directory was not made again")
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	told("file written after the directory came back", func() {
		if err := os.WriteFile(file, []byte("{}"), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	// Later subscriptions watch the same namespace (not the test's).
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil { // idempotent
		t.Fatal(err)
	}
}
