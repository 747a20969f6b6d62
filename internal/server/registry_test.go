package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/trellis-mesh/trellis/internal/store"
)

// listCounter counts the List calls of the kv under it.
type listCounter struct {
	kv
	lists atomic.Int64
}

func (l *listCounter) List(ctx context.Context, prefix string) ([]store.KV, int64, error) {
	l.lists.Add(1)
	return l.kv.List(ctx, prefix)
}

// TestAdoptPodCIDRsReleasesByKey: a node that adopts its Node's pod CIDR
// releases the claim of the CIDR it held before, leaves everyone else's
// claims alone, and lists no claims to do it (a sweep of every claim per
// adoption made a thousand Nodes registering at once cost a thousand
// lists of a thousand claims: 58 s before every netmap had them).
func TestAdoptPodCIDRsReleasesByKey(t *testing.T) {
	ts := startServer(t, t.TempDir(), nil)
	ctx := context.Background()
	const n = 20
	held := map[string]netip.Prefix{}
	for i := range n {
		j := mustJoin(t, ts, joinReq(fmt.Sprintf("n%02d", i), byte(i+1), pwA))
		held[j.resp.Node.Name] = j.resp.Node.PodCIDRs[0]
	}
	// A registry of its own on the server's store (the server's own is
	// in use by its goroutines).
	lc := &listCounter{kv: ts.reg.kv}
	reg := &registry{kv: lc, clusterCIDRs: ts.reg.clusterCIDRs, now: ts.reg.now}
	want := netip.MustParsePrefix("10.42.200.0/24")
	if err := reg.adoptPodCIDRs(ctx, "n05", "uid-5", []netip.Prefix{want}); err != nil {
		t.Fatal(err)
	}
	if k := lc.lists.Load(); k != 0 {
		t.Errorf("the adoption listed keys %d times, want 0", k)
	}
	rec, _, err := reg.get(ctx, "n05")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(rec.PodCIDRs, []netip.Prefix{want}) || rec.NodeUID != "uid-5" {
		t.Fatalf("n05 holds %v (Node %q), want %v from uid-5", rec.PodCIDRs, rec.NodeUID, want)
	}
	if _, _, err := reg.kv.Get(ctx, claimKey(held["n05"])); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("n05's old claim of %s: %v, want it released", held["n05"], err)
	}
	for name, p := range held {
		if name == "n05" {
			p, name = want, "n05"
		}
		v, _, err := reg.kv.Get(ctx, claimKey(p))
		if err != nil {
			t.Errorf("claim of %s (%s): %v", p, name, err)
			continue
		}
		var c claim
		if err := json.Unmarshal(v, &c); err != nil || c.Node != name {
			t.Errorf("claim of %s is %q's (%v), want %s's", p, c.Node, err, name)
		}
	}
}
