package store

import (
	"context"
	"crypto/tls"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"
)

// SQLitePath returns where the default datastore of a store with DataDir
// dataDir keeps its database.
func SQLitePath(dataDir string) string { return filepath.Join(dataDir, "db", "state.db") }

// sqliteDriver returns the name of the SQLite driver kine linked in:
// mattn's "sqlite3" when built with cgo, modernc's "sqlite" without.
func sqliteDriver() (string, error) {
	for _, d := range []string{"sqlite3", "sqlite"} {
		if slices.Contains(sql.Drivers(), d) {
			return d, nil
		}
	}
	return "", errors.New("store: no SQLite driver is linked in")
}

// SnapshotSQLite writes a consistent copy of the SQLite datastore of
// dataDir to out with SQLite's VACUUM INTO, which is safe while the
// server runs (never copy the database file itself: the WAL may hold the
// last writes). out must not exist.
func SnapshotSQLite(ctx context.Context, dataDir, out string) error {
	src := SQLitePath(dataDir)
	if _, err := os.Stat(src); err != nil {
		return fmt.Errorf("store: no SQLite datastore in %s (is --data-dir right, and does the server use SQLite?): %w", dataDir, err)
	}
	if _, err := os.Stat(out); err == nil {
		return fmt.Errorf("store: %s exists: choose a new file for the snapshot", out)
	}
	abs, err := filepath.Abs(out)
	if err != nil {
		return err
	}
	drv, err := sqliteDriver()
	if err != nil {
		return err
	}
	db, err := sql.Open(drv, src)
	if err != nil {
		return fmt.Errorf("store: open %s: %w", src, err)
	}
	defer db.Close()
	if _, err := db.ExecContext(ctx, "PRAGMA busy_timeout = 30000"); err != nil {
		return fmt.Errorf("store: snapshot: %w", err)
	}
	if _, err := db.ExecContext(ctx, "VACUUM INTO '"+strings.ReplaceAll(abs, "'", "''")+"'"); err != nil {
		return fmt.Errorf("store: snapshot of %s: %w", src, err)
	}
	return os.Chmod(abs, 0o600)
}

// RestoreSQLite replaces the SQLite datastore of dataDir with a snapshot
// made by SnapshotSQLite. The server must be stopped. The database it
// replaces is kept next to it as state.db.before-restore-<unix time>.
func RestoreSQLite(ctx context.Context, dataDir, snapshot string) error {
	if c, err := net.DialTimeout("unix", filepath.Join(dataDir, "kine.sock"), 200*time.Millisecond); err == nil {
		_ = c.Close()
		return errors.New("store: the server is running on this data dir: stop it before restoring")
	}
	drv, err := sqliteDriver()
	if err != nil {
		return err
	}
	// Check that the snapshot is a kine database before touching anything.
	db, err := sql.Open(drv, "file:"+snapshot+"?mode=ro")
	if err != nil {
		return fmt.Errorf("store: open snapshot %s: %w", snapshot, err)
	}
	var rows int64
	err = db.QueryRowContext(ctx, "SELECT COUNT(*) FROM kine").Scan(&rows)
	db.Close()
	if err != nil {
		return fmt.Errorf("store: %s is not a snapshot of a Trellis SQLite datastore: %w", snapshot, err)
	}
	dst := SQLitePath(dataDir)
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return fmt.Errorf("store: restore: %w", err)
	}
	data, err := os.ReadFile(snapshot)
	if err != nil {
		return fmt.Errorf("store: restore: %w", err)
	}
	tmp := dst + ".restoring"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("store: restore: %w", err)
	}
	if _, err := os.Stat(dst); err == nil {
		if err := os.Rename(dst, fmt.Sprintf("%s.before-restore-%d", dst, time.Now().Unix())); err != nil {
			return fmt.Errorf("store: restore: keep the old database: %w", err)
		}
	}
	for _, suffix := range []string{"-wal", "-shm"} {
		if err := os.Remove(dst + suffix); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("store: restore: %w", err)
		}
	}
	if err := os.Rename(tmp, dst); err != nil {
		return fmt.Errorf("store: restore: %w", err)
	}
	return nil
}

