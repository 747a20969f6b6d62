package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/k3s-io/kine/pkg/drivers"
	"github.com/k3s-io/kine/pkg/drivers/generic"
	"github.com/k3s-io/kine/pkg/drivers/pgsql"
	"github.com/k3s-io/kine/pkg/drivers/sqlite"
	"github.com/k3s-io/kine/pkg/server"
	"google.golang.org/grpc"
)

// Kine settings. The store builds kine's server from its parts (driver,
// log-structured backend, gRPC bridge) instead of kine/pkg/endpoint, which
// would link every kine driver (NATS, MySQL, t4, …) and leaves goroutines
// nobody waits for.
const (
	// kineCompactBatchSize is how many revisions kine compacts per
	// transaction (its own default).
	kineCompactBatchSize = 1000
	// kineCompactTimeout bounds one compaction transaction (kine's default).
	kineCompactTimeout = 5 * time.Second
	// kinePollBatchSize is how many rows one poll reads (kine's default).
	kinePollBatchSize = 500
	// kineNotifyInterval is how often kine may send watch progress
	// notifications (kine's default).
	kineNotifyInterval = 5 * time.Second
	// kineEmulatedVersion is the etcd version kine reports (kine's default).
	kineEmulatedVersion = "3.6.11"
	// kineStopTimeout is how long Close lets gRPC streams finish before
	// cutting them.
	kineStopTimeout = 2 * time.Second
	// maxSocketPath is the longest unix socket path we use: sun_path holds
	// 108 bytes including the terminating NUL on Linux (104 on the BSDs).
	maxSocketPath = 100
	// maxRequestBytes is the largest request kine accepts (etcd's default
	// 1.5 MiB plus gRPC overhead).
	maxRequestBytes = 3*1024*1024/2 + 512*1024
)

// kineServer is an in-process kine serving the etcd v3 API on a unix
// socket.
type kineServer struct {
	endpoint string // for the etcd client: unix:///path/kine.sock
	sockPath string
	tmpDir   string // removed on close; "" when the socket is in DataDir

	grpc   *grpc.Server
	cancel context.CancelFunc // stops the kine backend
	wg     sync.WaitGroup     // kine's own goroutines and the gRPC server's
	detach func()             // stops routing kine's log to our logger

	closeOnce sync.Once
	closeErr  error
}

// startKine starts kine over SQLite in cfg.DataDir or over the PostgreSQL
// database in cfg.Endpoint. ctx bounds the start only.
func startKine(ctx context.Context, cfg Config, b backend, log *slog.Logger) (_ *kineServer, err error) {
	k := &kineServer{detach: attachKineLog(cfg.Logger.With("component", "kine"))}
	bctx, cancel := context.WithCancel(context.Background())
	k.cancel = cancel
	defer func() {
		if err != nil {
			_ = k.close()
		}
	}()
	// Abort a slow start (kine retries a database it cannot reach for
	// minutes) when the caller gives up.
	stop := context.AfterFunc(ctx, cancel)
	defer stop()

	// Take the socket first: it also tells whether another process serves
	// this data dir, before we open (and VACUUM) its database.
	if k.sockPath, k.tmpDir, err = socketPath(cfg.DataDir); err != nil {
		return nil, err
	}
	lis, err := listenUnix(k.sockPath)
	if err != nil {
		k.sockPath = "" // not ours to remove
		return nil, err
	}
	defer func() {
		if err != nil {
			_ = lis.Close()
		}
	}()
	k.endpoint = "unix://" + k.sockPath

	dcfg := &drivers.Config{
		// Compaction: only clients compact (CompactInterval 0), so the
		// store's compactor and Store.Compact work the same on every
		// backend, and kine keeps no revisions of its own (MinRetain 0):
		// the store applies Config.CompactRetain. See pitfall 3.
		CompactInterval:  0,
		CompactTimeout:   kineCompactTimeout,
		CompactMinRetain: 0,
		CompactBatchSize: kineCompactBatchSize,
		// Pitfall 1: without a poll interval watches never fire.
		PollInterval:  cfg.PollInterval,
		PollBatchSize: kinePollBatchSize,
		ConnectionPoolConfig: generic.ConnectionPoolConfig{
			MaxIdleTime: 2 * time.Minute,
		},
	}

	var backend server.Backend
	switch b {
	case backendSQLite:
		dir, err := filepath.Abs(cfg.DataDir)
		if err != nil {
			return nil, fmt.Errorf("store: data dir %q: %w", cfg.DataDir, err)
		}
		if err := os.MkdirAll(filepath.Join(dir, "db"), 0o700); err != nil {
			return nil, fmt.Errorf("store: create database directory: %w", err)
		}
		// Pitfall 2: a custom DSN must carry kine's parameters (WAL,
		// busy timeout, synchronous=NORMAL, immediate transactions).
		dcfg.DataSourceName = filepath.Join(dir, "db", "state.db") + "?" + sqlite.DefaultParams
		if _, backend, err = sqlite.New(bctx, &k.wg, dcfg); err != nil {
			return nil, fmt.Errorf("store: open SQLite database in %s: %w", dir, err)
		}
	case backendPostgres:
		dsn, err := postgresDSN(cfg.Endpoint)
		if err != nil {
			return nil, err
		}
		dcfg.DataSourceName = dsn
		if _, backend, err = pgsql.New(bctx, &k.wg, dcfg); err != nil {
			return nil, fmt.Errorf("store: open PostgreSQL database at %s: %w", redact(cfg.Endpoint), err)
		}
	default:
		return nil, fmt.Errorf("store: kine cannot serve backend %s", b)
	}
	if err := backend.Start(bctx); err != nil {
		return nil, fmt.Errorf("store: start kine: %w", err)
	}

	k.grpc = grpc.NewServer(
		grpc.MaxRecvMsgSize(maxRequestBytes),
		grpc.MaxSendMsgSize(math.MaxInt32),
	)
	server.New(backend, "unix", kineNotifyInterval, kineEmulatedVersion).Register(k.grpc)
	k.wg.Add(1)
	go func() {
		defer k.wg.Done()
		if err := k.grpc.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			log.Error("kine gRPC server stopped", "err", err)
		}
	}()
	log.Debug("kine serving", "socket", k.sockPath)
	return k, nil
}

