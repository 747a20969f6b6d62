package server

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/trellis-mesh/trellis/internal/api"
)

// openNetmap opens j's netmap stream with query q until ctx ends; the
// caller checks the status.
func (ts *testServer) openNetmap(ctx context.Context, t *testing.T, j *joined, q url.Values) *http.Response {
	t.Helper()
	hr, _ := http.NewRequestWithContext(ctx, "GET", ts.URL()+api.PathNetmap+"?"+q.Encode(), nil)
	c := ts.client(t, &j.cert)
	c.Timeout = 0
	resp, err := c.Do(hr)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// mustOpenNetmap is openNetmap for a stream that must open.
func (ts *testServer) mustOpenNetmap(ctx context.Context, t *testing.T, j *joined, q url.Values) *http.Response {
	t.Helper()
	resp := ts.openNetmap(ctx, t, j, q)
	if resp.StatusCode != 200 {
		resp.Body.Close()
		t.Fatalf("netmap stream (%s): %d", q.Encode(), resp.StatusCode)
	}
	return resp
}

// nextLine reads the stream's next line that is not a keepalive and
// decodes it; io.EOF (or the scanner's error) when the stream ends.
func nextLine(sc *bufio.Scanner) (api.NetMapLine, []byte, error) {
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var l api.NetMapLine
		if err := json.Unmarshal(line, &l); err != nil {
			return l, line, fmt.Errorf("undecodable line %q: %w", line, err)
		}
		return l, line, nil
	}
	if sc.Err() != nil {
		return api.NetMapLine{}, nil, sc.Err()
	}
	return api.NetMapLine{}, nil, io.EOF
}

// deltaStream opens j's netmap stream asking for deltas and returns the
// netmaps an agent rebuilds from it, and counters of the lines read.
func (ts *testServer) deltaStream(t *testing.T, j *joined) (<-chan api.NetMap, *atomic.Int64, *atomic.Int64) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	resp := ts.mustOpenNetmap(ctx, t, j, url.Values{api.NetmapDeltasParam: {"1"}})
	var deltas, bytesRead atomic.Int64
	ch := make(chan api.NetMap, 64)
	go func() {
		defer resp.Body.Close()
		defer close(ch)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(nil, 1<<20)
		var nm api.NetMap
		first := true
		for {
			l, line, err := nextLine(sc)
			if err != nil {
				if !errors.Is(err, io.EOF) && ctx.Err() == nil {
					t.Errorf("delta stream: %v", err)
				}
				return
			}
			switch {
			case l.Delta == nil:
				if !first {
					t.Errorf("a whole netmap after the first line: %s", line)
				}
				nm = l.NetMap
			case first:
				t.Errorf("a delta first: %s", line)
				return
			default:
				deltas.Add(1)
				bytesRead.Add(int64(len(line)))
				if nm, err = nm.Apply(*l.Delta); err != nil {
					t.Errorf("delta: %v", err)
					return
				}
			}
			first = false
			ch <- nm
		}
	}()
	return ch, &deltas, &bytesRead
}

