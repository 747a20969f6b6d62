package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"sync"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/hostnet"
	"github.com/trellis-mesh/trellis/internal/mesh"
	"github.com/trellis-mesh/trellis/internal/token"
)

// ErrDeleted is returned by Run when an administrator deleted the node.
var ErrDeleted = errors.New("node was deleted from the cluster")

// Agent is one node: a source of netmaps (source.go), the loop that owns
// the data plane (loop.go), and the supervisor side (status endpoint and
// tunnels).
type Agent struct {
	cfg     Config
	log     *slog.Logger
	loop    *loop
	updates *Mailbox[Update] // from the source to the loop
	dev     Device           // nil unless the carrier is WireGuard
	vpn     *vpnCarrier      // nil unless the carrier is a VPN

	tunnelState tunnelStatus // the tunnel client once it runs (status.go)
}

// deps are the parts Run makes for real; tests give fakes.
type deps struct {
	source Source
	device Device
	host   Host
	// joined, if set, is closed once the node has credentials for the
	// supervisor tunnels (nil: no tunnels).
	joined  <-chan struct{}
	servers *serverList
}

// Run joins the cluster and keeps the node's data plane in step with its
// netmap until ctx ends. It returns an error only for problems that
// retrying cannot fix (wrong token, name taken, bad config); an unreachable
// server is waited for.
func Run(ctx context.Context, cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	log := cfg.Logger.With("node", cfg.NodeName)
	tok, err := token.Parse(cfg.Token)
	if err != nil {
		return fmt.Errorf("--token: %w", err)
	}
	if !tok.HasCAHash {
		log.Warn("the join token has no CA hash, so the server's certificate cannot be checked on first contact; use the full K10... token from the server's token file")
	}
	if err := os.MkdirAll(cfg.dir(), 0o700); err != nil {
		return fmt.Errorf("create agent data dir: %w", err)
	}
	id, err := loadOrCreateIdentity(&cfg)
	if err != nil {
		return err
	}
	var d deps
	var vc *vpnCarrier
	if cfg.VPN != nil {
		if vc, err = vpnUp(ctx, &cfg, log); err != nil {
			return err
		}
	}
	addrs, err := hostnet.DetectAddrs(cfg.NodeIPs)
	if err != nil {
		log.Debug("cannot tell which networks the node is on", "err", err)
	}
	if len(addrs.Internal) == 0 {
		log.Warn("no default route, so no node IP could be detected; set --node-ip")
	}
	if cfg.DataPlane || cfg.VPN != nil {
		h, err := newHost(log, cfg.CNIConfDir)
		if err != nil {
			return fmt.Errorf("watch the host's network: %w", err)
		}
		defer h.Close()
		d.host = h
	}
	if cfg.DataPlane {
		dev, err := openDevice(cfg, id, addrs, log)
		if err != nil {
			return err
		}
		defer func() {
			if err := dev.Close(); err != nil {
				log.Warn("closing WireGuard device", "err", err)
			}
		}()
		d.device = dev
	}
	ssc := serverSourceConfig{
		ServerURL: cfg.ServerURL,
		Aliases:   cfg.ServerAliases,
		Token:     tok,
		NodeName:  cfg.NodeName,
		Password:  id.password,
		Relay:     cfg.Relay,
		Members:   cfg.VPN != nil, // checks the VPN's routes against them
		Dir:       cfg.dir,
		Logger:    log,
	}
	if cfg.DataPlane {
		ssc.PublicKey, ssc.ListenPort = id.publicKey, uint16(cfg.WireGuard.ListenPort)
	}
	m := newAgentMetrics(cfg.Metrics)
	ssc.OnJoin = m.joined
	if vc != nil {
		ssc.WaitHint = vc.joinHint
	}
	src := newServerSource(ssc, api.Report{InternalIPs: addrs.Internal, Networks: addrs.Networks, ExternalIPs: cfg.ExternalIPs})
	d.source, d.joined, d.servers = src, src.Joined(), src.servers
	a := newAgent(cfg, log, vc, id.publicKey, d)
	if err := m.register(a, cfg.Metrics); err != nil {
		return err
	}
	return a.run(ctx, d)
}

