package agent

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/client"
	"github.com/trellis-mesh/trellis/internal/pki"
	"github.com/trellis-mesh/trellis/internal/token"
)

const (
	// reportRetry is the wait before a report that failed is sent again.
	reportRetry = time.Second
	// reportTimeout bounds sending one report.
	reportTimeout = 5 * time.Second
)

// serverSource is the Source of a node of a Trellis cluster: it joins
// through the servers, follows its netmap stream (deltas, resuming after a
// reconnect, failing over to another server), joins again when its
// credential is refused, and sends the node's reports.
type serverSource struct {
	cfg     serverSourceConfig
	log     *slog.Logger
	servers *serverList
	joined  chan struct{} // closed after the first join
	once    sync.Once

	reports *Mailbox[api.Report] // the newest report not yet sent
	kick    chan struct{}        // restarts the netmap stream

	mu       sync.Mutex
	client   *client.Client // guarded by mu; the joined client, nil before
	announce api.Report     // guarded by mu; the node's addresses, for joins
	posted   []byte         // guarded by mu; the last report posted, encoded
}

// serverSourceConfig is what a serverSource needs.
type serverSourceConfig struct {
	ServerURL string
	Aliases   []string // other URLs of the server at ServerURL
	Token     token.Token
	NodeName  string
	Password  string  // the node password (identity)
	PublicKey api.Key // zero without a WireGuard data plane
	// ListenPort is the WireGuard port; 0 without a WireGuard data plane.
	ListenPort uint16
	Relay      bool
	Members    bool // ask for the cluster's members at join (VPN carrier)
	// WaitHint, if set, may say why the server cannot be reached (the
	// VPN carrier: a tailnet policy that denies everything).
	WaitHint func() string
	// Dir returns a path in the agent's data dir: the CA, the node
	// certificate and key and the server list are kept there.
	Dir    func(parts ...string) string
	Logger *slog.Logger
	// OnJoin, if set, is told how long each successful join took.
	OnJoin func(time.Duration)
}

func newServerSource(cfg serverSourceConfig, first api.Report) *serverSource {
	return &serverSource{
		cfg:      cfg,
		log:      cfg.Logger,
		servers:  newServerList(cfg.Dir(serversFile), cfg.ServerURL, cfg.Aliases, cfg.Logger),
		joined:   make(chan struct{}),
		reports:  NewMailbox[api.Report](),
		kick:     make(chan struct{}, 1),
		announce: first,
	}
}

// Joined is closed once the node has joined: its certificate is in the
// data dir (the supervisor tunnels need it).
func (s *serverSource) Joined() <-chan struct{} { return s.joined }

// Report implements Source.
func (s *serverSource) Report(r api.Report) {
	body, err := json.Marshal(r)
	if err != nil {
		return
	}
	s.mu.Lock()
	s.announce = api.Report{InternalIPs: r.InternalIPs, Networks: r.Networks, ExternalIPs: r.ExternalIPs}
	same := bytes.Equal(body, s.posted)
	s.posted = body
	s.mu.Unlock()
	if !same {
		s.reports.Post(r)
	}
}

// Reconnect implements Source.
func (s *serverSource) Reconnect() {
	s.mu.Lock()
	c := s.client
	s.mu.Unlock()
	if c != nil {
		c.Close()
	}
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// Run implements Source.
func (s *serverSource) Run(ctx context.Context, out *Mailbox[Update]) error {
	rctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { s.sendReports(rctx) })
	defer func() {
		cancel()
		wg.Wait()
	}()
	c, members, err := s.joinUntilDone(ctx)
	for {
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		err = s.follow(ctx, c, members, out)
		c.Close()
		if err == nil || ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, ErrDeleted) {
			return err
		}
		// The credential was replaced or refused: join again.
		s.log.Info("re-joining", "reason", err)
		c, members, err = s.joinUntilDone(ctx)
	}
}

// joinUntilDone fetches and checks the CA, then joins, retrying network
// errors forever and moving to another server after each failure.
func (s *serverSource) joinUntilDone(ctx context.Context) (*client.Client, []api.Member, error) {
	wl := &waitLog{log: s.log, what: "the server at " + s.cfg.ServerURL, hint: s.cfg.WaitHint}
	for n := 0; ; n++ {
		c, members, err := s.join(ctx)
		if err == nil {
			return c, members, nil
		}
		if client.IsPermanent(err) {
			return nil, nil, err // "join https://…: server refused (…): what to do"
		}
		if ctx.Err() != nil {
			return nil, nil, ctx.Err()
		}
		wl.failed(err)
		s.servers.next() // try another server next time
		if err := sleep(ctx, backoff(n)); err != nil {
			return nil, nil, err
		}
	}
}

