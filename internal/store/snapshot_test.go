package store_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/trellis-mesh/trellis/internal/store"
)

// A snapshot taken while the server runs holds what was written before
// it; restoring it (server stopped) brings exactly that back.
func TestSnapshotSQLite(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	dir := t.TempDir()
	s, err := store.Open(ctx, store.Config{DataDir: dir, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"a", "b", "c"} {
		if _, err := s.Create(ctx, "/trellis/test/"+k, []byte(k)); err != nil {
			t.Fatal(err)
		}
	}
	snap := filepath.Join(t.TempDir(), "snap.db")
	if err := store.SnapshotSQLite(ctx, dir, snap); err != nil {
		t.Fatalf("snapshot of a running store: %v", err)
	}
	if err := store.SnapshotSQLite(ctx, dir, snap); err == nil {
		t.Error("a snapshot overwrote an existing file")
	}
	if _, err := s.Create(ctx, "/trellis/test/after", []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := store.RestoreSQLite(ctx, dir, snap); err == nil || !strings.Contains(err.Error(), "stop it") {
		t.Fatalf("restore while the server runs: %v; want a refusal", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(t.TempDir(), "bad.db")
	if err := os.WriteFile(bad, []byte("not a database"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := store.RestoreSQLite(ctx, dir, bad); err == nil {
		t.Fatal("restore of a file that is no snapshot succeeded")
	}
	if err := store.RestoreSQLite(ctx, dir, snap); err != nil {
		t.Fatalf("restore: %v", err)
	}
	s, err = store.Open(ctx, store.Config{DataDir: dir, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	kvs, _, err := s.List(ctx, "/trellis/test/")
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, kv := range kvs {
		keys = append(keys, strings.TrimPrefix(kv.Key, "/trellis/test/"))
	}
	if strings.Join(keys, ",") != "a,b,c" {
		t.Errorf("after restore: keys %v, want a,b,c", keys)
	}
	// The store writes on after a restore.
	if _, err := s.Create(ctx, "/trellis/test/d", []byte("d")); err != nil {
		t.Fatal(err)
	}
	if matches, _ := filepath.Glob(store.SQLitePath(dir) + ".before-restore-*"); len(matches) != 1 {
		t.Errorf("the replaced database was not kept: %v", matches)
	}
}

// An embedded etcd member's snapshot is an etcd database holding the
// keys.
func TestSnapshotEtcd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts an etcd member; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	members := newTestCluster(t, t.TempDir(), 1)
	s := openCluster(t, members)[0]
	if _, err := s.Create(ctx, "/trellis/test/k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	snap := filepath.Join(t.TempDir(), "etcd.db")
	f, err := os.Create(snap)
	if err != nil {
		t.Fatal(err)
	}
	m := members[0].cfg
	tc, err := tlsFor(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := store.SnapshotEtcd(ctx, "https://"+m.ClientAddr.String(), tc, f); err != nil {
		t.Fatalf("SnapshotEtcd: %v", err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(snap, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatalf("the snapshot is not an etcd database: %v", err)
	}
	defer db.Close()
	found := false
	err = db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("key"))
		if b == nil {
			return errors.New("no key bucket")
		}
		return b.ForEach(func(_, v []byte) error {
			found = found || strings.Contains(string(v), "/trellis/test/k")
			return nil
		})
	})
	if err != nil || !found {
		t.Fatalf("the snapshot lacks the key: %v", err)
	}
	db.Close()

	// Restore: what was written after the snapshot is gone, the rest is
	// back, and the member writes on.
	if _, err := s.Create(ctx, "/trellis/test/after", []byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := store.RestoreEtcd(ctx, snap, m, testLogger()); err == nil {
		t.Fatal("restore while the member runs succeeded")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	n, err := store.RestoreEtcd(ctx, snap, m, testLogger())
	if err != nil || n < 1 {
		t.Fatalf("RestoreEtcd = %d, %v", n, err)
	}
	s = openCluster(t, members)[0]
	if v, _, err := s.Get(ctx, "/trellis/test/k"); err != nil || string(v) != "v" {
		t.Errorf("after restore: k = %q, %v", v, err)
	}
	if _, _, err := s.Get(ctx, "/trellis/test/after"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("after restore: a key written after the snapshot: %v", err)
	}
	if _, err := s.Create(ctx, "/trellis/test/new", []byte("n")); err != nil {
		t.Errorf("write after restore: %v", err)
	}
}