// openDevice creates the WireGuard device. Its MTU is the underlay's (the
// interface of the node IP: peers are reached through it, even where no
// default route exists) minus WireGuard's overhead, unless configured.
func openDevice(cfg Config, id identity, addrs hostnet.Addrs, log *slog.Logger) (*mesh.Device, error) {
	wc := cfg.WireGuard
	wc.PrivateKey = id.privateKey
	if wc.MTU == 0 && len(addrs.Internal) > 0 {
		if m, ok := hostnet.LinkMTUOf(addrs.Internal[0]); ok && m > mesh.Overhead+576 {
			wc.MTU = mesh.TunnelMTU(m)
		}
	}
	dev, err := mesh.Open(wc, log)
	if err != nil {
		return nil, err
	}
	log.Info("WireGuard device up", "interface", wc.Interface, "kind", dev.Kind(), "mtu", dev.MTU(), "listenPort", wc.ListenPort)
	return dev, nil
}

// newAgent puts the node's parts together; cfg is validated.
func newAgent(cfg Config, log *slog.Logger, vc *vpnCarrier, own api.Key, d deps) *Agent {
	a := &Agent{cfg: cfg, log: log, vpn: vc, dev: d.device, updates: NewMailbox[Update]()}
	carrier := carrierNone
	switch {
	case d.device != nil:
		carrier = carrierWireGuard
	case vc != nil:
		carrier = carrierVPN
	}
	a.loop = newLoop(loopConfig{
		carrier:       carrier,
		dev:           d.device,
		host:          d.host,
		vpn:           a.vpn,
		src:           d.source,
		updates:       a.updates,
		reload:        cfg.Reload,
		own:           own,
		nodeIPs:       cfg.NodeIPs,
		external:      cfg.ExternalIPs,
		bridge:        cfg.Bridge,
		cniDir:        cfg.CNIConfDir,
		ipamDir:       cfg.dir("cni-ipam"),
		endpointsPath: cfg.dir("endpoints.json"),
		waitWhat:      firstHandshakeWait(cfg.WireGuard.ListenPort),
		log:           log,
	})
	return a
}

// run runs the node with its parts: the source, the loop, the status
// endpoint and (once joined) the supervisor tunnels, each on its own
// goroutine, until ctx ends or the source gives up.
func (a *Agent) run(ctx context.Context, d deps) error {
	stopStatus, err := a.startStatus()
	if err != nil {
		return err
	}
	defer stopStatus()

	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // before wg.Wait
	loopErr := make(chan error, 1)
	wg.Go(func() { loopErr <- a.loop.run(ctx) })
	if d.joined != nil {
		wg.Go(func() {
			select {
			case <-d.joined:
				a.runTunnels(ctx, d.servers)
			case <-ctx.Done():
			}
		})
	}
	srcErr := make(chan error, 1)
	wg.Go(func() { srcErr <- d.source.Run(ctx, a.updates) })
	select {
	case err = <-srcErr:
		cancel()
		if lerr := <-loopErr; lerr != nil && err == nil {
			err = lerr
		}
	case err = <-loopErr:
		cancel()
		<-srcErr
	}
	if errors.Is(err, ErrDeleted) {
		// The loop has stopped: nothing else touches the data plane.
		if a.dev != nil {
			if perr := a.dev.SetPeers(nil); perr != nil {
				a.log.Warn("removing the peers failed", "err", perr)
			}
		}
		if a.vpn != nil {
			vpnLeave(context.WithoutCancel(ctx), a.cfg.DataDir, a.vpn.p, a.log)
		}
	}
	return err
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
	// hint, if set, may say why the wait fails; asked only when the wait
	// is logged.
	hint func() string
	next time.Time
	gap  time.Duration
}

func (w *waitLog) failed(err error) {
	now := time.Now()
	if now.Before(w.next) {
		return
	}
	args := []any{"err", err}
	if w.hint != nil {
		if h := w.hint(); h != "" {
			args = append(args, "hint", h)
		}
	}
	w.log.Warn("waiting for "+w.what, args...)
	if w.gap == 0 {
		w.gap = 5 * time.Second
	} else {
		w.gap = min(2*w.gap, 5*time.Minute)
	}
	w.next = now.Add(w.gap)
}