// twoStreams opens j's netmap stream twice, with deltas and with whole
// netmaps. It returns the netmaps rebuilt from deltas, the delta line and
// byte counters, and a function that waits until both streams agree and
// returns the netmap.
func (ts *testServer) twoStreams(t *testing.T, j *joined) (<-chan api.NetMap, *atomic.Int64, *atomic.Int64, func(string, func(api.NetMap) bool) api.NetMap) {
	src, deltas, deltaBytes := ts.deltaStream(t, j)
	wholeCh, _ := ts.stream(t, j)
	var mu sync.Mutex
	var lastDelta, lastWhole api.NetMap
	seen := make(chan api.NetMap, 64)
	go func() {
		for nm := range wholeCh {
			mu.Lock()
			lastWhole = nm
			mu.Unlock()
		}
	}()
	go func() {
		defer close(seen)
		for nm := range src {
			mu.Lock()
			lastDelta = nm
			mu.Unlock()
			select {
			case seen <- nm:
			default: // nobody waits for this node's netmaps
			}
		}
	}()
	same := func(what string, ok func(api.NetMap) bool) api.NetMap {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			mu.Lock()
			got, whole := lastDelta, lastWhole
			mu.Unlock()
			if got.Self.Name != "" && (ok == nil || ok(got)) && reflect.DeepEqual(got.Peers, whole.Peers) && reflect.DeepEqual(got.Self, whole.Self) {
				return got
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: netmap of %s from deltas differs from the whole netmap:\n deltas %+v\n whole  %+v", what, got.Self.Name, got, whole)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return seen, deltas, deltaBytes, same
}

func (ts *testServer) report(t *testing.T, j *joined, rep api.Report) {
	t.Helper()
	body, _ := json.Marshal(rep)
	hr, _ := http.NewRequest("PUT", ts.URL()+api.PathReport, bytes.NewReader(body))
	resp, err := ts.client(t, &j.cert).Do(hr)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("report: %d", resp.StatusCode)
	}
}

// TestNetmapDeltas follows joins, address changes, deletes and relaying
// on a stream of deltas, and checks after each step that the netmap the
// agent rebuilds is the one a stream of whole netmaps gives.
func TestNetmapDeltas(t *testing.T) {
	ts := startServer(t, t.TempDir(), nil)
	a := mustJoin(t, ts, joinReq("a", 1, pwA))
	deltaCh, deltas, deltaBytes, sameA := ts.twoStreams(t, a)

	b := mustJoin(t, ts, joinReq("b", 2, pwA))
	_, _, _, sameB := ts.twoStreams(t, b)
	c := mustJoin(t, ts, joinReq("c", 3, pwA))
	waitFor(t, deltaCh, "b and c", func(nm api.NetMap) bool { return peerNames(nm) == "b,c" })
	sameA("b and c joined", nil)

	before := deltaBytes.Load()
	ts.report(t, c, api.Report{ExternalIPs: []netip.Addr{netip.MustParseAddr("198.51.100.3")}, InternalIPs: []netip.Addr{netip.MustParseAddr("10.3.0.1")}})
	nm := waitFor(t, deltaCh, "c's new address", func(nm api.NetMap) bool {
		return len(nm.Peers) == 2 && nm.Peers[1].Endpoint.String() == "198.51.100.3:51820"
	})
	if n := deltaBytes.Load() - before; n > 400 {
		t.Errorf("one peer's new address took %d bytes of deltas; want one entry (< 400)", n)
	}
	sameA("c moved", nil)

	// b and c behind one NAT each, handshakes failing: relayed through a
	// server... there is none with a data plane here, so the path is none,
	// with a reason, on both streams alike.
	ts.report(t, b, api.Report{Observations: []api.Observation{{Peer: "c", Handshake: api.HandshakeFailing}}})
	sameA("b reported c failing", nil)

	// A relay joins: b's and c's paths may go through it; a's netmap
	// gains the relay.
	r := joinReq("r", 9, pwA)
	r.Relay = true
	rj := mustJoin(t, ts, r)
	waitFor(t, deltaCh, "relay r", func(nm api.NetMap) bool { return peerNames(nm) == "b,c,r" })
	sameA("relay joined", nil)
	// The relay becomes ready (its stream opens): b reaches c through it.
	rCh, _ := ts.stream(t, rj)
	waitFor(t, rCh, "r's netmap", func(api.NetMap) bool { return true })
	sameB("relay ready: b reaches c through r", func(nm api.NetMap) bool {
		return len(nm.Peers) == 3 && nm.Peers[1].Via == "r" && len(nm.Peers[2].AllowedIPs) == 2
	})

	// Delete c: gone from a's netmap.
	admin := ts.adminClient(t)
	hr, _ := http.NewRequest("DELETE", ts.URL()+api.PathNodes+"/c", nil)
	resp, err := admin.Do(hr)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("delete: %v %v", resp, err)
	}
	resp.Body.Close()
	nm = waitFor(t, deltaCh, "c gone", func(nm api.NetMap) bool { return peerNames(nm) == "b,r" })
	sameA("c deleted", nil)
	sameB("c deleted", nil)
	if deltas.Load() == 0 {
		t.Fatal("no delta was sent")
	}
	t.Logf("%d deltas, %d bytes; final netmap version %d", deltas.Load(), deltaBytes.Load(), nm.Version)
}

