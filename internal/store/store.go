// Package store runs and talks to the cluster datastore through the etcd v3 API.
package store

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Defaults applied by Open to zero fields of Config.
const (
	DefaultCompactInterval = 5 * time.Minute
	DefaultCompactRetain   = 1000
	DefaultPollInterval    = 500 * time.Millisecond
)

// readyTimeout bounds the first round trip Open makes to the datastore when
// the caller's context has no deadline.
const readyTimeout = 30 * time.Second

// Config says which datastore to use. The zero value plus a DataDir is the
// default: kine over SQLite inside DataDir.
type Config struct {
	// DataDir is the directory the store owns. With the default Endpoint it
	// holds the SQLite database (DataDir/db/state.db) and the unix socket
	// kine serves on (DataDir/kine.sock, or a temporary directory when that
	// path is too long for a unix socket). Required when Endpoint is "";
	// optional otherwise (the socket of a PostgreSQL-backed kine then goes
	// to a temporary directory).
	DataDir string

	// Endpoint selects the backend:
	//
	//	""                                  kine in-process over SQLite in DataDir (default)
	//	"postgres://user:pw@host:5432/db?…" kine in-process over PostgreSQL
	//	                                    ("postgresql://" too; database defaults to "trellis")
	//	"http://host:2379,https://host2:2379"  an external etcd cluster, used directly
	Endpoint string

	// Embedded, if set, runs an etcd member in the process and uses it
	// (--cluster-init and the servers that join it). Endpoint must then be
	// empty.
	Embedded *Embedded

	// TLS is the client TLS configuration for https:// etcd endpoints.
	// nil means TLS with the system roots and no client certificate.
	TLS *tls.Config

	// Logger receives the store's log, kine's log and the etcd client's
	// log. nil discards everything.
	Logger *slog.Logger

	// CompactInterval is how often the store discards old revisions
	// (every backend: kine is configured so that only its clients compact,
	// see the datastore notes, pitfall 3). 0 means
	// DefaultCompactInterval; negative disables automatic compaction.
	CompactInterval time.Duration

	// CompactRetain is how many of the most recent revisions automatic
	// compaction keeps, so that watchers a little behind can resume without
	// a Reset. 0 means DefaultCompactRetain.
	CompactRetain int64

	// PollInterval is how often kine polls its database for rows written
	// by other kine instances (PostgreSQL shared by several servers); it
	// bounds their watch latency. Writes through this process are seen at
	// once, except the first one after Open, which kine's poll loop may
	// deliver up to one PollInterval late (it prepares its query on its
	// first wake-up). 0 means DefaultPollInterval. Ignored for external
	// etcd.
	PollInterval time.Duration
}

// backend is the kind of datastore a Config selects.
type backend int

const (
	backendSQLite backend = iota + 1
	backendPostgres
	backendEtcd
	backendEmbedded
)

func (b backend) String() string {
	switch b {
	case backendSQLite:
		return "kine+sqlite"
	case backendPostgres:
		return "kine+postgres"
	case backendEtcd:
		return "etcd"
	case backendEmbedded:
		return "embedded-etcd"
	}
	return "unknown"
}

// backend reports which backend the endpoint selects, or an error a user
// can act on.
func (c *Config) backend() (backend, error) {
	ep := strings.TrimSpace(c.Endpoint)
	if c.Embedded != nil {
		if ep != "" {
			return 0, errors.New("store: an embedded etcd member (--cluster-init, or joining a server that runs one) and --datastore-endpoint exclude each other: choose one")
		}
		return backendEmbedded, nil
	}
	if ep == "" {
		return backendSQLite, nil
	}
	scheme, _, ok := strings.Cut(ep, "://")
	if !ok {
		return 0, fmt.Errorf("store: datastore endpoint has no scheme: use postgres://… or http(s)://host:2379")
	}
	switch strings.ToLower(scheme) {
	case "postgres", "postgresql":
		u, err := url.Parse(ep)
		if err != nil || u.Host == "" {
			return 0, fmt.Errorf("store: datastore endpoint is not a valid postgres:// URL (postgres://user:password@host:5432/database)")
		}
		return backendPostgres, nil
	case "http", "https":
		for _, e := range strings.Split(ep, ",") {
			u, err := url.Parse(strings.TrimSpace(e))
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				return 0, fmt.Errorf("store: etcd endpoint %q is not of the form http(s)://host:port", redact(e))
			}
		}
		return backendEtcd, nil
	}
	return 0, fmt.Errorf("store: datastore endpoint scheme %q is not supported: use \"\" (SQLite), postgres://… or http(s)://host:2379", scheme)
}

// Validate reports whether c can be used by Open. It does not touch the
// file system or the network.
func (c *Config) Validate() error {
	b, err := c.backend()
	if err != nil {
		return err
	}
	if b == backendEmbedded {
		if err := c.Embedded.validate(); err != nil {
			return err
		}
	}
	if b == backendSQLite && c.DataDir == "" {
		return errors.New("store: DataDir is required for the default SQLite datastore")
	}
	if c.CompactRetain < 0 {
		return fmt.Errorf("store: CompactRetain %d is negative", c.CompactRetain)
	}
	if c.PollInterval < 0 {
		return fmt.Errorf("store: PollInterval %s is negative", c.PollInterval)
	}
	return nil
}

