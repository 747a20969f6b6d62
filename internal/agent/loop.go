package agent

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync/atomic"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/cni"
	"github.com/trellis-mesh/trellis/internal/hostnet"
	"github.com/trellis-mesh/trellis/internal/mesh"
)

// Timing of the loop (loopConfig fields of the same names override them
// in tests).
const (
	// tickSettled is the status tick while every peer is settled (one
	// device read: 0.7 ms at 100 peers, 4.4 ms at 1000, BenchmarkStatus
	// in internal/mesh); tickWatch the tick while the handshake rescue
	// watches a peer (handshake.go).
	tickSettled = time.Second
	tickWatch   = rescueInterval
	// resyncInterval is the backstop: the whole data plane is compared
	// with the host this often even when no change was notified.
	resyncInterval = 10 * time.Second
	// retryMax bounds the backoff of a failed apply (backoff: 0.5 s,
	// doubling, ±20 %).
	retryMax = 30 * time.Second
	// vpnCallTimeout bounds each call to the VPN's local API.
	vpnCallTimeout = 30 * time.Second
)

// loopConfig is what the loop is given.
type loopConfig struct {
	carrier int
	dev     Device      // the WireGuard device; nil unless carrierWireGuard
	host    Host        // nil only with carrierNone
	vpn     *vpnCarrier // nil unless carrierVPN
	src     Source      // where reports go
	updates *Mailbox[Update]
	reload  <-chan Reload

	own      api.Key      // the node's WireGuard public key
	nodeIPs  []netip.Addr // --node-ip (pinned), or empty
	external []netip.Addr // --node-external-ip (reloadable)

	bridge, cniDir, ipamDir string
	endpointsPath           string // where working endpoints are remembered
	waitWhat                string // the first-handshake wait's description
	log                     *slog.Logger

	// Intervals; zero takes the constants above.
	tick, watchTick, resync time.Duration
}

