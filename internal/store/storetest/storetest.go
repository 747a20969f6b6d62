// Package storetest is the conformance suite every store backend passes.
package storetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/store"
)

// eventTimeout bounds the wait for one watch event. It is far above the
// latencies measured (milliseconds) and above kine's default poll interval.
const eventTimeout = 10 * time.Second

// Run runs the suite. open must return an open store for t, and must
// return a store on the same data each time it is called with the same t
// (the suite closes a store and opens it again to check that nothing is
// lost). open should close the store in t.Cleanup; the suite may close it
// first (Close is idempotent). The suite does not need an empty store:
// every subtest works under a key prefix of its own.
func Run(t *testing.T, open func(t *testing.T) *store.Store) {
	tests := []struct {
		name string
		f    func(t *testing.T, s *store.Store, p string)
	}{
		{"GetMissing", testGetMissing},
		{"CreateGet", testCreateGet},
		{"Values", testValues},
		{"Update", testUpdate},
		{"Delete", testDelete},
		{"List", testList},
		{"CreateRace", testCreateRace},
		{"UpdateRace", testUpdateRace},
		{"Mutate", testMutate},
		{"MutateConcurrent", testMutateConcurrent},
		{"WatchOrder", testWatchOrder},
		{"WatchFromZero", testWatchFromZero},
		{"WatchResume", testWatchResume},
		{"WatchCompacted", testWatchCompacted},
		{"WatchStops", testWatchStops},
		{"LeaseHeartbeat", testLeaseHeartbeat},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.f(t, open(t), prefix(t))
		})
	}
	t.Run("Close", func(t *testing.T) { testClose(t, open) })
	t.Run("Restart", func(t *testing.T) { testRestart(t, open) })
}

// prefix returns a key prefix no other test (or earlier run against the
// same datastore) uses.
func prefix(t *testing.T) string {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return "/storetest/" + hex.EncodeToString(b[:]) + "/" + t.Name() + "/"
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func mustCreate(t *testing.T, s *store.Store, key, value string) int64 {
	t.Helper()
	rev, err := s.Create(ctxFor(t), key, []byte(value))
	if err != nil {
		t.Fatalf("Create(%q): %v", key, err)
	}
	if rev <= 0 {
		t.Fatalf("Create(%q) = revision %d, want > 0", key, rev)
	}
	return rev
}

func mustGet(t *testing.T, s *store.Store, key, want string, wantRev int64) {
	t.Helper()
	v, rev, err := s.Get(ctxFor(t), key)
	if err != nil {
		t.Fatalf("Get(%q): %v", key, err)
	}
	if string(v) != want || rev != wantRev {
		t.Fatalf("Get(%q) = %q@%d, want %q@%d", key, v, rev, want, wantRev)
	}
}

func wantErr(t *testing.T, what string, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("%s: err = %v, want %v", what, err, target)
	}
	var se *store.Error
	if !errors.As(err, &se) || se.Op == "" {
		t.Fatalf("%s: err %v is not a *store.Error with an operation", what, err)
	}
}

func testGetMissing(t *testing.T, s *store.Store, p string) {
	_, _, err := s.Get(ctxFor(t), p+"missing")
	wantErr(t, "Get(missing)", err, store.ErrNotFound)
	var se *store.Error
	if errors.As(err, &se); se.Op != "get" || se.Key != p+"missing" {
		t.Errorf("error %v: Op %q Key %q, want get and the key", err, se.Op, se.Key)
	}
}

func testCreateGet(t *testing.T, s *store.Store, p string) {
	ctx := ctxFor(t)
	rev := mustCreate(t, s, p+"a", "one")
	mustGet(t, s, p+"a", "one", rev)
	_, err := s.Create(ctx, p+"a", []byte("two"))
	wantErr(t, "second Create", err, store.ErrExists)
	mustGet(t, s, p+"a", "one", rev)
	rev2 := mustCreate(t, s, p+"b", "x")
	if rev2 <= rev {
		t.Errorf("revisions do not increase: %d then %d", rev, rev2)
	}
}

func testValues(t *testing.T, s *store.Store, p string) {
	ctx := ctxFor(t)
	big := bytes.Repeat([]byte("0123456789abcdef"), 16*1024) // 256 KiB
	for name, v := range map[string][]byte{
		"empty":  {},
		"binary": {0, 1, 2, 0xff, 0, '\n'},
		"big":    big,
	} {
		rev, err := s.Create(ctx, p+name, v)
		if err != nil {
			t.Fatalf("Create(%s): %v", name, err)
		}
		got, grev, err := s.Get(ctx, p+name)
		if err != nil || !bytes.Equal(got, v) || grev != rev {
			t.Errorf("Get(%s) = %d bytes @%d, %v; want %d bytes @%d", name, len(got), grev, err, len(v), rev)
		}
	}
	key := p + "unicode/ключ/🔑"
	rev := mustCreate(t, s, key, "v")
	mustGet(t, s, key, "v", rev)
}