// withDefaults returns a copy of c with zero fields set to their defaults.
func (c Config) withDefaults() Config {
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.CompactInterval == 0 {
		c.CompactInterval = DefaultCompactInterval
	}
	if c.CompactRetain == 0 {
		c.CompactRetain = DefaultCompactRetain
	}
	if c.PollInterval == 0 {
		c.PollInterval = DefaultPollInterval
	}
	c.Endpoint = strings.TrimSpace(c.Endpoint)
	return c
}

// redact removes the password from an endpoint so it can go into errors
// and logs.
func redact(endpoint string) string {
	u, err := url.Parse(strings.TrimSpace(endpoint))
	if err != nil {
		return "(unparsable endpoint)"
	}
	return u.Redacted()
}

// Store is a connection to the cluster datastore and, for the kine
// backends, the datastore server itself. Its methods are safe for
// concurrent use.
type Store struct {
	log    *slog.Logger
	cfg    Config
	client *clientv3.Client
	kine   *kineServer // nil for external etcd
	// embedded is the etcd member the store runs; nil for other backends.
	embedded *embeddedEtcd

	compacted atomic.Int64 // highest revision this store compacted to

	// ctx is cancelled by Close; it stops watches and the compactor.
	ctx    context.Context
	cancel context.CancelFunc

	// mu guards closed and the Add side of wg, so that no goroutine is
	// started after Close began waiting.
	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup // watches and the compactor

	closeOnce sync.Once
	closeErr  error
}

// Open starts the backend cfg selects (kine in-process, or nothing for
// external etcd), connects an etcd v3 client to it and checks with one
// round trip that the datastore answers. ctx bounds the start only; the
// store runs until Close.
func Open(ctx context.Context, cfg Config) (*Store, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	b, _ := cfg.backend()
	log := cfg.Logger.With("component", "store", "backend", b.String())

	s := &Store{log: log, cfg: cfg}
	s.ctx, s.cancel = context.WithCancel(context.Background())

	var endpoints []string
	var tlsConfig *tls.Config
	switch b {
	case backendSQLite, backendPostgres:
		k, err := startKine(ctx, cfg, b, log)
		if err != nil {
			s.cancel()
			return nil, err
		}
		s.kine = k
		endpoints = []string{k.endpoint}
	case backendEmbedded:
		e, err := startEmbedded(ctx, cfg, log)
		if err != nil {
			s.cancel()
			return nil, err
		}
		s.embedded = e
		endpoints = []string{e.endpoint}
		tlsConfig = e.clientTLS
	case backendEtcd:
		for _, e := range strings.Split(cfg.Endpoint, ",") {
			e = strings.TrimSpace(e)
			endpoints = append(endpoints, e)
			if strings.HasPrefix(e, "https://") && tlsConfig == nil {
				tlsConfig = cfg.TLS
				if tlsConfig == nil {
					tlsConfig = &tls.Config{MinVersion: tls.VersionTLS12}
				}
			}
		}
	}

	client, err := clientv3.New(clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: 5 * time.Second,
		TLS:         tlsConfig,
		Logger:      zap.New(newSlogCore(cfg.Logger.With("component", "etcd-client").Handler())),
	})
	if err != nil {
		s.stopBackend()
		return nil, fmt.Errorf("store: connect to %s datastore: %w", b, err)
	}
	s.client = client

	if err := s.ping(ctx); err != nil {
		_ = s.Close()
		where := "in " + cfg.DataDir
		if b == backendEmbedded {
			where = "in " + cfg.Embedded.Dir
		} else if b != backendSQLite {
			where = "at " + redact(cfg.Endpoint)
		}
		return nil, fmt.Errorf("store: the %s datastore %s does not answer (check the datastore endpoint and that it is running): %w", b, where, err)
	}

	if cfg.CompactInterval > 0 {
		s.goOwned(func(ctx context.Context) { s.compactLoop(ctx, cfg.CompactInterval, cfg.CompactRetain) })
	}
	log.Debug("store open", "endpoints", len(endpoints))
	return s, nil
}

// ping makes one read to check that the datastore answers.
func (s *Store) ping(ctx context.Context) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, readyTimeout)
		defer cancel()
	}
	_, err := s.currentRevision(ctx)
	return err
}

// goOwned runs f in a goroutine that Close cancels (through f's context)
// and waits for. It reports false, without running f, if the store is
// closed.
func (s *Store) goOwned(f func(ctx context.Context)) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		f(s.ctx)
	}()
	return true
}

// Client returns the etcd v3 client the store uses, for code that needs
// more than the helpers. It is closed by Close. Code using it directly must
// stay within the subset of the API that kine supports (see the datastore
// notes): no plain or prefix Delete, one compare and one operation per
// transaction, no leases beyond Grant, no locks or elections.
func (s *Store) Client() *clientv3.Client { return s.client }

// Close stops the watches and the compactor, closes the client and stops
// the backend the store started, waiting for all their goroutines. It is
// safe to call more than once and from several goroutines; every call
// returns the result of the first.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		s.cancel()
		s.wg.Wait()
		var errs []error
		if s.client != nil {
			if err := s.client.Close(); err != nil && !errors.Is(err, context.Canceled) {
				errs = append(errs, fmt.Errorf("store: close client: %w", err))
			}
		}
		if err := s.stopBackend(); err != nil {
			errs = append(errs, err)
		}
		s.closeErr = errors.Join(errs...)
		s.log.Debug("store closed")
	})
	return s.closeErr
}

func (s *Store) stopBackend() error {
	s.cancel()
	if s.embedded != nil {
		s.embedded.close()
	}
	if s.kine == nil {
		return nil
	}
	return s.kine.close()
}
