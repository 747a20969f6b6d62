package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/cni"
	"github.com/trellis-mesh/trellis/internal/hostnet"
	"github.com/trellis-mesh/trellis/internal/mesh/meshtest"
	"github.com/trellis-mesh/trellis/internal/vpn"
)

// fakeSource is a Source fed by the test.
type fakeSource struct {
	netmaps chan api.NetMap
	end     chan error // Run returns what arrives here

	mu         sync.Mutex
	reports    []api.Report
	reconnects int
}

func newFakeSource() *fakeSource {
	return &fakeSource{netmaps: make(chan api.NetMap, 16), end: make(chan error, 1)}
}

func (s *fakeSource) Run(ctx context.Context, out *Mailbox[Update]) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-s.end:
			return err
		case nm := <-s.netmaps:
			out.Post(Update{NetMap: nm})
		}
	}
}

func (s *fakeSource) Report(r api.Report) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reports = append(s.reports, r)
}

func (s *fakeSource) Reconnect() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reconnects++
}

func (s *fakeSource) lastReport() api.Report {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.reports) == 0 {
		return api.Report{}
	}
	return s.reports[len(s.reports)-1]
}

// syncBuffer is a log sink safe for the loop's goroutine and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// node is an agent on fakes: a fake source, device and host, run by
// the test.
type node struct {
	t    *testing.T
	a    *Agent
	src  *fakeSource
	dev  *meshtest.Device
	host *meshtest.Host
	logs *syncBuffer
	cfg  Config
	done chan error
	stop context.CancelFunc
}

var (
	ownKey  = api.Key{0xaa, 31: 1}
	peerA   = api.Key{0x01, 31: 1}
	peerB   = api.Key{0x02, 31: 1}
	nodeIP  = netip.MustParseAddr("192.0.2.10")
	cluster = netip.MustParsePrefix("10.42.0.0/16")
)

type nodeOption func(*Config, *loopConfig)

// withVPN makes the node's pods ride VPN p instead of WireGuard.
func withVPN(p vpn.Provider) nodeOption {
	return func(c *Config, _ *loopConfig) { c.DataPlane, c.VPN = false, p }
}

// startNode runs an agent with fakes until the test ends.
func startNode(t *testing.T, opts ...nodeOption) *node {
	t.Helper()
	logs := &syncBuffer{}
	n := &node{
		t:    t,
		src:  newFakeSource(),
		dev:  meshtest.NewDevice(ownKey, 1420),
		host: meshtest.NewHost(hostnet.Addrs{Internal: []netip.Addr{nodeIP}, Networks: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}, Local: []netip.Addr{nodeIP}}),
		logs: logs,
		done: make(chan error, 1),
	}
	n.dev.OnChange = n.host.Notify // as netlink tells of the interface's changes
	dir := t.TempDir()
	n.cfg = Config{
		ServerURL:  "https://192.0.2.1:6443",
		Token:      "secret",
		NodeName:   "self",
		DataDir:    dir,
		DataPlane:  true,
		CNIConfDir: filepath.Join(dir, "net.d"),
		StatusPort: -1,
		Logger:     slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	lc := loopConfig{tick: 20 * time.Millisecond, watchTick: 10 * time.Millisecond, resync: time.Hour}
	for _, o := range opts {
		o(&n.cfg, &lc)
	}
	if err := n.cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	d := deps{source: n.src, device: n.dev, host: n.host}
	var vc *vpnCarrier
	if n.cfg.VPN != nil {
		d.device = nil
		n.host.SetVPNLink(hostnet.Link{Name: "tailscale0", Index: 7, MTU: 1280})
		vc = &vpnCarrier{p: n.cfg.VPN, addrs: []netip.Addr{netip.MustParseAddr("100.64.0.5")}, statePath: n.cfg.dir(vpnStateFile), approvalTimeout: time.Hour}
	}
	n.a = newAgent(n.cfg, n.cfg.Logger, vc, ownKey, d)
	n.a.loop.tick, n.a.loop.watchTick, n.a.loop.resync = lc.tick, lc.watchTick, lc.resync
	ctx, cancel := context.WithCancel(context.Background())
	n.stop = cancel
	go func() { n.done <- n.a.run(ctx, d) }()
	t.Cleanup(func() {
		cancel()
		if err := <-n.done; err != nil {
			t.Errorf("agent ended with %v", err)
		}
		if t.Failed() {
			t.Logf("agent log:\n%s", logs.String())
		}
	})
	return n
}