func testUpdate(t *testing.T, s *store.Store, p string) {
	ctx := ctxFor(t)
	rev1 := mustCreate(t, s, p+"k", "v1")
	rev2, err := s.Update(ctx, p+"k", []byte("v2"), rev1)
	if err != nil {
		t.Fatalf("Update: %v", err)
	}
	if rev2 <= rev1 {
		t.Fatalf("Update revision %d not above %d", rev2, rev1)
	}
	mustGet(t, s, p+"k", "v2", rev2)

	_, err = s.Update(ctx, p+"k", []byte("stale"), rev1)
	wantErr(t, "Update with a stale revision", err, store.ErrConflict)
	mustGet(t, s, p+"k", "v2", rev2)

	_, err = s.Update(ctx, p+"missing", []byte("x"), rev2)
	wantErr(t, "Update of a missing key", err, store.ErrNotFound)
	if _, _, err := s.Get(ctx, p+"missing"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Update of a missing key created it: %v", err)
	}

	if _, err := s.Update(ctx, p+"k", []byte("x"), 0); err == nil {
		t.Fatal("Update with revision 0 succeeded")
	}
	mustGet(t, s, p+"k", "v2", rev2)
}

func testDelete(t *testing.T, s *store.Store, p string) {
	ctx := ctxFor(t)
	rev1 := mustCreate(t, s, p+"k", "v1")
	rev2, err := s.Update(ctx, p+"k", []byte("v2"), rev1)
	if err != nil {
		t.Fatal(err)
	}
	wantErr(t, "Delete with a stale revision", s.Delete(ctx, p+"k", rev1), store.ErrConflict)
	mustGet(t, s, p+"k", "v2", rev2)

	if err := s.Delete(ctx, p+"k", rev2); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	_, _, err = s.Get(ctx, p+"k")
	wantErr(t, "Get after Delete", err, store.ErrNotFound)
	wantErr(t, "second Delete", s.Delete(ctx, p+"k", rev2), store.ErrNotFound)
	wantErr(t, "Delete of a key that never existed", s.Delete(ctx, p+"never", rev2), store.ErrNotFound)
	if err := s.Delete(ctx, p+"k", 0); err == nil {
		t.Fatal("Delete with revision 0 succeeded")
	}

	// A deleted key can be created again.
	rev3 := mustCreate(t, s, p+"k", "v3")
	mustGet(t, s, p+"k", "v3", rev3)
}

func testList(t *testing.T, s *store.Store, p string) {
	ctx := ctxFor(t)
	kvs, rev, err := s.List(ctx, p)
	if err != nil || len(kvs) != 0 || rev <= 0 {
		t.Fatalf("List(empty prefix range) = %v @%d, %v; want nothing @>0", kvs, rev, err)
	}
	want := map[string]int64{}
	for _, k := range []string{"c", "a", "b/1", "b/2"} {
		want[p+"dir/"+k] = mustCreate(t, s, p+"dir/"+k, "v-"+k)
	}
	mustCreate(t, s, p+"dirx", "sibling, not under dir/")
	mustCreate(t, s, p+"di", "shorter, not under dir/")
	last := mustCreate(t, s, p+"zzz", "after")
	delRev := mustCreate(t, s, p+"dir/deleted", "gone")
	if err := s.Delete(ctx, p+"dir/deleted", delRev); err != nil {
		t.Fatal(err)
	}

	kvs, rev, err = s.List(ctx, p+"dir/")
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	if rev < last {
		t.Errorf("List revision %d below the last write %d", rev, last)
	}
	keys := []string{p + "dir/a", p + "dir/b/1", p + "dir/b/2", p + "dir/c"}
	if len(kvs) != len(keys) {
		t.Fatalf("List returned %d keys %v, want %v", len(kvs), kvs, keys)
	}
	for i, kv := range kvs {
		if kv.Key != keys[i] {
			t.Errorf("List[%d].Key = %q, want %q (key order)", i, kv.Key, keys[i])
		}
		if wantV := "v-" + kv.Key[len(p+"dir/"):]; string(kv.Value) != wantV || kv.ModRevision != want[kv.Key] {
			t.Errorf("List[%d] = %q@%d, want %q@%d", i, kv.Value, kv.ModRevision, wantV, want[kv.Key])
		}
	}
	if _, _, err := s.List(ctx, ""); err == nil {
		t.Error("List(\"\") succeeded; want an error")
	}
}

