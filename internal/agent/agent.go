package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/cni"
	"github.com/trellis-mesh/trellis/internal/ipam"
	"github.com/trellis-mesh/trellis/internal/mesh"
	"github.com/trellis-mesh/trellis/internal/netmap"
	"github.com/trellis-mesh/trellis/internal/pki"
	"github.com/trellis-mesh/trellis/internal/token"
)

// ErrDeleted is returned by Run when an administrator deleted the node.
var ErrDeleted = errors.New("node was deleted from the cluster")

// Agent is one node's control loop.
type Agent struct {
	cfg   Config
	log   *slog.Logger
	tok   token.Token
	id    identity
	dev   *mesh.Device
	ca    []byte
	self  api.Node
	cidrs []netip.Prefix // cluster CIDRs

	lastVersion int64 // only touched by the netmap stream's goroutine

	mu       sync.Mutex
	client   *apiClient             // guarded by mu; the joined client, nil before
	peers    map[api.Key]*peerState // guarded by mu; peers of the last netmap
	addrs    addrSet                // guarded by mu; the node's current addresses
	external []netip.Addr           // guarded by mu; --node-external-ip, reloadable
	kick     chan struct{}          // restarts the netmap stream (addresses changed)
	// rescueWake makes rescueLoop look at the peers at once (a netmap
	// was applied); buffered, sends never block.
	rescueWake chan struct{}
	endpoints  endpointMemory // guarded by mu; endpoints that last worked (endpoints.go)

	tunnelState tunnelStatus // the tunnel client once it runs (status.go)
	servers     *serverList  // every server; API calls go to the current one (servers.go)

	vpn     *vpnCarrier  // the VPN carrier (--vpn-auth); nil with WireGuard
	members []api.Member // cluster nodes at the last join (for the VPN carrier)

	metrics *agentMetrics // nil without Config.Metrics (metrics.go)
	waits   progress      // what the agent waits for (progress.go); report loop only
}

// peerState is what the agent remembers of a peer between netmaps.
type peerState struct {
	name string
	// since is when the peer first appeared: a handshake is expected
	// within handshakeGrace after it.
	since time.Time
	// desired is the endpoint the last netmap gave.
	desired netip.AddrPort
	// handshake is the state last reported to the server (api.Handshake*
	// or ""), so that a change is logged once.
	handshake string
}

// Run joins the cluster and keeps the node's data plane in step with its
// netmap until ctx ends. It returns an error only for problems that
// retrying cannot fix (wrong token, name taken, bad config); an unreachable
// server is waited for.
func Run(ctx context.Context, cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	a := &Agent{cfg: cfg, log: cfg.Logger.With("node", cfg.NodeName), peers: map[api.Key]*peerState{}, kick: make(chan struct{}, 1), rescueWake: make(chan struct{}, 1)}
	tok, err := token.Parse(cfg.Token)
	if err != nil {
		return fmt.Errorf("--token: %w", err)
	}
	a.tok = tok
	if a.metrics, err = newAgentMetrics(a, cfg.Metrics); err != nil {
		return fmt.Errorf("agent metrics: %w", err)
	}
	if !tok.HasCAHash {
		a.log.Warn("the join token has no CA hash, so the server's certificate cannot be checked on first contact; use the full K10... token from the server's token file")
	}
	if err := os.MkdirAll(cfg.dir(), 0o700); err != nil {
		return fmt.Errorf("create agent data dir: %w", err)
	}
	if a.id, err = loadOrCreateIdentity(&a.cfg); err != nil {
		return err
	}
	a.servers = newServerList(a.cfg.dir(serversFile), a.cfg.ServerURL, a.cfg.ServerAliases, a.log)
	if err := a.vpnUp(ctx); err != nil {
		return err
	}
	a.addrs = a.detectAddrs()
	a.external = a.cfg.ExternalIPs
	a.endpoints = loadEndpoints(a.cfg.dir("endpoints.json"))
	if len(a.addrs.internal) == 0 {
		a.log.Warn("no default route, so no node IP could be detected; set --node-ip")
	}
	defer a.close()

	client, err := a.joinUntilDone(ctx)
	if err != nil {
		return err
	}
	stopSupervisor, err := a.startSupervisor(ctx)
	if err != nil {
		return err
	}
	defer stopSupervisor()
	rctx, stopReports := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { a.reportLoop(rctx) })
	wg.Go(func() { a.rescueLoop(rctx) })
	defer func() {
		stopReports()
		wg.Wait()
	}()
	for {
		err := a.follow(ctx, client)
		client.close()
		if err == nil || ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, ErrDeleted) {
			return err
		}
		// The credential was replaced or refused: join again.
		a.log.Info("re-joining", "reason", err)
		if client, err = a.joinUntilDone(ctx); err != nil {
			return err
		}
	}
}

