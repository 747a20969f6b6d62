package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Errors the helpers return, wrapped in an *Error; test with errors.Is.
var (
	// ErrNotFound: the key does not exist (Get, Update, Delete).
	ErrNotFound = errors.New("key not found")
	// ErrExists: Create found the key already there.
	ErrExists = errors.New("key already exists")
	// ErrConflict: the key's revision is not the one the caller read; read
	// it again and retry (Mutate does this).
	ErrConflict = errors.New("key changed since it was read")
	// ErrClosed: the store was closed.
	ErrClosed = errors.New("store closed")
)

// Error is the error the helpers return: the operation, the key, and what
// went wrong (one of the sentinels above, or the datastore's error).
type Error struct {
	Op  string // get, list, create, update, delete, mutate, compact
	Key string // the key, or the prefix for list
	Err error
}

func (e *Error) Error() string { return fmt.Sprintf("store: %s %q: %v", e.Op, e.Key, e.Err) }
func (e *Error) Unwrap() error { return e.Err }

// fail wraps err for op on key, reporting ErrClosed once the store is
// closed rather than the client's own error.
func (s *Store) fail(op, key string, err error) error {
	if s.ctx.Err() != nil && !errors.Is(err, ErrClosed) {
		err = fmt.Errorf("%w: %w", ErrClosed, err)
	}
	return &Error{Op: op, Key: key, Err: err}
}

// checkOpen returns ErrClosed, wrapped, once Close has been called: the
// closed client would otherwise retry until ctx is done.
func (s *Store) checkOpen(op, key string) error {
	if s.ctx.Err() != nil {
		return &Error{Op: op, Key: key, Err: ErrClosed}
	}
	return nil
}

// KV is a key, its value, and the revision that last modified it.
type KV struct {
	Key         string
	Value       []byte
	ModRevision int64
}

// Get returns key's value and the revision that last modified it, or
// ErrNotFound.
func (s *Store) Get(ctx context.Context, key string) (value []byte, modRev int64, err error) {
	if err := s.checkOpen("get", key); err != nil {
		return nil, 0, err
	}
	resp, err := s.client.Get(ctx, key)
	if err != nil {
		return nil, 0, s.fail("get", key, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, 0, s.fail("get", key, ErrNotFound)
	}
	kv := resp.Kvs[0]
	return kv.Value, kv.ModRevision, nil
}

// List returns every key that starts with prefix, in key order, and the
// store revision of the read: pass rev to Watch to follow changes from
// exactly this snapshot. prefix must not be empty (the whole keyspace
// holds the backend's own keys).
func (s *Store) List(ctx context.Context, prefix string) (kvs []KV, rev int64, err error) {
	if prefix == "" {
		return nil, 0, s.fail("list", prefix, errors.New("empty prefix"))
	}
	if err := s.checkOpen("list", prefix); err != nil {
		return nil, 0, err
	}
	// No sorting, limit, or serializable option: kine supports none of
	// them (pitfall 5). Both backends return keys in order.
	resp, err := s.client.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, 0, s.fail("list", prefix, err)
	}
	kvs = make([]KV, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		kvs = append(kvs, KV{Key: string(kv.Key), Value: kv.Value, ModRevision: kv.ModRevision})
	}
	return kvs, resp.Header.Revision, nil
}

// Create stores value under key if the key does not exist, and returns the
// revision of the write; ErrExists if it does. Of several concurrent
// Creates of one key exactly one succeeds.
func (s *Store) Create(ctx context.Context, key string, value []byte) (modRev int64, err error) {
	if err := s.checkOpen("create", key); err != nil {
		return 0, err
	}
	// The transaction shape kine recognises as a create.
	resp, err := s.client.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, string(value))).
		Commit()
	if err != nil {
		return 0, s.fail("create", key, err)
	}
	if !resp.Succeeded {
		return 0, s.fail("create", key, ErrExists)
	}
	return resp.Header.Revision, nil
}

// Update replaces key's value if the key was last modified at prevRev, and
// returns the revision of the write. It returns ErrConflict if the key has
// changed since, ErrNotFound if it no longer exists. prevRev must be > 0
// (use Create for a new key).
func (s *Store) Update(ctx context.Context, key string, value []byte, prevRev int64) (modRev int64, err error) {
	if prevRev <= 0 {
		return 0, s.fail("update", key, fmt.Errorf("revision %d is not a key's revision: use Create for new keys", prevRev))
	}
	if err := s.checkOpen("update", key); err != nil {
		return 0, err
	}
	// The transaction shape kine recognises as an update.
	resp, err := s.client.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", prevRev)).
		Then(clientv3.OpPut(key, string(value))).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return 0, s.fail("update", key, err)
	}
	if !resp.Succeeded {
		return 0, s.fail("update", key, failedCompare(resp))
	}
	return resp.Header.Revision, nil
}