func (s *serverSource) join(ctx context.Context) (*client.Client, []api.Member, error) {
	srv := s.servers.current()
	ca, err := client.FetchCA(ctx, srv, s.cfg.Token)
	if err != nil {
		return nil, nil, err
	}
	if err := pki.WriteFileAtomic(s.cfg.Dir("ca.crt"), ca, 0o644); err != nil {
		return nil, nil, fmt.Errorf("save CA: %w", err)
	}
	keyPEM, csrPEM, err := pki.NewKeyAndCSR()
	if err != nil {
		return nil, nil, err
	}
	s.mu.Lock()
	ann := s.announce
	s.mu.Unlock()
	req := api.JoinRequest{
		NodeName:     s.cfg.NodeName,
		NodePassword: s.cfg.Password,
		CSR:          csrPEM,
		InternalIPs:  ann.InternalIPs,
		Networks:     ann.Networks,
		ExternalIPs:  ann.ExternalIPs,
		Relay:        s.cfg.Relay,
		Members:      s.cfg.Members,
		PublicKey:    s.cfg.PublicKey,
		ListenPort:   s.cfg.ListenPort,
	}
	start := time.Now()
	boot, err := client.New(client.Config{URL: srv, CA: ca})
	if err != nil {
		return nil, nil, err
	}
	jr, err := boot.Join(ctx, s.cfg.Token.String(), req)
	boot.Close()
	if err != nil {
		return nil, nil, err
	}
	cert, err := tls.X509KeyPair(jr.Certificate, keyPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("node certificate from the server does not match our key: %w", err)
	}
	if err := pki.WriteFileAtomic(s.cfg.Dir("node.crt"), jr.Certificate, 0o644); err != nil {
		return nil, nil, err
	}
	if err := pki.WriteFileAtomic(s.cfg.Dir("node.key"), keyPEM, 0o600); err != nil {
		return nil, nil, err
	}
	s.servers.update(srv, jr.ServerName, jr.Servers)
	took := time.Since(start)
	s.log.Info("joined the cluster", "server", srv, "podCIDRs", jr.Node.PodCIDRs, "roles", jr.Node.Roles, "took", took.Round(time.Millisecond))
	if s.cfg.OnJoin != nil {
		s.cfg.OnJoin(took)
	}
	c, err := client.New(client.Config{URL: srv, CA: ca, Certificate: &cert})
	if err != nil {
		return nil, nil, err
	}
	s.mu.Lock()
	s.client = c
	s.mu.Unlock()
	s.once.Do(func() { close(s.joined) })
	return c, jr.Members, nil
}

// follow keeps the netmap stream open, reconnecting with backoff, and posts
// every netmap to out. It returns nil when ctx ends, ErrDeleted, or an
// error when the server no longer accepts this credential.
func (s *serverSource) follow(ctx context.Context, c *client.Client, members []api.Member, out *Mailbox[Update]) error {
	wl := &waitLog{log: s.log, what: "the netmap stream from " + s.cfg.ServerURL, hint: s.cfg.WaitHint}
	connected := false
	var last *api.NetMap // as the server sent it, for the next stream to resume from
	var version int64
	for n := 0; ; {
		sctx, cancel := context.WithCancel(ctx)
		var kicked bool
		var kw sync.WaitGroup
		kw.Go(func() {
			select {
			case <-s.kick:
				kicked = true
				cancel()
			case <-sctx.Done():
			}
		})
		err := c.StreamNetmaps(sctx, last, func(nm api.NetMap, delta bool) {
			last = &nm
			if !connected {
				connected, n = true, 0
				// A new stream, maybe from another server or a restored
				// datastore whose revisions restart lower: take its maps.
				version = 0
				// resumed: the server found the netmap unchanged and
				// sent a delta to it instead of the whole netmap.
				s.log.Info("netmap stream connected", "server", c.Base(), "resumed", delta)
			}
			s.servers.update(c.Base(), nm.ServerName, nm.Servers)
			if nm.Version < version {
				s.log.Debug("ignoring older netmap", "version", nm.Version, "have", version)
				return
			}
			version = nm.Version
			out.Post(Update{NetMap: nm, Members: members})
		})
		cancel()
		kw.Wait()
		if ctx.Err() != nil {
			return nil
		}
		if kicked {
			s.log.Info("reconnecting the netmap stream from the node's new address")
			c.Close()
			connected = false
			continue
		}
		lost := connected
		if connected {
			s.log.Warn("netmap stream lost; the mesh keeps forwarding with the last netmap", "server", c.Base(), "err", err)
			connected = false
		}
		if client.IsPermanent(err) {
			var ce *client.Error
			if errors.As(err, &ce) && ce.API.Code == api.ErrCodeNodeDeleted {
				s.log.Error("this node was deleted from the cluster by an administrator; removing its peers. Restart the agent to join again.")
				return ErrDeleted
			}
			return err
		}
		wl.failed(err)
		c = s.failover(c)
		if lost {
			continue // another server at once; back off only if it fails too
		}
		if err := sleep(ctx, backoff(n)); err != nil {
			return nil
		}
		n++
	}
}

// failover moves API calls to the next server of the list (when there is
// another) and returns the client for it, with the same credential.
func (s *serverSource) failover(c *client.Client) *client.Client {
	next := s.servers.next()
	if next == c.Base() {
		return c
	}
	c.Close()
	nc := c.WithBase(next)
	s.mu.Lock()
	if s.client == c {
		s.client = nc
	}
	s.mu.Unlock()
	s.log.Info("moving to another server", "from", c.Base(), "to", next)
	return nc
}

// sendReports sends the newest report to the current server until ctx
// ends; one that fails is sent again after reportRetry (or replaced by a
// newer one).
func (s *serverSource) sendReports(ctx context.Context) {
	var pending *api.Report
	joined := s.joined // nil once it fired: a closed channel is always ready
	retry := time.NewTimer(0)
	if !retry.Stop() {
		<-retry.C
	}
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.reports.C():
			if r, ok := s.reports.Take(); ok {
				pending = &r
			}
		case <-retry.C:
		case <-joined:
			joined = nil
		}
		s.mu.Lock()
		c := s.client
		s.mu.Unlock()
		if pending == nil || c == nil {
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, reportTimeout)
		err := c.Report(rctx, *pending)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			s.log.Debug("report failed; will retry", "err", err)
			c.Close() // the next try dials afresh
			retry.Reset(reportRetry)
			continue
		}
		pending = nil
	}
}
