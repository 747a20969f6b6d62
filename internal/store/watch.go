package store

import (
	"context"
	"errors"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// EventType says what an Event reports.
type EventType int

const (
	// EventPut: KV was created or updated.
	EventPut EventType = iota + 1
	// EventDelete: KV.Key was deleted at revision KV.ModRevision.
	EventDelete
	// EventReset: State is everything under the prefix; forget all else.
	EventReset
)

func (t EventType) String() string {
	switch t {
	case EventPut:
		return "put"
	case EventDelete:
		return "delete"
	case EventReset:
		return "reset"
	}
	return "unknown"
}

// Event is one change seen by Watch.
type Event struct {
	Type EventType
	// KV is, for EventPut, the key with its new value and the revision of
	// the write; for EventDelete, the key and the revision of the deletion
	// (Value nil). Zero for EventReset.
	KV KV
	// State is, for EventReset, every key under the prefix at revision Rev,
	// in key order (possibly empty). nil otherwise.
	State []KV
	// Rev is the store revision the consumer is up to once it has applied
	// this event: KV.ModRevision for EventPut and EventDelete, the
	// revision State was read at for EventReset. Passing it to Watch as
	// fromRev resumes right after this event.
	Rev int64
}

// Watch backoff: after a watch broke without an answer from the
// datastore, it is retried after watchRetryMin, doubling to watchRetryMax.
const (
	watchRetryMin = 100 * time.Millisecond
	watchRetryMax = 10 * time.Second
	// watchHealthy is how long a watch must have run for the next failure
	// to be retried at once.
	watchHealthy = 10 * time.Second
)

// Watch follows the keys under prefix (which must not be empty) and sends
// what happens to them on the returned channel, under this contract:
//
//   - If fromRev > 0, the first events are the changes made after revision
//     fromRev (typically the rev of a List). If fromRev <= 0, the first
//     event is a Reset.
//   - Put and Delete events come in revision order, each change once, and
//     Rev never decreases.
//   - When the watch cannot continue from the last revision it delivered
//     (that revision was compacted, or the stream broke or was cancelled
//     by the datastore), it lists the prefix again and sends a Reset whose
//     State is everything under the prefix at revision Rev. The consumer
//     must then replace all it knows about the prefix with State: changes
//     between the last event and the Reset, deletions included, are not
//     sent separately. Events after a Reset have revisions above its Rev.
//     If listing fails, Watch retries with backoff and logs; nothing is
//     sent meanwhile.
//   - The channel is unbuffered: Watch waits for the consumer, and the
//     etcd client buffers behind it.
//   - When ctx is done or the store is closed, Watch stops and closes the
//     channel. Close waits for that to happen; nothing else closes it.
func (s *Store) Watch(ctx context.Context, prefix string, fromRev int64) <-chan Event {
	ch := make(chan Event)
	if prefix == "" {
		s.log.Error("watch with an empty prefix refused")
		close(ch)
		return ch
	}
	started := s.goOwned(func(storeCtx context.Context) {
		defer close(ch)
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		stop := context.AfterFunc(storeCtx, cancel)
		defer stop()
		s.watch(ctx, prefix, fromRev, ch)
	})
	if !started {
		close(ch)
	}
	return ch
}

// watch runs the loop of Watch until ctx is done.
func (s *Store) watch(ctx context.Context, prefix string, rev int64, ch chan<- Event) {
	log := s.log.With("prefix", prefix)
	send := func(ev Event) bool {
		select {
		case ch <- ev:
			return true
		case <-ctx.Done():
			return false
		}
	}
	sleep := func(d time.Duration) bool {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
			return true
		case <-ctx.Done():
			return false
		}
	}
	retry := watchRetryMin
	backoff := func() bool {
		d := retry
		retry = min(2*retry, watchRetryMax)
		return sleep(d)
	}

	reset := rev <= 0
	// compactRev is the latest compaction revision a watch reported. A
	// list made after that compaction reflects every change up to it, even
	// when its header says less: kine derives the header from the rows
	// left, and compaction can remove the newest ones (tombstones).
	var compactRev int64
	// lastCompactedEmpty: the previous watch ended compacted before it
	// delivered anything.
	lastCompactedEmpty := false
	for ctx.Err() == nil {
		if reset {
			kvs, listRev, err := s.List(ctx, prefix)
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				log.Warn("watch: cannot list to resynchronise; will retry", "err", err)
				if !backoff() {
					return
				}
				continue
			}
			rev, reset = max(listRev, compactRev), false
			if !send(Event{Type: EventReset, State: kvs, Rev: rev}) {
				return
			}
		}

		start, from := time.Now(), rev
		cr, err := s.follow(ctx, prefix, &rev, send)
		if ctx.Err() != nil {
			return
		}
		reset = true
		switch {
		case errors.Is(err, rpctypes.ErrCompacted):
			compactRev = max(compactRev, cr)
			// Compacted again with nothing delivered: something is off;
			// do not spin.
			if lastCompactedEmpty && rev == from {
				log.Warn("watch: compacted again right after a reset; resetting after backoff", "rev", rev, "compactRev", cr, "backoff", retry)
				if !backoff() {
					return
				}
			} else {
				log.Debug("watch: revision compacted; resetting", "rev", rev, "compactRev", cr)
			}
			lastCompactedEmpty = rev == from
			continue
		case time.Since(start) >= watchHealthy:
			retry = watchRetryMin
			log.Debug("watch broke; resetting", "err", err)
		default:
			log.Warn("watch broke; resetting after backoff", "err", err, "backoff", retry)
			if !backoff() {
				return
			}
		}
		lastCompactedEmpty = false
	}
}

// follow watches prefix from *rev+1, sends each event and advances *rev,
// until the watch ends; it returns why, and the compaction revision if the
// datastore reported one.
func (s *Store) follow(ctx context.Context, prefix string, rev *int64, send func(Event) bool) (compactRev int64, err error) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	from := *rev
	wch := s.client.Watch(wctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(from+1))
	for resp := range wch {
		if err := resp.Err(); err != nil {
			return resp.CompactRevision, err
		}
		for _, e := range resp.Events {
			ev := Event{KV: KV{Key: string(e.Kv.Key), ModRevision: e.Kv.ModRevision}, Rev: e.Kv.ModRevision}
			switch e.Type {
			case mvccpb.PUT:
				ev.Type, ev.KV.Value = EventPut, e.Kv.Value
			case mvccpb.DELETE:
				ev.Type = EventDelete
			default:
				continue
			}
			if ev.Rev <= from {
				// Not asked for; never go back. (Several events may share a
				// revision: one transaction of the raw client.)
				continue
			}
			if !send(ev) {
				return 0, ctx.Err()
			}
			*rev = ev.Rev
		}
	}
	return 0, errors.New("watch channel closed")
}