// Delete removes key if it was last modified at prevRev. It returns
// ErrConflict if the key has changed since, ErrNotFound if it does not
// exist. prevRev must be > 0.
func (s *Store) Delete(ctx context.Context, key string, prevRev int64) error {
	if prevRev <= 0 {
		return s.fail("delete", key, fmt.Errorf("revision %d is not a key's revision", prevRev))
	}
	if err := s.checkOpen("delete", key); err != nil {
		return err
	}
	// The transaction shape kine recognises as a delete of one key.
	resp, err := s.client.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", prevRev)).
		Then(clientv3.OpDelete(key)).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return s.fail("delete", key, err)
	}
	if !resp.Succeeded {
		return s.fail("delete", key, failedCompare(resp))
	}
	// kine answers a delete of a key that never existed with success and
	// nothing deleted.
	if len(resp.Responses) == 1 {
		if d := resp.Responses[0].GetResponseDeleteRange(); d != nil && d.Deleted == 0 {
			return s.fail("delete", key, ErrNotFound)
		}
	}
	return nil
}

// failedCompare tells from the Else(Get) of a failed compare-and-swap
// whether the key changed (ErrConflict) or is gone (ErrNotFound).
func failedCompare(resp *clientv3.TxnResponse) error {
	for _, r := range resp.Responses {
		if rr := r.GetResponseRange(); rr != nil && len(rr.Kvs) > 0 {
			return ErrConflict
		}
	}
	return ErrNotFound
}

// Mutate applies f to key's current value and writes the result with
// compare-and-swap, calling f again on the newer value each time another
// writer got there first, until it succeeds, f fails, or ctx is done. f
// gets exists == false (and old == nil) when the key is missing; it must
// not keep old, and may be called several times. If f returns the value
// the key already has, nothing is written. Mutate returns the key's
// revision afterwards; an error from f is returned wrapped.
//
// Every key with more than one writer must be written this way (or with
// Create/Update): kine can drop concurrent plain puts (pitfall 4).
func (s *Store) Mutate(ctx context.Context, key string, f func(old []byte, exists bool) (new []byte, err error)) (modRev int64, err error) {
	for attempt := 0; ; attempt++ {
		old, rev, err := s.Get(ctx, key)
		exists := err == nil
		if err != nil && !errors.Is(err, ErrNotFound) {
			return 0, err
		}
		next, err := f(old, exists)
		if err != nil {
			return 0, s.fail("mutate", key, err)
		}
		if exists && bytes.Equal(old, next) {
			return rev, nil
		}
		if exists {
			modRev, err = s.Update(ctx, key, next, rev)
		} else {
			modRev, err = s.Create(ctx, key, next)
		}
		switch {
		case err == nil:
			return modRev, nil
		case errors.Is(err, ErrConflict), errors.Is(err, ErrExists), errors.Is(err, ErrNotFound):
			// Lost the race: back off a little, with jitter, and read again.
			d := time.Duration(rand.Int64N(int64(time.Millisecond) << min(attempt, 6)))
			t := time.NewTimer(d)
			select {
			case <-ctx.Done():
				t.Stop()
				return 0, s.fail("mutate", key, fmt.Errorf("%w (gave up after %d attempts: %w)", ErrConflict, attempt+1, ctx.Err()))
			case <-t.C:
			}
		default:
			return 0, err
		}
	}
}

// Compact discards the history before revision rev: values replaced or
// deleted before rev can no longer be read, and a Watch with a fromRev
// below rev starts with a Reset. Compacting to a revision already
// compacted is not an error. The store also compacts by itself
// (Config.CompactInterval).
//
// On kine the newest revision is always kept (rev is lowered to the
// current revision - 1): kine derives the current revision from the newest
// row, so compacting a trailing deletion away would move the revision
// back, and no watch could start until the next write.
func (s *Store) Compact(ctx context.Context, rev int64) error {
	if err := s.checkOpen("compact", fmt.Sprint(rev)); err != nil {
		return err
	}
	if s.kine != nil {
		cur, err := s.currentRevision(ctx)
		if err != nil {
			return s.fail("compact", fmt.Sprint(rev), err)
		}
		rev = min(rev, cur-1)
	}
	if rev <= s.compacted.Load() {
		// Done already; asking again makes kine log an error.
		return nil
	}
	if _, err := s.client.Compact(ctx, rev); err != nil && !errors.Is(err, rpctypes.ErrCompacted) {
		return s.fail("compact", fmt.Sprint(rev), err)
	}
	for {
		old := s.compacted.Load()
		if rev <= old || s.compacted.CompareAndSwap(old, rev) {
			return nil
		}
	}
}

// currentRevision returns the store's current revision. Any read returns
// it in its header; the key need not exist.
func (s *Store) currentRevision(ctx context.Context) (int64, error) {
	resp, err := s.client.Get(ctx, "/trellis/")
	if err != nil {
		return 0, err
	}
	return resp.Header.Revision, nil
}

// compactLoop compacts every interval to retain revisions behind the
// current one.
func (s *Store) compactLoop(ctx context.Context, interval time.Duration, retain int64) {
	t := time.NewTicker(interval)
	defer t.Stop()
	var done int64
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rev, err := s.currentRevision(ctx)
		if err != nil {
			if ctx.Err() == nil {
				s.log.Warn("compaction: cannot read the current revision", "err", err)
			}
			continue
		}
		target := rev - retain
		if target <= done {
			continue
		}
		if err := s.Compact(ctx, target); err != nil {
			if ctx.Err() == nil {
				s.log.Warn("compaction failed", "revision", target, "err", err)
			}
			continue
		}
		done = target
		s.log.Debug("compacted", "revision", target)
	}
}