// loop is the one goroutine that owns the node's data plane: one select
// over a new netmap, the status tick, a reload, a change of the host's
// links, addresses, routes or CNI directory, the resync timer and a retry
// of what failed. Each pass computes the plan (plan.go) and applies only
// what differs from the host. Everything below is touched by the loop
// goroutine only; others read the snapshot it publishes.
type loop struct {
	loopConfig

	nm      api.NetMap
	have    bool // a netmap arrived: until then nothing is changed
	members []api.Member
	desired []mesh.Peer                // the netmap's peers, sanitized
	peers   map[api.Key]*peerState     // what the loop knows of each netmap peer
	applied map[api.Key]netip.AddrPort // the netmap endpoints last applied

	endpoints endpointMemory
	addrs     hostnet.Addrs
	rescue    *handshakeRescue
	waits     progress

	netmapAt time.Time // when the netmap arrived
	relayed  int       // its peers reached through a relay

	vpnLink hostnet.Link // the VPN interface (found each full pass)
	steps   map[string]*stepState
	snap    atomic.Pointer[snapshot]
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

// stepState is a part of the data plane whose last apply failed.
type stepState struct {
	since time.Time
	tries int
	err   string
}

// snapshot is what the loop last saw and did, for readers on other
// goroutines (status endpoint, metrics, probes).
type snapshot struct {
	self          api.Node
	clusterCIDRs  []netip.Prefix
	peers         []api.PeerStatus // the device's peers with their names
	netmapVersion int64
	netmapAt      time.Time
	relayed       int
	vpnMTU        int
	local         []netip.Addr // the host's addresses (the tunnel may dial them)
}

func newLoop(c loopConfig) *loop {
	if c.tick == 0 {
		c.tick = tickSettled
	}
	if c.watchTick == 0 {
		c.watchTick = tickWatch
	}
	if c.resync == 0 {
		c.resync = resyncInterval
	}
	l := &loop{
		loopConfig: c,
		peers:      map[api.Key]*peerState{},
		applied:    map[api.Key]netip.AddrPort{},
		steps:      map[string]*stepState{},
		endpoints:  loadEndpoints(c.endpointsPath),
	}
	if c.dev != nil {
		l.rescue = newHandshakeRescue(c.dev.PublicKey())
	}
	l.snap.Store(&snapshot{})
	return l
}

// snapshot returns what the loop published last.
func (l *loop) snapshot() *snapshot { return l.snap.Load() }

// run is the loop. It returns nil when ctx ends, or an error that needs
// the operator (the VPN routes another cluster's CIDR).
func (l *loop) run(ctx context.Context) error {
	tick := time.NewTimer(0)
	defer tick.Stop()
	resync := time.NewTicker(l.resync)
	defer resync.Stop()
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	var changes <-chan struct{}
	if l.host != nil {
		changes = l.host.Changes()
	}
	// The first pass looks at the host's addresses (the report carries
	// them) but changes nothing until a netmap arrives.
	full := true
	retrying := false // the retry timer runs
	for {
		if err := ctx.Err(); err != nil {
			return nil
		}
		now := time.Now()
		watch, err := l.pass(ctx, full, now)
		if err != nil {
			return err
		}
		next := l.tick
		if watch {
			next = l.watchTick
		}
		tick.Reset(next)
		switch n := l.failing(); {
		case n == 0:
			retry.Stop()
			retrying = false
		case !retrying:
			retry.Reset(backoffCapped(n-1, retryMax))
			retrying = true
		}
		full = false
		select {
		case <-ctx.Done():
			return nil
		case <-l.updates.C():
			u, ok := l.updates.Take()
			if ok {
				l.take(u, time.Now())
				full = true
			}
		case r := <-l.reload:
			if !slices.Equal(l.external, r.ExternalIPs) {
				l.log.Info("external IPs changed by reload; telling the server", "from", l.external, "to", r.ExternalIPs)
				l.external = r.ExternalIPs
			}
			full = true
		case <-changes:
			full = true
		case <-resync.C:
			full = true
		case <-retry.C:
			retrying = false
			full = true
		case <-tick.C:
		}
	}
}

// take makes u the netmap the data plane follows, unless it fails
// checkNetmap.
func (l *loop) take(u Update, now time.Time) {
	nm := u.NetMap
	var pinned []netip.Prefix
	if l.have {
		pinned = l.nm.ClusterCIDRs
	}
	if err := checkNetmap(nm, pinned); err != nil {
		l.log.Error("ignoring a netmap the agent cannot follow; the data plane keeps the last one", "err", err)
		return
	}
	if u.Members != nil {
		l.members = u.Members
	}
	peers, dropped := sanitizePeers(nm, l.own)
	for _, d := range dropped {
		l.log.Warn("ignoring part of the netmap", "version", nm.Version, "what", d)
	}
	byKey := make(map[api.Key]*api.Peer, len(nm.Peers))
	for i := range nm.Peers {
		byKey[nm.Peers[i].PublicKey] = &nm.Peers[i]
	}
	next := make(map[api.Key]*peerState, len(peers))
	for _, p := range peers {
		k := api.Key(p.PublicKey)
		ps := l.peers[k]
		if ps == nil {
			ps = &peerState{since: now}
		}
		ps.name, ps.desired = byKey[k].Name, byKey[k].Endpoint
		next[k] = ps
	}
	l.peers, l.desired, l.nm, l.have, l.netmapAt = next, peers, nm, true, now
	l.relayed = 0
	for _, p := range nm.Peers {
		if p.Via != "" {
			l.relayed++
		}
	}
	l.log.Debug("netmap taken", "version", nm.Version, "peers", len(peers))
}

// pass looks at the device (and, when full, at the host), applies what
// differs from the plan, and does what the status tick feeds: handshake
// rescue, endpoint memory, the report, progress and the snapshot. watch
// says a peer needs looking at again soon.
func (l *loop) pass(ctx context.Context, full bool, now time.Time) (watch bool, err error) {
	if full {
		l.detectAddrs()
	}
	var st []mesh.PeerStatus
	stOK := false
	if l.dev != nil {
		var err error
		st, err = l.dev.Status()
		l.step("read the WireGuard device", err, now)
		stOK = err == nil
	}
	if l.carrier == carrierVPN && full {
		link, err := l.host.VPNLink(l.vpn.addrs)
		l.step("find the VPN interface", err, now)
		if err == nil {
			l.vpnLink = link
		}
	}
	if l.have {
		p := makePlan(l.planInput(st, now))
		if stOK && !mesh.PeersMatch(st, p.peers) {
			err := l.dev.SetPeers(p.peers)
			l.step("set the WireGuard peers", err, now)
			if err == nil {
				l.applied = make(map[api.Key]netip.AddrPort, len(l.desired))
				for _, d := range l.desired {
					l.applied[api.Key(d.PublicKey)] = d.Endpoint
				}
				watch = true // look at the new peers soon
			}
		}
		if full {
			if err := l.applyHost(ctx, p, now); err != nil {
				return false, err
			}
		}
	}
	if stOK && l.rescue != nil {
		reset, why, w := l.rescue.due(st, now)
		for i, p := range reset {
			l.resetPeer(p, why[i], l.rescue.peers[p.PublicKey].attempts)
		}
		watch = watch || w
	}
	var obs []api.Observation
	if stOK {
		l.rememberWorking(st, now)
		obs = l.observe(st, now)
	}
	var vpnStatus *api.VPNStatus
	if l.vpn != nil {
		vpnStatus = l.vpnReport(ctx, now)
	}
	l.src.Report(api.Report{
		InternalIPs:  l.addrs.Internal,
		Networks:     l.addrs.Networks,
		ExternalIPs:  l.external,
		Observations: obs,
		VPN:          vpnStatus,
	})
	l.checkWaits(st, now)
	l.publish(st)
	return watch, nil
}

func (l *loop) planInput(st []mesh.PeerStatus, now time.Time) planInput {
	status := make(map[api.Key]mesh.PeerStatus, len(st))
	for _, p := range st {
		status[api.Key(p.PublicKey)] = p
	}
	mtu := 0
	switch l.carrier {
	case carrierWireGuard:
		mtu = l.dev.MTU()
	case carrierVPN:
		mtu = l.vpnLink.MTU
	}
	return planInput{
		carrier:      l.carrier,
		self:         l.nm.Self,
		clusterCIDRs: l.nm.ClusterCIDRs,
		peers:        l.desired,
		status:       status,
		applied:      l.applied,
		remembered:   l.endpoints,
		now:          now,
		mtu:          mtu,
		bridge:       l.bridge,
		cniDir:       l.cniDir,
		ipamDir:      l.ipamDir,
	}
}

// applyHost makes the host match p: forwarding, the WireGuard interface's
// addresses and routes, the pod bridge, the CNI config, and the VPN's
// routes. Each part that fails is retried (step). The error is one that
// retrying cannot fix.
func (l *loop) applyHost(ctx context.Context, p plan, now time.Time) error {
	if l.carrier == carrierNone {
		return nil
	}
	if p.forwardV4 || p.forwardV6 {
		l.step("enable forwarding", l.host.EnableForwarding(p.forwardV4, p.forwardV6), now)
	}
	if l.dev != nil {
		l.step("set the WireGuard interface's addresses", l.dev.SetAddresses(p.tunnelAddrs), now)
		l.step("route the cluster CIDRs to the WireGuard interface", l.dev.SetRoutes(p.routes), now)
	}
	if l.carrier == carrierVPN && l.vpnLink.Name == "" {
		return nil // the VPN interface is not found: no MTU, no routes
	}
	if len(p.gateways) > 0 {
		l.step("set up the pod bridge", l.host.EnsureBridge(p.bridge, p.gateways, p.mtu), now)
	}
	if p.cni != nil {
		l.step("write the CNI config", l.host.WriteCNI(*p.cni), now)
	} else {
		l.step("remove the CNI config", l.host.RemoveCNI(cni.Config{Dir: l.cniDir}), now)
	}
	if l.carrier == carrierVPN {
		err := l.vpn.recordKernelRoutes(p.vpnRoutes)
		if err == nil {
			err = l.host.RouteToLink(l.vpnLink, p.vpnRoutes)
		}
		l.step("route the cluster CIDRs to the VPN interface", err, now)
		err = l.advertise(ctx, p.advertise)
		var fe *fatalError
		if errors.As(err, &fe) {
			return fe.err
		}
		l.step("advertise the pod CIDRs through the VPN", err, now)
	}
	return nil
}

// fatalError is an error the loop stops for: retrying cannot fix it.
type fatalError struct{ err error }

func (e *fatalError) Error() string { return e.err.Error() }

// step records the outcome of applying one part of the data plane: a
// failure is logged when the part starts failing, and its recovery when
// it works again; the loop retries with backoff meanwhile.
func (l *loop) step(what string, err error, now time.Time) {
	s := l.steps[what]
	if err == nil {
		if s != nil {
			l.log.Info(what+": works again", "after", now.Sub(s.since).Round(time.Millisecond), "tries", s.tries)
			delete(l.steps, what)
		}
		return
	}
	if s == nil {
		s = &stepState{since: now}
		l.steps[what] = s
		l.log.Warn(what+" failed; retrying with backoff", "err", err)
	} else if err.Error() != s.err {
		l.log.Debug(what+" failed again", "err", err, "tries", s.tries+1)
	}
	s.tries++
	s.err = err.Error()
}

// failing returns the most tries of a part that fails (0: none fails).
func (l *loop) failing() int {
	n := 0
	for _, s := range l.steps {
		n = max(n, s.tries)
	}
	return n
}

// detectAddrs looks at the node's addresses; when one the node had went
// away, connections bound to it are dead: the source reconnects.
func (l *loop) detectAddrs() {
	if l.host == nil {
		return
	}
	addrs, err := l.host.Addrs(l.nodeIPs)
	if err != nil {
		l.log.Debug("cannot tell which networks the node is on", "err", err)
	}
	prev := l.addrs
	l.addrs = addrs
	if prev.Internal != nil && !addrs.Equal(prev) {
		l.log.Info("node addresses changed; telling the server", "from", prev.Internal, "to", addrs.Internal)
	}
	if gone := goneAddrs(prev.Local, addrs.Local); len(gone) > 0 {
		// Connections to the server may be bound to an address that is
		// gone: start them afresh rather than wait for timeouts. (New
		// addresses break nothing, and the agent adds its own: the
		// tunnel's and the pod bridge's.)
		l.log.Debug("addresses went away; reconnecting to the server", "gone", gone)
		l.src.Reconnect()
	}
}

// goneAddrs returns the addresses of prev that are not in cur (both
// sorted).
func goneAddrs(prev, cur []netip.Addr) []netip.Addr {
	var gone []netip.Addr
	for _, a := range prev {
		if _, found := slices.BinarySearchFunc(cur, a, netip.Addr.Compare); !found {
			gone = append(gone, a)
		}
	}
	return gone
}

// rememberWorking records the endpoints of peers with a fresh handshake
// and saves the memory when it changed.
func (l *loop) rememberWorking(st []mesh.PeerStatus, now time.Time) {
	next := maps.Clone(l.endpoints)
	if next == nil {
		next = endpointMemory{}
	}
	for _, p := range st {
		if p.Endpoint.IsValid() && handshakeFresh(p.LastHandshake, now) {
			next[api.Key(p.PublicKey)] = p.Endpoint
		}
	}
	if maps.Equal(next, l.endpoints) {
		return
	}
	l.endpoints = next
	if l.endpointsPath == "" {
		return
	}
	if err := next.save(l.endpointsPath); err != nil {
		l.log.Debug("saving working endpoints failed", "err", err)
	}
}

func (l *loop) resetPeer(p mesh.PeerStatus, why string, attempts int) {
	name := ""
	if ps := l.peers[api.Key(p.PublicKey)]; ps != nil {
		name = ps.name
	}
	if err := l.dev.ResetPeer(p.PublicKey); err != nil {
		l.log.Warn("starting a WireGuard handshake over failed", "peer", name, "err", err)
		return
	}
	say := l.log.Debug
	if attempts <= 1 {
		say = l.log.Info
	}
	say("WireGuard handshake started over", "peer", name, "reason", why, "endpoint", p.Endpoint, "attempt", attempts)
}

// publish makes what the loop saw readable from other goroutines.
func (l *loop) publish(st []mesh.PeerStatus) {
	s := &snapshot{
		self:         l.nm.Self,
		clusterCIDRs: l.nm.ClusterCIDRs,
		peers:        make([]api.PeerStatus, 0, len(st)),
		vpnMTU:       l.vpnLink.MTU,
		local:        l.addrs.Local,
	}
	if l.have {
		s.netmapVersion, s.netmapAt, s.relayed = l.nm.Version, l.netmapAt, l.relayed
	}
	for _, p := range st {
		ps := api.PeerStatus{
			PublicKey:     api.Key(p.PublicKey),
			Endpoint:      p.Endpoint,
			LastHandshake: p.LastHandshake,
			RxBytes:       p.ReceiveBytes,
			TxBytes:       p.TransmitBytes,
		}
		if known := l.peers[ps.PublicKey]; known != nil {
			ps.Name = known.name
		}
		s.peers = append(s.peers, ps)
	}
	l.snap.Store(s)
}

// backoffCapped is backoff(n) no longer than limit.
func backoffCapped(n int, limit time.Duration) time.Duration {
	return min(backoff(n), limit)
}
