package store_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/trellis-mesh/trellis/internal/store"
	"github.com/trellis-mesh/trellis/internal/store/storetest"
)

// The conformance suite runs against kine+SQLite always. The external
// backends run only when their endpoint is given in the environment; the
// HA issue will wire them up in CI:
//
//	TRELLIS_TEST_ETCD_ENDPOINT=http://127.0.0.1:2379
//	TRELLIS_TEST_POSTGRES_DSN=postgres://user:pw@127.0.0.1:5432/trellis_test?sslmode=disable
const (
	envEtcd     = "TRELLIS_TEST_ETCD_ENDPOINT"
	envPostgres = "TRELLIS_TEST_POSTGRES_DSN"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		// Connections between etcd members of closed test clusters end
		// a few seconds after the members (embedded_test.go): wait for
		// them, then check.
		waitPeerConnsClosed()
		if err := goleak.Find(
			// kine leaks this goroutine when a watch's subscription fails as
			// its context ends (it then waits on a nil channel forever); it
			// is kine's, unreachable from here, and holds no resources of
			// ours.
			goleak.IgnoreTopFunction("github.com/k3s-io/kine/pkg/logstructured.(*LogStructured).Watch.func1"),
		); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: errors on successful test run: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// testLogger logs warnings and errors to stderr (not t.Log: kine may log
// from goroutines that outlive a test by a moment).
func testLogger() *slog.Logger {
	level := slog.LevelWarn
	if os.Getenv("TRELLIS_TEST_STORE_DEBUG") != "" {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}

// opener returns an open function for storetest.Run whose stores keep
// their data in a directory per test, under base.
func opener(base string, cfg store.Config) func(t *testing.T) *store.Store {
	return func(t *testing.T) *store.Store {
		t.Helper()
		c := cfg
		c.DataDir = filepath.Join(base, strings.NewReplacer("/", "_", " ", "_").Replace(t.Name()))
		c.Logger = testLogger()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		s, err := store.Open(ctx, c)
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		t.Cleanup(func() {
			if err := s.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		})
		return s
	}
}

func TestSQLite(t *testing.T) {
	storetest.Run(t, opener(t.TempDir(), store.Config{}))
}

func TestEtcd(t *testing.T) {
	ep := os.Getenv(envEtcd)
	if ep == "" {
		t.Skipf("set %s to run the suite against an external etcd", envEtcd)
	}
	storetest.Run(t, opener(t.TempDir(), store.Config{Endpoint: ep}))
}

func TestPostgres(t *testing.T) {
	dsn := os.Getenv(envPostgres)
	if dsn == "" {
		t.Skipf("set %s to run the suite against kine over PostgreSQL", envPostgres)
	}
	storetest.Run(t, opener(t.TempDir(), store.Config{Endpoint: dsn}))
}

func TestConfigValidate(t *testing.T) {
	for _, tt := range []struct {
		name string
		cfg  store.Config
		ok   bool
	}{
		{"sqlite", store.Config{DataDir: "/var/lib/trellis/server"}, true},
		{"sqlite without data dir", store.Config{}, false},
		{"postgres", store.Config{Endpoint: "postgres://u:p@db:5432/trellis?sslmode=disable"}, true},
		{"postgresql", store.Config{Endpoint: "postgresql://db/trellis"}, true},
		{"postgres without host", store.Config{Endpoint: "postgres:///trellis"}, false},
		{"etcd", store.Config{Endpoint: "http://10.0.0.1:2379"}, true},
		{"etcd cluster", store.Config{Endpoint: "https://a:2379, https://b:2379,https://c:2379"}, true},
		{"etcd bad member", store.Config{Endpoint: "http://a:2379,b:2379"}, false},
		{"mysql", store.Config{Endpoint: "mysql://u:p@tcp(db)/trellis"}, false},
		{"no scheme", store.Config{Endpoint: "10.0.0.1:2379"}, false},
		{"negative retain", store.Config{DataDir: "d", CompactRetain: -1}, false},
		{"negative poll", store.Config{DataDir: "d", PollInterval: -time.Second}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.Validate()
			if (err == nil) != tt.ok {
				t.Fatalf("Validate() = %v, want ok=%v", err, tt.ok)
			}
			if err != nil && strings.Contains(err.Error(), ":p@") {
				t.Errorf("error shows a password: %v", err)
			}
		})
	}
}

// A data dir too deep for a unix socket path still works: the socket goes
// to a temporary directory, removed on Close.
func TestLongDataDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), strings.Repeat("d", 60), strings.Repeat("e", 60))
	s, err := store.Open(t.Context(), store.Config{DataDir: dir, Logger: testLogger()})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer s.Close()
	if _, err := s.Create(t.Context(), "/long/k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "db", "state.db")); err != nil {
		t.Errorf("database not in the data dir: %v", err)
	}
}

// Two stores on one data dir would corrupt each other's view: the second
// Open is refused.
func TestDataDirInUse(t *testing.T) {
	dir := t.TempDir()
	s, err := store.Open(t.Context(), store.Config{DataDir: dir, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s2, err := store.Open(t.Context(), store.Config{DataDir: dir, Logger: testLogger()})
	if err == nil {
		s2.Close()
		t.Fatal("second Open on the same data dir succeeded")
	}
	if !strings.Contains(err.Error(), "another process") {
		t.Errorf("error does not say what is wrong: %v", err)
	}
}

// An etcd endpoint nobody serves fails Open within the caller's deadline,
// with a sentence that says what to check.
func TestEtcdUnreachable(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	start := time.Now()
	_, err := store.Open(ctx, store.Config{Endpoint: "http://127.0.0.1:1", Logger: testLogger()})
	if err == nil {
		t.Fatal("Open of an unreachable etcd succeeded")
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("Open took %s", d)
	}
	if !strings.Contains(err.Error(), "does not answer") || !errors.Is(err, context.DeadlineExceeded) {
		t.Logf("error: %v", err)
	}
}
