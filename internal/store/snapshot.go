package store

import (
	"context"
	"crypto/tls"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
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