// racers is how many goroutines race for one key.
const racers = 16

func testCreateRace(t *testing.T, s *store.Store, p string) {
	ctx := ctxFor(t)
	const keys = 4
	var wins [keys]atomic.Int32
	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make(chan error, keys*racers)
	for k := range keys {
		for r := range racers {
			wg.Go(func() {
				<-start
				_, err := s.Create(ctx, fmt.Sprintf("%sclaim/%d", p, k), []byte(strconv.Itoa(r)))
				switch {
				case err == nil:
					wins[k].Add(1)
				case !errors.Is(err, store.ErrExists):
					errs <- err
				}
			})
		}
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("racing Create: %v", err)
	}
	for k := range keys {
		if n := wins[k].Load(); n != 1 {
			t.Errorf("key %d: %d racing Creates succeeded, want exactly 1", k, n)
		}
	}
}

func testUpdateRace(t *testing.T, s *store.Store, p string) {
	ctx := ctxFor(t)
	rev := mustCreate(t, s, p+"k", "start")
	var wins atomic.Int32
	var winner atomic.Value
	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make(chan error, racers)
	for r := range racers {
		wg.Go(func() {
			<-start
			v := "racer-" + strconv.Itoa(r)
			newRev, err := s.Update(ctx, p+"k", []byte(v), rev)
			switch {
			case err == nil:
				wins.Add(1)
				winner.Store(kvRev{v, newRev})
			case !errors.Is(err, store.ErrConflict):
				errs <- err
			}
		})
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("racing Update: %v", err)
	}
	if n := wins.Load(); n != 1 {
		t.Fatalf("%d racing Updates succeeded, want exactly 1", n)
	}
	w := winner.Load().(kvRev)
	mustGet(t, s, p+"k", w.Value, w.Rev)
}

// kvRev is a value and its revision.
type kvRev struct {
	Value string
	Rev   int64
}

func testMutate(t *testing.T, s *store.Store, p string) {
	ctx := ctxFor(t)
	key := p + "m"
	rev, err := s.Mutate(ctx, key, func(old []byte, exists bool) ([]byte, error) {
		if exists || old != nil {
			t.Errorf("first Mutate: exists=%v old=%q", exists, old)
		}
		return []byte("1"), nil
	})
	if err != nil {
		t.Fatalf("Mutate (create): %v", err)
	}
	mustGet(t, s, key, "1", rev)

	rev2, err := s.Mutate(ctx, key, func(old []byte, exists bool) ([]byte, error) {
		if !exists || string(old) != "1" {
			t.Errorf("second Mutate: exists=%v old=%q", exists, old)
		}
		return []byte("2"), nil
	})
	if err != nil || rev2 <= rev {
		t.Fatalf("Mutate (update) = %d, %v; want a revision above %d", rev2, err, rev)
	}

	// Unchanged value: no write.
	rev3, err := s.Mutate(ctx, key, func(old []byte, _ bool) ([]byte, error) { return old, nil })
	if err != nil || rev3 != rev2 {
		t.Fatalf("no-op Mutate = %d, %v; want %d (no write)", rev3, err, rev2)
	}

	boom := errors.New("boom")
	_, err = s.Mutate(ctx, key, func([]byte, bool) ([]byte, error) { return nil, boom })
	wantErr(t, "Mutate with a failing function", err, boom)
	mustGet(t, s, key, "2", rev2)
}