func (a *Agent) externalIPs() []netip.Addr {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.external
}

func (a *Agent) close() {
	if a.dev != nil {
		if err := a.dev.Close(); err != nil {
			a.log.Warn("closing WireGuard device", "err", err)
		}
	}
}

// backoff returns the wait before retry n (0-based): exponential from
// 500 ms to 30 s with ±20 % jitter.
func backoff(n int) time.Duration {
	d := 500 * time.Millisecond << min(n, 6)
	d = min(d, 30*time.Second)
	return time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// waitLog says what the agent is waiting for once, then again at growing
// intervals, not at every retry.
type waitLog struct {
	log  *slog.Logger
	what string
	next time.Time
	gap  time.Duration
}

func (w *waitLog) failed(err error) {
	now := time.Now()
	if now.Before(w.next) {
		return
	}
	w.log.Warn("waiting for "+w.what, "err", err)
	if w.gap == 0 {
		w.gap = 5 * time.Second
	} else {
		w.gap = min(2*w.gap, 5*time.Minute)
	}
	w.next = now.Add(w.gap)
}

// joinUntilDone fetches and checks the CA, then joins, retrying network
// errors forever.
func (a *Agent) joinUntilDone(ctx context.Context) (*apiClient, error) {
	wl := &waitLog{log: a.log, what: "the server at " + a.cfg.ServerURL}
	for n := 0; ; n++ {
		c, err := a.join(ctx)
		if err == nil {
			return c, nil
		}
		var pe *permanentError
		if errors.As(err, &pe) {
			return nil, fmt.Errorf("join %s: %s", a.cfg.ServerURL, pe.apiErr.Message)
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		wl.failed(err)
		a.servers.next() // try another server next time
		if err := sleep(ctx, backoff(n)); err != nil {
			return nil, err
		}
	}
}

func (a *Agent) join(ctx context.Context) (*apiClient, error) {
	srv := a.servers.current()
	ca, err := fetchCA(ctx, srv, a.tok)
	if err != nil {
		return nil, err
	}
	a.ca = ca
	if err := pki.WriteFileAtomic(a.cfg.dir("ca.crt"), ca, 0o644); err != nil {
		return nil, fmt.Errorf("save CA: %w", err)
	}
	keyPEM, csrPEM, err := pki.NewKeyAndCSR()
	if err != nil {
		return nil, err
	}
	addrs := a.currentAddrs()
	req := api.JoinRequest{
		NodeName:     a.cfg.NodeName,
		NodePassword: a.id.password,
		CSR:          csrPEM,
		InternalIPs:  addrs.internal,
		Networks:     addrs.networks,
		ExternalIPs:  a.externalIPs(),
		Relay:        a.cfg.Relay,
		Members:      a.cfg.VPN != nil, // checks the VPN's routes against them
	}
	if a.cfg.DataPlane {
		req.PublicKey = a.id.publicKey
		req.ListenPort = uint16(a.cfg.WireGuard.ListenPort)
	}
	start := time.Now()
	boot := newAPIClient(srv, ca, nil)
	jr, err := boot.join(ctx, a.tok.String(), req)
	boot.close()
	if err != nil {
		return nil, err
	}
	cert, err := tls.X509KeyPair(jr.Certificate, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("node certificate from the server does not match our key: %w", err)
	}
	if err := pki.WriteFileAtomic(a.cfg.dir("node.crt"), jr.Certificate, 0o644); err != nil {
		return nil, err
	}
	if err := pki.WriteFileAtomic(a.cfg.dir("node.key"), keyPEM, 0o600); err != nil {
		return nil, err
	}
	a.mu.Lock() // the probe handler reads these
	a.self, a.cidrs, a.members = jr.Node, jr.ClusterCIDRs, jr.Members
	a.mu.Unlock()
	a.servers.update(srv, jr.ServerName, jr.Servers)
	a.log.Info("joined the cluster", "server", srv, "podCIDRs", jr.Node.PodCIDRs, "roles", jr.Node.Roles, "took", time.Since(start).Round(time.Millisecond))
	a.metrics.joined(time.Since(start))
	if err := a.setupDataPlane(); err != nil {
		return nil, &permanentError{apiErr: api.Error{Message: err.Error()}}
	}
	c := newAPIClient(srv, ca, &cert)
	a.mu.Lock()
	a.client = c
	a.mu.Unlock()
	return c, nil
}

// setupDataPlane creates (once) the WireGuard device and makes its
// address, routes, the pod bridge and the CNI config match the node's
// pod CIDRs.
func (a *Agent) setupDataPlane() error {
	if !a.cfg.DataPlane {
		return a.setupVPN()
	}
	if a.dev == nil {
		wc := a.cfg.WireGuard
		wc.PrivateKey = a.id.privateKey
		if addrs := a.currentAddrs(); wc.MTU == 0 && len(addrs.internal) > 0 {
			// The underlay is the interface of the node IP: peers are
			// reached through it, even where no default route exists.
			if m, ok := linkMTUOf(addrs.internal[0]); ok && m > mesh.Overhead+576 {
				wc.MTU = mesh.TunnelMTU(m)
			}
		}
		dev, err := mesh.Open(wc, a.log)
		if err != nil {
			return err
		}
		a.dev = dev
		a.log.Info("WireGuard device up", "interface", wc.Interface, "kind", dev.Kind(), "mtu", dev.MTU(), "listenPort", wc.ListenPort)
	}
	var tunAddrs, gateways []netip.Prefix
	v4, v6 := false, false
	for _, p := range a.self.PodCIDRs {
		tunAddrs = append(tunAddrs, ipam.TunnelAddr(p))
		gateways = append(gateways, ipam.Gateway(p))
		v4 = v4 || p.Addr().Is4()
		v6 = v6 || p.Addr().Is6()
	}
	if err := a.dev.SetAddresses(tunAddrs); err != nil {
		return err
	}
	if err := a.dev.SetRoutes(a.cidrs); err != nil {
		return err
	}
	if err := cni.EnableForwarding(v4, v6); err != nil {
		return err
	}
	if err := cni.EnsureBridge(a.cfg.Bridge, gateways, a.dev.MTU()); err != nil {
		return err
	}
	return cni.Write(cni.Config{
		Dir:         a.cfg.CNIConfDir,
		Bridge:      a.cfg.Bridge,
		PodCIDRs:    a.self.PodCIDRs,
		MTU:         a.dev.MTU(),
		IPAMDataDir: a.cfg.dir("cni-ipam"),
	})
}

// follow keeps the netmap stream open, reconnecting with backoff. It
// returns when ctx ends, or with an error when the server no longer
// accepts this credential.
func (a *Agent) follow(ctx context.Context, c *apiClient) error {
	wl := &waitLog{log: a.log, what: "the netmap stream from " + a.cfg.ServerURL}
	connected := false
	var last *api.NetMap // as the server sent it, for the next stream to resume from
	for n := 0; ; {
		sctx, cancel := context.WithCancel(ctx)
		go func() {
			select {
			case <-a.kick:
				cancel()
			case <-sctx.Done():
			}
		}()
		err := c.streamNetmaps(sctx, last, func(nm api.NetMap, delta bool) {
			last = &nm
			if !connected {
				connected, n = true, 0
				// A new stream, maybe from another server or a restored
				// datastore whose revisions restart lower: take its maps.
				a.lastVersion = 0
				// resumed: the server found the netmap unchanged and
				// sent a delta to it instead of the whole netmap.
				a.log.Info("netmap stream connected", "server", c.base, "resumed", delta)
			}
			a.servers.update(c.base, nm.ServerName, nm.Servers)
			a.apply(nm)
		})
		kicked := sctx.Err() != nil && ctx.Err() == nil
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		if kicked {
			a.log.Info("reconnecting the netmap stream from the node's new address")
			c.close()
			connected = false
			continue
		}
		lost := connected
		if connected {
			a.log.Warn("netmap stream lost; the mesh keeps forwarding with the last netmap", "server", c.base, "err", err)
			connected = false
		}
		var pe *permanentError
		if errors.As(err, &pe) {
			if pe.apiErr.Code == api.ErrCodeNodeDeleted {
				a.log.Error("this node was deleted from the cluster by an administrator; removing its peers. Restart the agent to join again.")
				if a.dev != nil {
					_ = a.dev.SetPeers(nil)
				}
				a.vpnLeave()
				return ErrDeleted
			}
			return err
		}
		wl.failed(err)
		c = a.failover(c)
		if lost {
			continue // another server at once; back off only if it fails too
		}
		if err := sleep(ctx, backoff(n)); err != nil {
			return nil
		}
		n++
	}
}

// apply makes the WireGuard peers match a netmap. Entries that fail the
// same checks the server applies are dropped here too: an agent does not
// trust a server blindly with its routing table.
func (a *Agent) apply(nm api.NetMap) {
	if nm.Version < a.lastVersion {
		a.log.Debug("ignoring older netmap", "version", nm.Version, "have", a.lastVersion)
		return
	}
	a.lastVersion = nm.Version
	a.metrics.netmapApplied(nm, time.Now())
	if a.dev == nil {
		return
	}
	current := map[api.Key]mesh.PeerStatus{}
	if st, err := a.dev.Status(); err == nil {
		for _, p := range st {
			current[api.Key(p.PublicKey)] = p
		}
	}
	now := time.Now()
	a.mu.Lock()
	old := a.peers
	a.peers = make(map[api.Key]*peerState, len(nm.Peers))
	peers := make([]mesh.Peer, 0, len(nm.Peers))
	for _, p := range nm.Peers {
		mp, ok := a.sanitize(p)
		if !ok {
			continue
		}
		ps := old[p.PublicKey]
		if ps == nil {
			ps = &peerState{since: now}
		}
		var cur *mesh.PeerStatus
		if c, ok := current[p.PublicKey]; ok {
			cur = &c
		}
		desired := mp.Endpoint
		mp.Endpoint = chooseEndpoint(desired, ps.desired, cur, a.endpoints[p.PublicKey], now)
		ps.name, ps.desired = p.Name, desired
		a.peers[p.PublicKey] = ps
		peers = append(peers, mp)
	}
	a.mu.Unlock()
	if err := a.dev.SetPeers(peers); err != nil {
		a.log.Error("applying netmap failed; will retry on the next one", "version", nm.Version, "err", err)
		return
	}
	a.log.Debug("netmap applied", "version", nm.Version, "peers", len(peers))
	select {
	case a.rescueWake <- struct{}{}:
	default:
	}
}

func (a *Agent) sanitize(p api.Peer) (mesh.Peer, bool) {
	if p.PublicKey.IsZero() || p.PublicKey == a.id.publicKey {
		a.log.Warn("ignoring netmap peer with a missing or our own key", "peer", p.Name)
		return mesh.Peer{}, false
	}
	n := api.Node{PodCIDRs: p.AllowedIPs}
	allowed := netmap.AllowedIPs(&n, a.cidrs)
	for _, own := range a.self.PodCIDRs {
		allowed = slices.DeleteFunc(allowed, func(q netip.Prefix) bool { return q.Overlaps(own) })
	}
	if len(allowed) != len(p.AllowedIPs) {
		a.log.Warn("ignoring allowed IPs outside the cluster's pod CIDRs or inside our own", "peer", p.Name, "sent", p.AllowedIPs, "kept", allowed)
	}
	if len(allowed) == 0 && p.Via == "" {
		return mesh.Peer{}, false
	}
	ep := p.Endpoint
	if ep.IsValid() && !netmap.ValidEndpoint(ep.Addr()) {
		a.log.Warn("ignoring invalid endpoint", "peer", p.Name, "endpoint", ep)
		ep = netip.AddrPort{}
	}
	return mesh.Peer{
		PublicKey:           p.PublicKey,
		Endpoint:            ep,
		AllowedIPs:          allowed,
		PersistentKeepalive: time.Duration(p.PersistentKeepalive) * time.Second,
	}, true
}