// waitFor polls cond until it holds (or fails the test after 5 s) and
// returns how long it took.
func (n *node) waitFor(what string, cond func() error) time.Duration {
	n.t.Helper()
	start := time.Now()
	var err error
	for time.Since(start) < 5*time.Second {
		if err = cond(); err == nil {
			return time.Since(start)
		}
		time.Sleep(5 * time.Millisecond)
	}
	n.t.Fatalf("%s: not after 5s: %v", what, err)
	return 0
}

func pfxs(s ...string) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(s))
	for _, x := range s {
		out = append(out, netip.MustParsePrefix(x))
	}
	return out
}

// netmapOf is a netmap of this node (pod CIDR podCIDR, none if empty)
// with peers A (10.42.1.0/24) and B (10.42.2.0/24).
func netmapOf(version int64, podCIDR string) api.NetMap {
	nm := api.NetMap{
		Version:      version,
		ClusterCIDRs: []netip.Prefix{cluster},
		Self:         api.Node{Name: "self", PodCIDRs: pfxs()},
		Peers: []api.Peer{
			{Name: "a", PublicKey: peerA, Endpoint: netip.MustParseAddrPort("198.51.100.1:51820"), AllowedIPs: pfxs("10.42.1.0/24"), PersistentKeepalive: 25},
			{Name: "b", PublicKey: peerB, Endpoint: netip.MustParseAddrPort("203.0.113.2:51820"), AllowedIPs: pfxs("10.42.2.0/24"), PersistentKeepalive: 25},
		},
	}
	if podCIDR != "" {
		nm.Self.PodCIDRs = pfxs(podCIDR)
	}
	return nm
}

// inMesh checks that the fakes hold the whole data plane of netmapOf(_,
// 10.42.0.0/24).
func (n *node) inMesh() error {
	peers := n.dev.Peers()
	if len(peers) != 2 || peers[0].PublicKey != peerA || peers[1].PublicKey != peerB {
		return fmt.Errorf("device peers %v", peers)
	}
	if !slices.Equal(peers[0].AllowedIPs, pfxs("10.42.1.0/24")) || peers[0].Endpoint.String() != "198.51.100.1:51820" || peers[0].PersistentKeepalive != 25*time.Second {
		return fmt.Errorf("peer a is %+v", peers[0])
	}
	if got := n.dev.Addresses(); !slices.Equal(got, pfxs("10.42.0.0/32")) {
		return fmt.Errorf("interface addresses %v", got)
	}
	if got := n.dev.Routes(); !slices.Equal(got, pfxs("10.42.0.0/16")) {
		return fmt.Errorf("routes %v", got)
	}
	if b, ok := n.host.Bridge("cni0"); !ok || !slices.Equal(b.Gateways, pfxs("10.42.0.1/24")) || b.MTU != 1420 {
		return fmt.Errorf("bridge %+v (exists %v)", b, ok)
	}
	if v4, _ := n.host.Forwarding(); !v4 {
		return errors.New("IPv4 forwarding is off")
	}
	return n.conflistIs("10.42.0.0/24")
}

func (n *node) conflistPath() string { return cni.Config{Dir: n.cfg.CNIConfDir}.Path() }

func (n *node) conflistIs(podCIDR string) error {
	want, err := cni.Conflist(cni.Config{Dir: n.cfg.CNIConfDir, Bridge: "cni0", PodCIDRs: pfxs(podCIDR), MTU: 1420, IPAMDataDir: n.cfg.dir("cni-ipam")})
	if err != nil {
		return err
	}
	got, ok := n.host.File(n.conflistPath())
	if !ok || !bytes.Equal(got, want) {
		return fmt.Errorf("CNI config (exists %v):\n%s", ok, got)
	}
	return nil
}