// firstLine opens j's netmap stream asking for deltas, resuming from last
// when it is given (the have parameter, raw when have is set), and
// returns its first line, the line's length and the netmap it makes of
// last.
func (ts *testServer) firstLine(t *testing.T, j *joined, last *api.NetMap, have string) (api.NetMapLine, int, api.NetMap) {
	t.Helper()
	q := url.Values{api.NetmapDeltasParam: {"1"}}
	if last != nil {
		d, err := last.Digest()
		if err != nil {
			t.Fatal(err)
		}
		q.Set(api.NetmapHaveParam, api.FormatHave(last.Version, d))
	}
	if have != "" {
		q.Set(api.NetmapHaveParam, have)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp := ts.mustOpenNetmap(ctx, t, j, q)
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	l, line, err := nextLine(sc)
	if err != nil {
		t.Fatalf("first line: %v", err)
	}
	if l.Delta == nil {
		return l, len(line), l.NetMap
	}
	if last == nil {
		t.Fatalf("a delta first without a netmap to resume: %s", line)
	}
	nm, err := last.Apply(*l.Delta)
	if err != nil {
		t.Fatalf("first delta: %v", err)
	}
	return l, len(line), nm
}

// TestNetmapStreamResumes: an agent that reconnects with the netmap it
// has gets an empty delta when nothing changed, after a server restart
// too, and the whole netmap when something did or when it says nonsense.
func TestNetmapStreamResumes(t *testing.T) {
	dir := t.TempDir()
	ts := startServer(t, dir, nil)
	a := mustJoin(t, ts, joinReq("a", 1, pwA))
	var bs []*joined
	for i := range 15 { // the server admits 20 joins a minute from one address
		bs = append(bs, mustJoin(t, ts, joinReq(fmt.Sprintf("b%02d", i), byte(2+i), pwA)))
	}
	ch, _, _ := ts.deltaStream(t, a)
	nm := waitFor(t, ch, "15 peers", func(nm api.NetMap) bool { return len(nm.Peers) == 15 })

	l, wholeLen, _ := ts.firstLine(t, a, nil, "")
	if l.Delta != nil {
		t.Fatal("a stream without have began with a delta")
	}
	l, n, got := ts.firstLine(t, a, &nm, "")
	if l.Delta == nil || l.Delta.Base != nm.Version || len(l.Delta.PeersChanged)+len(l.Delta.PeersRemoved) != 0 || l.Delta.Self != nil {
		t.Fatalf("resume with nothing changed: first line %+v, want an empty delta from version %d", l, nm.Version)
	}
	if !reflect.DeepEqual(got.Peers, nm.Peers) || got.ServerName != "srv" {
		t.Fatalf("resumed netmap differs: %+v", got)
	}
	if n*10 > wholeLen {
		t.Errorf("resuming took %d bytes; the whole netmap %d", n, wholeLen)
	}
	t.Logf("first line: whole netmap of 15 peers %d bytes, resumed %d bytes", wholeLen, n)

	// Something changed since: the whole netmap.
	ts.report(t, bs[3], api.Report{ExternalIPs: []netip.Addr{netip.MustParseAddr("198.51.100.3")}})
	moved := waitFor(t, ch, "b03's address", func(nm api.NetMap) bool { return nm.Peers[3].Endpoint.Addr().String() == "198.51.100.3" })
	if l, _, got := ts.firstLine(t, a, &nm, ""); l.Delta != nil || !reflect.DeepEqual(got.Peers, moved.Peers) {
		t.Fatalf("resume after a change: %+v, want the whole new netmap", l)
	}
	// Nonsense: the whole netmap, the stream works.
	for _, have := range []string{"x", "1.zz", "-1." + strings.Repeat("0", 64), fmt.Sprint(moved.Version+1) + "." + strings.Repeat("0", 64)} {
		if l, _, _ := ts.firstLine(t, a, nil, have); l.Delta != nil || len(l.Peers) != 15 {
			t.Fatalf("have=%s: %+v, want the whole netmap", have, l)
		}
	}
	// A netmap from a later version than the server's (another server
	// ahead, a restored datastore): whole, deltas only go forward.
	ahead := moved
	ahead.Version += 1000
	if l, _, _ := ts.firstLine(t, a, &ahead, ""); l.Delta != nil {
		t.Fatalf("resume from a later version: %+v, want the whole netmap", l)
	}

	// The server restarts on the same address: the agent's netmap is still
	// current.
	addr := ts.URL()
	ts.Close()
	ln, err := net.Listen("tcp", strings.TrimPrefix(addr, "https://"))
	if err != nil {
		t.Skipf("cannot listen on %s again: %v", addr, err)
	}
	ts = startServer(t, dir, func(c *Config) { c.Listener = ln })
	if l, _, got := ts.firstLine(t, a, &moved, ""); l.Delta == nil || !reflect.DeepEqual(got.Peers, moved.Peers) {
		t.Fatalf("resume after a restart: %+v, want an empty delta", l)
	}
	if n := testutil.ToFloat64(ts.metrics.streams.WithLabelValues("resumed")); n != 1 {
		t.Errorf("resumed streams counted %v, want 1", n)
	}
}
