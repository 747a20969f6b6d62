package storetest

import (
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/trellis-mesh/trellis/internal/store"
)

// testLeaseHeartbeat checks the heartbeat that readiness keys use, the
// only lease use kine supports: a new Grant and a Put with it each time.
// A put under a new lease keeps the key past the old lease's expiry, and
// the key goes, with a delete event, when the last lease expires.
func testLeaseHeartbeat(t *testing.T, s *store.Store, p string) {
	ctx := ctxFor(t)
	c := s.Client()
	key := p + "ready"
	ch := s.Watch(ctx, p, 0)
	next(t, ch) // the reset
	put := func(ttl int64, value string) time.Time {
		t.Helper()
		l, err := c.Grant(ctx, ttl)
		if err != nil {
			t.Fatalf("Grant: %v", err)
		}
		if _, err := c.Put(ctx, key, value, clientv3.WithLease(l.ID)); err != nil {
			t.Fatalf("Put with lease: %v", err)
		}
		if ev := next(t, ch); ev.Type != store.EventPut || string(ev.KV.Value) != value {
			t.Fatalf("after the put: %v %q", ev.Type, ev.KV.Value)
		}
		return time.Now()
	}
	put(2, "1")
	time.Sleep(time.Second)
	last := put(4, "2")
	// Past the first lease's expiry the key is still there.
	time.Sleep(2 * time.Second)
	if v, _, err := s.Get(ctx, key); err != nil || string(v) != "2" {
		t.Fatalf("the key went with the old lease: %q, %v", v, err)
	}
	ev := next(t, ch)
	if ev.Type != store.EventDelete || ev.KV.Key != key {
		t.Fatalf("want the key's deletion when its lease expires, got %v %s", ev.Type, ev.KV.Key)
	}
	if d := time.Since(last); d < 3*time.Second {
		t.Errorf("the key went %v after a put with a 4 s lease", d)
	}
}