func testMutateConcurrent(t *testing.T, s *store.Store, p string) {
	ctx := ctxFor(t)
	const each = 5
	key := p + "counter"
	var wg sync.WaitGroup
	for range racers {
		wg.Go(func() {
			for range each {
				_, err := s.Mutate(ctx, key, func(old []byte, exists bool) ([]byte, error) {
					n := 0
					if exists {
						var err error
						if n, err = strconv.Atoi(string(old)); err != nil {
							return nil, err
						}
					}
					return []byte(strconv.Itoa(n + 1)), nil
				})
				if err != nil {
					t.Errorf("Mutate: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
	v, _, err := s.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if string(v) != strconv.Itoa(racers*each) {
		t.Fatalf("counter = %s after %d increments by %d writers; lost updates", v, racers*each, racers)
	}
}

// next returns the next event from ch or fails.
func next(t *testing.T, ch <-chan store.Event) store.Event {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if !ok {
			t.Fatal("watch channel closed early")
		}
		return ev
	case <-time.After(eventTimeout):
		t.Fatalf("no watch event within %s", eventTimeout)
	}
	panic("unreachable")
}

func wantEvent(t *testing.T, ev store.Event, typ store.EventType, key, value string, rev int64) {
	t.Helper()
	if ev.Type != typ || ev.KV.Key != key || ev.KV.ModRevision != rev || ev.Rev != rev || (typ == store.EventPut && string(ev.KV.Value) != value) {
		t.Fatalf("event = %v %q=%q @%d (Rev %d), want %v %q=%q @%d", ev.Type, ev.KV.Key, ev.KV.Value, ev.KV.ModRevision, ev.Rev, typ, key, value, rev)
	}
}

func wantReset(t *testing.T, ev store.Event, state map[string]string) {
	t.Helper()
	if ev.Type != store.EventReset {
		t.Fatalf("event = %v %q, want reset", ev.Type, ev.KV.Key)
	}
	got := map[string]string{}
	for _, kv := range ev.State {
		got[kv.Key] = string(kv.Value)
		if kv.ModRevision > ev.Rev {
			t.Errorf("reset: %s at revision %d above the reset revision %d", kv.Key, kv.ModRevision, ev.Rev)
		}
	}
	if len(got) != len(state) {
		t.Fatalf("reset state = %v, want %v", got, state)
	}
	for k, v := range state {
		if got[k] != v {
			t.Fatalf("reset state = %v, want %v", got, state)
		}
	}
}

func testWatchOrder(t *testing.T, s *store.Store, p string) {
	ctx := ctxFor(t)
	mustCreate(t, s, p+"old", "before the watch")
	_, rev, err := s.List(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	ch := s.Watch(ctx, p, rev)
	mustCreate(t, s, strings.TrimSuffix(p, "/")+"x/outside", "not under the prefix")

	r1 := mustCreate(t, s, p+"a", "1")
	r2, err := s.Update(ctx, p+"a", []byte("2"), r1)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, p+"a", r2); err != nil {
		t.Fatal(err)
	}
	if _, _, err = s.Get(ctx, p+"a"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get after Delete: %v", err)
	}
	r4 := mustCreate(t, s, p+"b", "x")

	wantEvent(t, next(t, ch), store.EventPut, p+"a", "1", r1)
	wantEvent(t, next(t, ch), store.EventPut, p+"a", "2", r2)
	del := next(t, ch)
	if del.Type != store.EventDelete || del.KV.Key != p+"a" || del.KV.ModRevision <= r2 || del.KV.ModRevision >= r4 || del.KV.Value != nil {
		t.Fatalf("event = %v %q=%q @%d, want delete %q between %d and %d", del.Type, del.KV.Key, del.KV.Value, del.KV.ModRevision, p+"a", r2, r4)
	}
	wantEvent(t, next(t, ch), store.EventPut, p+"b", "x", r4)
}

func testWatchFromZero(t *testing.T, s *store.Store, p string) {
	ctx := ctxFor(t)
	mustCreate(t, s, p+"a", "1")
	mustCreate(t, s, p+"b", "2")
	ch := s.Watch(ctx, p, 0)
	reset := next(t, ch)
	wantReset(t, reset, map[string]string{p + "a": "1", p + "b": "2"})
	r := mustCreate(t, s, p+"c", "3")
	if r <= reset.Rev {
		t.Fatalf("write after reset at %d, reset at %d", r, reset.Rev)
	}
	wantEvent(t, next(t, ch), store.EventPut, p+"c", "3", r)
}

func testWatchResume(t *testing.T, s *store.Store, p string) {
	ctx := ctxFor(t)
	_, rev, err := s.List(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	r1 := mustCreate(t, s, p+"a", "1")
	r2 := mustCreate(t, s, p+"b", "2")
	// Resume from a revision in the past: the events after it come first.
	wctx, cancel := context.WithCancel(ctx)
	ch := s.Watch(wctx, p, rev)
	wantEvent(t, next(t, ch), store.EventPut, p+"a", "1", r1)
	first := next(t, ch)
	wantEvent(t, first, store.EventPut, p+"b", "2", r2)
	cancel()

	// Resume from the last event's Rev: nothing is repeated.
	ch = s.Watch(ctx, p, first.Rev)
	r3 := mustCreate(t, s, p+"c", "3")
	wantEvent(t, next(t, ch), store.EventPut, p+"c", "3", r3)
}

func testWatchCompacted(t *testing.T, s *store.Store, p string) {
	ctx := ctxFor(t)
	rev := mustCreate(t, s, p+"k", "0")
	start := rev
	var err error
	for i := 1; i <= 5; i++ {
		if rev, err = s.Update(ctx, p+"k", []byte(strconv.Itoa(i)), rev); err != nil {
			t.Fatal(err)
		}
	}
	gone := mustCreate(t, s, p+"gone", "x")
	if err := s.Delete(ctx, p+"gone", gone); err != nil {
		t.Fatal(err)
	}
	_, cur, err := s.List(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Compact(ctx, cur); err != nil {
		t.Fatalf("Compact(%d): %v", cur, err)
	}
	if err := s.Compact(ctx, cur); err != nil {
		t.Fatalf("Compact(%d) again: %v", cur, err)
	}

	ch := s.Watch(ctx, p, start)
	reset := next(t, ch)
	wantReset(t, reset, map[string]string{p + "k": "5"})
	r, err := s.Update(ctx, p+"k", []byte("6"), rev)
	if err != nil {
		t.Fatal(err)
	}
	wantEvent(t, next(t, ch), store.EventPut, p+"k", "6", r)
}

func testWatchStops(t *testing.T, s *store.Store, p string) {
	ctx, cancel := context.WithCancel(ctxFor(t))
	ch := s.Watch(ctx, p, 0)
	next(t, ch) // the reset
	cancel()
	// The watch may still hand over an event it had; then it must close.
	deadline := time.After(eventTimeout)
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return
			}
		case <-deadline:
			t.Fatal("watch channel not closed after its context was cancelled")
		}
	}
}

func testClose(t *testing.T, open func(t *testing.T) *store.Store) {
	s := open(t)
	p := prefix(t)
	ch := s.Watch(ctxFor(t), p, 0)
	next(t, ch)
	mustCreate(t, s, p+"k", "v")
	done := make(chan struct{})
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i := range errs {
		wg.Go(func() { errs[i] = s.Close() })
	}
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Close did not return")
	}
	for i, err := range errs {
		if err != nil {
			t.Errorf("Close #%d: %v", i, err)
		}
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close after Close: %v", err)
	}
	// The watch channel is closed (possibly after the event in flight).
	for range ch {
	}
	// Helpers fail with ErrClosed; Watch returns a closed channel.
	ctx := ctxFor(t)
	_, _, err := s.Get(ctx, p+"k")
	wantErr(t, "Get after Close", err, store.ErrClosed)
	_, err = s.Create(ctx, p+"x", nil)
	wantErr(t, "Create after Close", err, store.ErrClosed)
	if _, ok := <-s.Watch(ctx, p, 0); ok {
		t.Error("Watch after Close delivered an event")
	}
}

func testRestart(t *testing.T, open func(t *testing.T) *store.Store) {
	ctx := ctxFor(t)
	p := prefix(t)
	s := open(t)
	want := map[string]kvRev{}
	for i := range 20 {
		k := fmt.Sprintf("%sk%02d", p, i)
		want[k] = kvRev{"v" + strconv.Itoa(i), mustCreate(t, s, k, "v"+strconv.Itoa(i))}
	}
	up, err := s.Update(ctx, p+"k03", []byte("updated"), want[p+"k03"].Rev)
	if err != nil {
		t.Fatal(err)
	}
	want[p+"k03"] = kvRev{"updated", up}
	if err := s.Delete(ctx, p+"k07", want[p+"k07"].Rev); err != nil {
		t.Fatal(err)
	}
	delete(want, p+"k07")
	_, before, err := s.List(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	s = open(t)
	kvs, after, err := s.List(ctx, p)
	if err != nil {
		t.Fatalf("List after restart: %v", err)
	}
	if after < before {
		t.Errorf("revision went back across the restart: %d then %d", before, after)
	}
	if len(kvs) != len(want) {
		t.Fatalf("after restart: %d keys, want %d", len(kvs), len(want))
	}
	for _, kv := range kvs {
		if w, ok := want[kv.Key]; !ok || string(kv.Value) != w.Value || kv.ModRevision != w.Rev {
			t.Errorf("after restart: %s = %q@%d, want %q@%d", kv.Key, kv.Value, kv.ModRevision, w.Value, w.Rev)
		}
	}
	// Revisions read before the restart still work for compare-and-swap.
	if _, err := s.Update(ctx, p+"k03", []byte("again"), up); err != nil {
		t.Errorf("Update with a revision read before the restart: %v", err)
	}
	// A watch from a revision before the restart sees the changes since.
	ch := s.Watch(ctx, p, before)
	ev := next(t, ch)
	wantEvent(t, ev, store.EventPut, p+"k03", "again", ev.Rev)
}
