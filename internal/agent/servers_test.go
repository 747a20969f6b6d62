package agent

import (
	"log/slog"
	"path/filepath"
	"slices"
	"testing"

	"github.com/trellis-mesh/trellis/internal/api"
)

// The list keeps --server first, drops the announced entry of the same
// server (by name, or by alias URL), rotates on failover and is
// remembered across restarts.
func TestServerList(t *testing.T) {
	path := filepath.Join(t.TempDir(), serversFile)
	log := slog.New(slog.DiscardHandler)
	first := "https://lb.example:6443"
	l := newServerList(path, first, []string{"https://10.0.0.9:6443"}, log)
	if got := l.current(); got != first {
		t.Fatalf("current = %s, want %s", got, first)
	}
	announced := []api.Server{
		{Name: "s1", URL: "https://10.0.0.1:6443"},
		{Name: "s2", URL: "https://10.0.0.2:6443/"},
		{Name: "s3", URL: "https://10.0.0.3:6443"},
		{Name: "s9", URL: "https://10.0.0.9:6443"}, // an alias of first
		{Name: "bad", URL: "http://10.0.0.4:6443"},
	}
	// Before it knows which server first is, every other one is kept.
	l.update("https://10.0.0.2:6443", "s2", announced)
	all, changed := l.all()
	if want := []string{first, "https://10.0.0.1:6443", "https://10.0.0.2:6443", "https://10.0.0.3:6443"}; !slices.Equal(all, want) {
		t.Fatalf("all = %v, want %v", all, want)
	}
	// An answer through first names it: s1 is first, not another server.
	l.update(first, "s1", announced)
	select {
	case <-changed:
	default:
		t.Fatal("no change notified")
	}
	all, _ = l.all()
	if want := []string{first, "https://10.0.0.2:6443", "https://10.0.0.3:6443"}; !slices.Equal(all, want) {
		t.Fatalf("all = %v, want %v", all, want)
	}
	if l.next() != "https://10.0.0.2:6443" || l.next() != "https://10.0.0.3:6443" || l.next() != first {
		t.Fatal("next does not rotate through the list")
	}
	// A restart remembers the list.
	l2 := newServerList(path, first, []string{"https://10.0.0.9:6443"}, log)
	if got, _ := l2.all(); !slices.Equal(got, all) {
		t.Fatalf("after restart: %v, want %v", got, all)
	}
}