func TestLoopAppliesNetmap(t *testing.T) {
	n := startNode(t)
	// Before a netmap nothing is touched: an adopted kernel device keeps
	// its peers while the agent restarts.
	time.Sleep(50 * time.Millisecond)
	if n.dev.Calls(meshtest.OpSetPeers)+n.dev.Calls(meshtest.OpSetAddresses)+n.host.Calls(meshtest.OpWriteCNI)+n.host.Calls(meshtest.OpRemoveCNI) != 0 {
		t.Fatal("the loop changed the data plane before the first netmap")
	}
	if r := n.src.lastReport(); !slices.Equal(r.InternalIPs, []netip.Addr{nodeIP}) {
		t.Errorf("first report %+v, want the node IP", r)
	}
	n.src.netmaps <- netmapOf(1, "10.42.0.0/24")
	took := n.waitFor("the netmap applied", n.inMesh)
	t.Logf("netmap → data plane in %v", took)

	// A peer leaves: it is removed, the other keeps its session.
	n.dev.Handshake([32]byte(peerA), time.Now(), 100, 100)
	nm := netmapOf(2, "10.42.0.0/24")
	nm.Peers = nm.Peers[:1]
	n.src.netmaps <- nm
	n.waitFor("peer b removed", func() error {
		if p := n.dev.Peers(); len(p) != 1 || p[0].LastHandshake.IsZero() {
			return fmt.Errorf("peers %+v", p)
		}
		return nil
	})
	n.waitFor("the status endpoint's peers", func() error {
		if st := n.a.status(time.Now()); len(st.Peers) != 1 || st.Peers[0].Name != "a" {
			return fmt.Errorf("status peers %+v", st.Peers)
		}
		return nil
	})
}

// TestLoopRepairsDrift changes the data plane behind the loop's back, as
// an operator or another installer would, and checks that it is repaired
// (each repair is timed).
func TestLoopRepairsDrift(t *testing.T) {
	n := startNode(t)
	n.src.netmaps <- netmapOf(1, "10.42.0.0/24")
	n.waitFor("the netmap applied", n.inMesh)
	for _, d := range []struct {
		what  string
		drift func()
	}{
		{"wg set peer remove", func() { n.dev.RemovePeer([32]byte(peerB)) }},
		{"ip addr flush dev trellis-wg", n.dev.FlushAddresses},
		{"ip route del (cluster CIDR)", n.dev.DeleteRoutes},
		{"ip link del cni0", func() { n.host.DeleteBridge("cni0") }},
		{"conflist deleted", func() { n.host.WriteFile(n.conflistPath(), nil) }},
		{"conflist overwritten", func() {
			n.host.WriteFile(n.conflistPath(), []byte(`{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"flannel"}]}`))
		}},
	} {
		d.drift()
		took := n.waitFor("repair after "+d.what, n.inMesh)
		t.Logf("%s: repaired in %v", d.what, took)
	}
}

// TestLoopSettles checks that a settled node makes no full passes: its
// own repairs must not notify changes that start another one.
func TestLoopSettles(t *testing.T) {
	n := startNode(t)
	n.src.netmaps <- netmapOf(1, "10.42.0.0/24")
	n.waitFor("the netmap applied", n.inMesh)
	time.Sleep(100 * time.Millisecond)
	before := n.host.Calls(meshtest.OpEnsureBridge)
	peersBefore := n.dev.Calls(meshtest.OpSetPeers)
	time.Sleep(300 * time.Millisecond) // 15 ticks
	if d := n.host.Calls(meshtest.OpEnsureBridge) - before; d != 0 {
		t.Errorf("%d full passes while settled", d)
	}
	if d := n.dev.Calls(meshtest.OpSetPeers) - peersBefore; d != 0 {
		t.Errorf("%d peer changes while settled", d)
	}
	if s := n.dev.Calls(meshtest.OpStatus); s < 10 {
		t.Errorf("%d device reads: the status tick does not run", s)
	}
}