// close stops the gRPC server, then the backend, and waits for both. It is
// idempotent.
func (k *kineServer) close() error {
	k.closeOnce.Do(func() {
		if k.grpc != nil {
			done := make(chan struct{})
			t := time.AfterFunc(kineStopTimeout, k.grpc.Stop)
			go func() {
				k.grpc.GracefulStop()
				close(done)
			}()
			<-done
			t.Stop()
		}
		k.cancel()
		k.wg.Wait()
		if k.sockPath != "" {
			if err := os.Remove(k.sockPath); err != nil && !errors.Is(err, os.ErrNotExist) {
				k.closeErr = fmt.Errorf("store: remove kine socket: %w", err)
			}
		}
		if k.tmpDir != "" {
			_ = os.RemoveAll(k.tmpDir)
		}
		k.detach()
	})
	return k.closeErr
}

// socketPath returns where kine's unix socket goes: dataDir/kine.sock when
// that is short enough, else a fresh temporary directory (returned as
// tmpDir, for the caller to remove).
func socketPath(dataDir string) (path, tmpDir string, err error) {
	if dataDir != "" {
		dir, err := filepath.Abs(dataDir)
		if err != nil {
			return "", "", fmt.Errorf("store: data dir %q: %w", dataDir, err)
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return "", "", fmt.Errorf("store: create data dir: %w", err)
		}
		if p := filepath.Join(dir, "kine.sock"); len(p) <= maxSocketPath {
			return p, "", nil
		}
	}
	for _, base := range []string{os.TempDir(), "/tmp"} {
		tmp, err := os.MkdirTemp(base, "trellis-kine-")
		if err != nil {
			continue
		}
		if p := filepath.Join(tmp, "kine.sock"); len(p) <= maxSocketPath {
			return p, tmp, nil
		}
		_ = os.RemoveAll(tmp)
	}
	return "", "", errors.New("store: found no directory with a path short enough for a unix socket: set TMPDIR to a short path")
}

// listenUnix listens on path, removing a stale socket left by a crash but
// refusing to take over a socket that another live process serves.
func listenUnix(path string) (net.Listener, error) {
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		_ = c.Close()
		return nil, fmt.Errorf("store: another process already serves the datastore socket %s: stop it, or use another data dir", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("store: remove stale socket: %w", err)
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("store: listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		_ = lis.Close()
		return nil, fmt.Errorf("store: restrict socket permissions: %w", err)
	}
	return lis, nil
}

// postgresDSN turns a postgres:// endpoint into the data source name kine's
// pgsql driver expects (the URL without its scheme), naming the database
// "trellis" when the URL names none.
func postgresDSN(endpoint string) (string, error) {
	u, err := url.Parse(endpoint)
	if err != nil {
		return "", fmt.Errorf("store: datastore endpoint is not a valid postgres:// URL: %w", err)
	}
	if u.Path == "" || u.Path == "/" {
		u.Path = "/trellis"
	}
	_, rest, _ := strings.Cut(u.String(), "://")
	return rest, nil
}
