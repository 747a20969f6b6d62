package loadgen

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/pki"
	"github.com/trellis-mesh/trellis/internal/server"
)

func TestLineMatcher(t *testing.T) {
	const marker = `"198.19.1.123`
	stream := `{"a":"198.19.11.123"}` + "\n" + `{"peers":[{"e":"198.19.1.123:51820"}],"x":1}` + "\n" + `{"later":"198.19.1.123"}` + "\n"
	want := strings.Index(stream, `,"x":1}`+"\n") + len(`,"x":1}`+"\n") // the byte that completes the line
	for size := 1; size <= len(stream); size++ {
		m := newLineMatcher([]byte(marker))
		got := -1
		for off := 0; off < len(stream); off += size {
			end := min(off+size, len(stream))
			if m.feed([]byte(stream[off:end])) {
				if got >= 0 {
					t.Fatalf("chunk size %d: matched twice", size)
				}
				got = end
			}
		}
		// The match is reported with the chunk that holds the newline.
		if got < want || got-size >= want {
			t.Errorf("chunk size %d: matched with the chunk ending at %d, want the chunk holding byte %d", size, got, want-1)
		}
	}
	m := newLineMatcher([]byte(marker))
	if m.feed([]byte(`{"a":"198.19.11.123"}` + "\n" + `{"b":"198.19.1.1234"`)) {
		t.Error("matched a line without the marker")
	}
}

func TestReadProcStat(t *testing.T) {
	s, err := ReadProcStat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if s.RSS <= 0 || s.HWM < s.RSS {
		t.Errorf("RSS %d, HWM %d: want 0 < RSS <= HWM", s.RSS, s.HWM)
	}
	if _, err := ReadProcStat(-1); err == nil {
		t.Error("ReadProcStat(-1): want an error")
	}
}

// startServer runs a server in this process on a loopback port and
// returns it with its CA certificate.
func startServer(t testing.TB) (*server.Server, []byte) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	srv, err := server.Start(context.Background(), server.Config{
		DataDir: dir, NodeName: "srv", Listener: ln, Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	ca, err := os.ReadFile(filepath.Join(dir, "server", "tls", pki.CACertFile))
	if err != nil {
		t.Fatal(err)
	}
	return srv, ca
}

func runAgainst(t testing.TB, agents, changes int) *Result {
	t.Helper()
	srv, ca := startServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := Run(ctx, Config{
		ServerURL: srv.URL(), Token: srv.Token(), CAPEM: ca,
		Agents: agents, Changes: changes, SourceAddrs: true, PhaseTimeout: time.Minute,
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func TestRun(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a server")
	}
	const agents = 30 // more than the join rate limit allows from one source address
	res := runAgainst(t, agents, 2)
	if res.JoinFailures != 0 || res.Agents != agents {
		t.Errorf("joins: %d failures of %d", res.JoinFailures, res.Agents)
	}
	if len(res.Changes) != 2 {
		t.Fatalf("want 2 changes measured, got %d", len(res.Changes))
	}
	for i, c := range res.Changes {
		if c.Delivered != agents || c.All <= 0 || c.StreamBytes <= 0 {
			t.Errorf("change %d: delivered %d of %d in %v, %d bytes", i, c.Delivered, agents, c.All, c.StreamBytes)
		}
	}
	if res.Peers != agents-1 || res.MapBytes <= res.PeerBytes*int64(res.Peers) || res.AgentBytesPerPeer <= 0 {
		t.Errorf("sample netmap: %d peers (want %d), %d bytes, %d per peer on the wire, %.0f in memory",
			res.Peers, agents-1, res.MapBytes, res.PeerBytes, res.AgentBytesPerPeer)
	}
	// Reconnects: whole netmaps first, then every agent resumes (the
	// digest the loadgen computes from the raw line is the server's).
	w, r := res.ReconnectWhole, res.ReconnectResumed
	if w == nil || r == nil {
		t.Fatal("no reconnects measured")
	}
	if w.Resumed != 0 || r.Resumed != agents || r.Bytes*5 > w.Bytes {
		t.Errorf("reconnects: whole %+v, resumed %+v: want every agent resumed, for a fraction of the bytes", w, r)
	}
}

func TestHaveOf(t *testing.T) {
	nm := api.NetMap{Version: 7, Self: api.Node{Name: "a"}, Peers: []api.Peer{{Name: "b", Reason: `a "],\"servers\":" reason`}},
		Servers: []api.Server{{Name: "s", URL: "https://198.51.100.1:6443"}}, ServerName: "s"}
	for _, c := range []struct {
		servers []api.Server
		name    string
	}{{nm.Servers, "s"}, {nil, "s"}, {nil, ""}} {
		nm.Servers, nm.ServerName = c.servers, c.name
		line, _ := json.Marshal(nm)
		d, _ := nm.Digest()
		if got, err := haveOf(line); err != nil || got != api.FormatHave(7, d) {
			t.Errorf("%s: haveOf = %q, %v; want %q", line, got, err, api.FormatHave(7, d))
		}
	}
	if _, err := haveOf([]byte(`{"delta":{}}`)); err == nil {
		t.Error("haveOf of a delta line: want an error")
	}
}

// BenchmarkFanout measures the fan-out of one change to 100 agents of an
// in-process server (cmd/trellis-loadgen measures a server process at
// larger N; see docs/benchmarks.md).
func BenchmarkFanout(b *testing.B) {
	const agents = 100
	var all time.Duration
	var bytes, n int64
	for b.Loop() {
		res := runAgainst(b, agents, 3)
		for _, c := range res.Changes {
			all += c.All
			bytes += c.StreamBytes
			n++
		}
	}
	b.ReportMetric(float64(all.Milliseconds())/float64(n), "ms/change-to-all")
	b.ReportMetric(float64(bytes)/float64(n), "B/change")
}