// TestLoopRetriesFailures makes applies fail and checks that they are
// retried with backoff until they work, and logged once each way.
func TestLoopRetriesFailures(t *testing.T) {
	n := startNode(t)
	n.dev.FailNext(meshtest.OpSetPeers, errors.New("device busy"), errors.New("device busy"))
	n.host.FailNext(meshtest.OpWriteCNI, errors.New("read-only file system"), errors.New("read-only file system"))
	n.src.netmaps <- netmapOf(1, "10.42.0.0/24")
	took := n.waitFor("the netmap applied after failures", n.inMesh)
	t.Logf("applied after two failures of each in %v", took)
	logs := n.logs.String()
	if !strings.Contains(logs, `msg="write the CNI config: works again"`) || !regexp.MustCompile(`write the CNI config: works again" after=\S+ tries=2`).MatchString(logs) {
		t.Errorf("the CNI config should work again after two failed tries:\n%s", logs)
	}
	for _, want := range []string{"set the WireGuard peers failed; retrying", "write the CNI config failed; retrying", "write the CNI config: works again", "set the WireGuard peers: works again"} {
		if c := strings.Count(logs, want); c != 1 {
			t.Errorf("log has %q %d times, want once:\n%s", want, c, logs)
		}
	}
	if strings.Contains(logs, "level=WARN msg=\"set the WireGuard peers failed again") {
		t.Errorf("a repeated failure was logged at warning level:\n%s", logs)
	}
}

// TestLoopWaitsForPodCIDR is a node of a Kubernetes cluster: no data plane
// and no CNI config until its Node has a pod CIDR; the CIDR taken away
// (the Node deleted) takes them away again.
func TestLoopWaitsForPodCIDR(t *testing.T) {
	n := startNode(t)
	n.host.WriteFile(n.conflistPath(), []byte(`{"cniVersion":"1.0.0","name":"trellis","plugins":[]}`)) // left by an earlier run
	n.src.netmaps <- netmapOf(1, "")
	n.waitFor("the stale conflist removed", func() error {
		if _, ok := n.host.File(n.conflistPath()); ok {
			return errors.New("conflist still there")
		}
		return nil
	})
	if p := n.dev.Peers(); len(p) != 0 {
		t.Errorf("peers %v without a pod CIDR", p)
	}
	if _, ok := n.host.Bridge("cni0"); ok {
		t.Error("a bridge without a pod CIDR")
	}
	n.src.netmaps <- netmapOf(2, "10.42.0.0/24")
	n.waitFor("the data plane once the CIDR is known", n.inMesh)
	n.src.netmaps <- netmapOf(3, "")
	n.waitFor("the data plane gone with the CIDR", func() error {
		if _, ok := n.host.File(n.conflistPath()); ok {
			return errors.New("conflist still there")
		}
		if p := n.dev.Peers(); len(p) != 0 {
			return fmt.Errorf("peers %v", p)
		}
		return nil
	})
	// Another installer's file is not ours to remove.
	other := []byte(`{"name":"other"}`)
	n.host.WriteFile(n.conflistPath(), other)
	time.Sleep(50 * time.Millisecond)
	if b, ok := n.host.File(n.conflistPath()); !ok || !bytes.Equal(b, other) {
		t.Errorf("another installer's conflist was changed: %s", b)
	}
}

func TestLoopIgnoresBadNetmap(t *testing.T) {
	n := startNode(t)
	n.src.netmaps <- netmapOf(1, "10.42.0.0/24")
	n.waitFor("the netmap applied", n.inMesh)
	bad := netmapOf(2, "10.42.0.0/24")
	bad.ClusterCIDRs = pfxs("0.0.0.0/0")
	bad.Peers = nil
	n.src.netmaps <- bad
	time.Sleep(50 * time.Millisecond)
	if err := n.inMesh(); err != nil {
		t.Fatalf("a bad netmap changed the data plane: %v", err)
	}
	if !strings.Contains(n.logs.String(), "ignoring a netmap the agent cannot follow") {
		t.Errorf("no log line for the bad netmap")
	}
}

