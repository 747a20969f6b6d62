package server

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/netip"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
)

// deltaStream opens j's netmap stream asking for deltas and returns the
// netmaps an agent rebuilds from it, and counters of the lines read.
func (ts *testServer) deltaStream(t *testing.T, j *joined) (<-chan api.NetMap, *atomic.Int64, *atomic.Int64) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	hr, _ := http.NewRequestWithContext(ctx, "GET", ts.URL()+api.PathNetmap+"?"+api.NetmapDeltasParam+"=1", nil)
	c := ts.client(t, &j.cert)
	c.Timeout = 0
	resp, err := c.Do(hr)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		t.Fatalf("delta stream: %d", resp.StatusCode)
	}
	var deltas, bytesRead atomic.Int64
	ch := make(chan api.NetMap, 64)
	go func() {
		defer resp.Body.Close()
		defer close(ch)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(nil, 1<<20)
		var nm api.NetMap
		first := true
		for sc.Scan() {
			line := bytes.TrimSpace(sc.Bytes())
			if len(line) == 0 {
				continue
			}
			var l api.NetMapLine
			if err := json.Unmarshal(line, &l); err != nil {
				t.Errorf("undecodable line %q: %v", line, err)
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