// SnapshotEtcd streams a snapshot of the etcd member at endpoint (an
// embedded member: its loopback client URL and the member's client TLS)
// to w.
func SnapshotEtcd(ctx context.Context, endpoint string, tlsConfig *tls.Config, w io.Writer) error {
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, TLS: tlsConfig, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return fmt.Errorf("store: connect to etcd at %s: %w", endpoint, err)
	}
	defer c.Close()
	rc, err := c.Snapshot(ctx)
	if err != nil {
		return fmt.Errorf("store: etcd snapshot (is the server running?): %w", err)
	}
	defer rc.Close()
	if _, err := io.Copy(w, rc); err != nil {
		return fmt.Errorf("store: etcd snapshot: %w", err)
	}
	return nil
}

// snapshotKeys reads the newest value of every live key from an etcd
// snapshot (a bbolt database) and the snapshot's revision.
func snapshotKeys(path string) (map[string][]byte, int64, error) {
	db, err := bolt.Open(path, 0o400, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		return nil, 0, fmt.Errorf("store: %s is not an etcd snapshot: %w", path, err)
	}
	defer db.Close()
	keys := map[string][]byte{}
	var rev int64
	err = db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("key"))
		if b == nil {
			return errors.New("it has no key bucket")
		}
		// Keys are revisions (8 bytes main, '_', 8 bytes sub, 't' for a
		// deletion) in order: the last write of a key wins.
		return b.ForEach(func(k, v []byte) error {
			var kv mvccpb.KeyValue
			if err := proto.Unmarshal(v, &kv); err != nil {
				return fmt.Errorf("revision record: %w", err)
			}
			if len(k) >= 8 {
				rev = max(rev, int64(binary.BigEndian.Uint64(k[:8])))
			}
			if len(k) == 18 && k[17] == 't' {
				delete(keys, string(kv.Key))
				return nil
			}
			keys[string(kv.Key)] = kv.Value
			return nil
		})
	})
	if err != nil {
		return nil, 0, fmt.Errorf("store: read etcd snapshot %s: %w", path, err)
	}
	return keys, rev, nil
}

// RestoreEtcd rebuilds the embedded etcd member m from a snapshot made by
// SnapshotEtcd, as a new cluster of one member: the newest value of every
// key comes back (history, leases and readiness keys do not). The
// member's old data directory is kept as <Dir>.before-restore-<unix time>.
// The server must be stopped; start it again with --cluster-init, and let
// other servers join it again with empty data dirs. Agents accept the
// restored cluster's netmaps although its revisions restart lower.
func RestoreEtcd(ctx context.Context, snapshot string, m Embedded, log *slog.Logger) (restored int, err error) {
	keys, _, err := snapshotKeys(snapshot)
	if err != nil {
		return 0, err
	}
	if c, err := net.DialTimeout("tcp", m.withDefaults().ClientAddr.String(), 200*time.Millisecond); err == nil {
		_ = c.Close()
		return 0, errors.New("store: the etcd member is running: stop the server before restoring")
	}
	if _, err := os.Stat(m.Dir); err == nil {
		if err := os.Rename(m.Dir, fmt.Sprintf("%s.before-restore-%d", m.Dir, time.Now().Unix())); err != nil {
			return 0, fmt.Errorf("store: restore: keep the old member data: %w", err)
		}
	}
	m.InitialCluster, m.NewCluster = "", false
	s, err := Open(ctx, Config{Embedded: &m, Logger: log, CompactInterval: -1})
	if err != nil {
		return 0, err
	}
	defer func() {
		if cerr := s.Close(); err == nil {
			err = cerr
		}
	}()
	for _, k := range slices.Sorted(maps.Keys(keys)) {
		if strings.HasPrefix(k, "/trellis/ready/") {
			continue // who holds a netmap stream now is not in a backup
		}
		// One writer, no concurrency: a plain Put is safe here.
		if _, err := s.client.Put(ctx, k, string(keys[k])); err != nil {
			return restored, fmt.Errorf("store: restore %q: %w", k, err)
		}
		restored++
	}
	return restored, nil
}