func TestLoopReloadAndAddresses(t *testing.T) {
	reload := make(chan Reload)
	n := startNode(t, func(c *Config, _ *loopConfig) { c.Reload = reload })
	n.src.netmaps <- netmapOf(1, "10.42.0.0/24")
	n.waitFor("the netmap applied", n.inMesh)
	ext := netip.MustParseAddr("198.51.100.77")
	reload <- Reload{ExternalIPs: []netip.Addr{ext}}
	n.waitFor("the new external IP reported", func() error {
		if r := n.src.lastReport(); !slices.Equal(r.ExternalIPs, []netip.Addr{ext}) {
			return fmt.Errorf("report %+v", r)
		}
		return nil
	})
	// The node IP changes: reported, and the source reconnects (a
	// connection may be bound to the address that went).
	newIP := netip.MustParseAddr("192.0.2.11")
	n.host.SetAddrs(hostnet.Addrs{Internal: []netip.Addr{newIP}, Local: []netip.Addr{newIP}})
	n.waitFor("the new node IP reported", func() error {
		if r := n.src.lastReport(); !slices.Equal(r.InternalIPs, []netip.Addr{newIP}) {
			return fmt.Errorf("report %+v", r)
		}
		n.src.mu.Lock()
		defer n.src.mu.Unlock()
		if n.src.reconnects == 0 {
			return errors.New("no reconnect")
		}
		return nil
	})
}

func TestLoopReportsHandshakes(t *testing.T) {
	n := startNode(t)
	n.src.netmaps <- netmapOf(1, "10.42.0.0/24")
	n.waitFor("the netmap applied", n.inMesh)
	n.dev.Handshake([32]byte(peerA), time.Now(), 1000, 1000)
	n.waitFor("peer a reported ok", func() error {
		r := n.src.lastReport()
		if len(r.Observations) != 2 || r.Observations[0].Peer != "a" || r.Observations[0].Handshake != api.HandshakeOK {
			return fmt.Errorf("observations %+v", r.Observations)
		}
		return nil
	})
	// The working endpoint is remembered across restarts.
	if m := loadEndpoints(n.cfg.dir("endpoints.json")); m[peerA].String() != "198.51.100.1:51820" {
		t.Errorf("remembered endpoints %v", m)
	}
}

func TestAgentDeleted(t *testing.T) {
	n := startNode(t)
	n.src.netmaps <- netmapOf(1, "10.42.0.0/24")
	n.waitFor("the netmap applied", n.inMesh)
	n.src.end <- ErrDeleted
	select {
	case err := <-n.done:
		n.done <- nil // for the cleanup
		if !errors.Is(err, ErrDeleted) {
			t.Fatalf("run ended with %v, want ErrDeleted", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("run did not end")
	}
	if p := n.dev.Peers(); len(p) != 0 {
		t.Errorf("peers %v left after the node was deleted", p)
	}
}

// TestMetricsScrapeDuringJoin scrapes the agent's metrics while it waits
// for its first netmap and while it applies it: with -race this shows the
// scrape reads nothing the loop writes.
func TestMetricsScrapeDuringJoin(t *testing.T) {
	reg := prometheus.NewRegistry()
	n := startNode(t)
	m := newAgentMetrics(reg)
	if err := m.register(n.a, reg); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := reg.Gather(); err != nil {
				t.Error(err)
				return
			}
		}
	})
	time.Sleep(30 * time.Millisecond)
	n.src.netmaps <- netmapOf(7, "10.42.0.0/24")
	n.waitFor("the netmap applied", n.inMesh)
	n.waitFor("the netmap version exported", func() error {
		mfs, err := reg.Gather()
		if err != nil {
			return err
		}
		for _, mf := range mfs {
			if mf.GetName() == "trellis_agent_netmap_version" && mf.GetMetric()[0].GetGauge().GetValue() == 7 {
				return nil
			}
		}
		return errors.New("trellis_agent_netmap_version is not 7")
	})
	close(stop)
	wg.Wait()
}
