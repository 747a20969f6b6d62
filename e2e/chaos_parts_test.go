//go:build e2e

package e2e

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

// The chaos suite's pure parts, without a lab.

func testKinds() []faultKind {
	none := func(string) fault { return &funcFault{in: func() error { return nil }} }
	return []faultKind{
		{name: "kill", weight: 3, min: 3 * time.Second, max: 20 * time.Second, targets: []string{"a", "b"}, make: none},
		{name: "kill-srv", weight: 2, min: 3 * time.Second, max: 20 * time.Second, targets: []string{"s1", "s2", "s3"}, server: true, make: none},
		{name: "partition", weight: 2, min: 5 * time.Second, max: 40 * time.Second, targets: []string{"s1", "s2", "s3"}, server: true, make: none},
		{name: "home-ip", weight: 2, targets: []string{"h1"}, make: none},
	}
}

// TestPlanFaults: one seed gives one schedule; faults stay within the
// run, overlap at most two at a time, never two on one target or two on
// servers.
func TestPlanFaults(t *testing.T) {
	kinds := testKinds()
	d := 30 * time.Minute
	a := planFaults(rand.New(rand.NewPCG(7, 19)), d, 8*time.Second, 2, kinds)
	b := planFaults(rand.New(rand.NewPCG(7, 19)), d, 8*time.Second, 2, kinds)
	if !slices.Equal(a, b) {
		t.Fatal("the same seed gave two schedules")
	}
	if c := planFaults(rand.New(rand.NewPCG(8, 19)), d, 8*time.Second, 2, kinds); slices.Equal(a, c) {
		t.Fatal("two seeds gave one schedule")
	}
	if len(a) < 50 {
		t.Fatalf("only %d faults in %v", len(a), d)
	}
	hold := func(p plannedFault) time.Duration { return max(p.dur, 10*time.Second) }
	overlapped := 0
	for i, p := range a {
		if p.at+p.dur > d {
			t.Errorf("%v ends after the run", p)
		}
		// The number active changes only when one starts: count those
		// active when p starts.
		active := 0
		for j, q := range a {
			if i == j || q.at+hold(q) <= p.at || p.at+hold(p) <= q.at {
				continue
			}
			if q.at <= p.at {
				active++
				overlapped++
			}
			if q.target == p.target {
				t.Errorf("%v and %v hit one target at once", p, q)
			}
			if kindByName(kinds, p.kind).server && kindByName(kinds, q.kind).server {
				t.Errorf("%v and %v both take a server out", p, q)
			}
		}
		if active > 1 {
			t.Errorf("%v starts while %d others are active", p, active)
		}
	}
	if overlapped == 0 {
		t.Error("no two faults overlap")
	}
}

// TestMeshTimeline: the mesh is whole once every pair is up and stays up.
func TestMeshTimeline(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	evs := []pairEvent{
		{at(0), "a→b/tcp", true}, {at(0), "b→a/tcp", true},
		{at(10), "a→b/tcp", false},
		{at(20), "a→b/tcp", true},
		{at(21), "b→a/tcp", false}, // a blip: not stable
		{at(22), "b→a/tcp", true},
		{at(40), "b→a/tcp", false},
	}
	tl := newMeshTimeline(slices.Clone(evs), 2)
	if w, ok, _ := tl.wholeAfter(at(5), 3*time.Second); !ok || !w.Equal(at(5)) {
		t.Errorf("after 5s: whole at %v (%v), want at once", w.Sub(t0), ok)
	}
	if w, ok, _ := tl.wholeAfter(at(12), 3*time.Second); !ok || !w.Equal(at(22)) {
		t.Errorf("after 12s: whole at %v (%v), want 22s (the blip at 21s breaks 20s)", w.Sub(t0), ok)
	}
	if _, ok, down := tl.wholeAfter(at(41), 3*time.Second); ok || !slices.Equal(down, []string{"b→a/tcp"}) {
		t.Errorf("after 41s: whole %v, down %v; want not whole, b→a down", ok, down)
	}
	// Scoped to node a: only a's pairs count (b→c is down and ignored).
	scoped := append(slices.Clone(evs), pairEvent{at(0), "a→c/tcp", true}, pairEvent{at(0), "c→a/tcp", true}, pairEvent{at(30), "b→c/tcp", false})
	sc := newMeshTimeline(scoped, 0).scoped([]string{"c"}, []string{"a", "b", "c"})
	if _, ok, _ := sc.wholeAfter(at(5), time.Second); ok {
		t.Error("c's pairs whole though b↔c and the UDP pairs were never seen")
	}
	sc = newMeshTimeline(slices.Clone(scoped), 0).scoped([]string{"a"}, []string{"a", "b"})
	if sc.pairs != 4 {
		t.Errorf("a's pairs among a and b: %d, want 4", sc.pairs)
	}
	// A pair never seen counts as down.
	if _, ok, _ := newMeshTimeline(slices.Clone(evs), 3).wholeAfter(at(5), time.Second); ok {
		t.Error("whole with a pair never seen")
	}
}

// TestOverlapsAndWatchLog: a listing with overlapping or missing pod
// CIDRs is caught, and the watcher's lines (keys hold '=') parse.
func TestOverlapsAndWatchLog(t *testing.T) {
	log := strings.Join([]string{
		"1000000000 nodes a|k1/+AAA=|10.42.0.0/24 b|k2=|10.42.1.0/24,fd00:42::/64",
		"2000000000 err cannot reach the server",
		"3000000000 nodes a|k1/+AAA=|10.42.0.0/24 b|k2=|10.42.0.128/25 c|k3=|",
		"garbage",
	}, "\n")
	ls, failed := parseWatchLog("s1", log)
	if len(ls) != 2 || failed != 1 {
		t.Fatalf("got %d listings and %d failures, want 2 and 1", len(ls), failed)
	}
	if n := ls[0].nodes[1]; n.name != "b" || n.key != "k2=" || len(n.cidrs) != 2 || n.cidrs[1] != netip.MustParsePrefix("fd00:42::/64") {
		t.Errorf("second node parsed as %+v", n)
	}
	if bad := overlaps(ls[0].nodes); len(bad) != 0 {
		t.Errorf("first listing: %v, want no problem", bad)
	}
	bad := overlaps(ls[1].nodes)
	if len(bad) != 2 || !strings.Contains(strings.Join(bad, ";"), "a (10.42.0.0/24) and b (10.42.0.128/25) overlap") {
		t.Errorf("second listing: %v, want the overlap and c without a pod CIDR", bad)
	}
}

func TestPercentile(t *testing.T) {
	var ds []time.Duration
	for i := 1; i <= 100; i++ {
		ds = append(ds, time.Duration(i)*time.Second)
	}
	if p := percentile(ds, 50); p != 50*time.Second {
		t.Errorf("p50 = %v", p)
	}
	if p := percentile(ds, 99); p != 99*time.Second {
		t.Errorf("p99 = %v", p)
	}
	if p := percentile(ds[:1], 99); p != time.Second {
		t.Errorf("p99 of one = %v", p)
	}
}
