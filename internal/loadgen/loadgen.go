// Package loadgen measures a Trellis server's control plane with many
// virtual agents in one process: real joins (with certificate requests),
// real netmap streams and reports, and no data plane.
package loadgen

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net/netip"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
)

// Config says what to run against which server. Zero values are replaced
// by the documented defaults in Validate.
type Config struct {
	// ServerURL is the server's base URL, e.g. https://127.0.0.1:6443.
	// Required.
	ServerURL string
	// Token is the join token. Required.
	Token string
	// CAPEM is the cluster CA certificate (PEM). Required.
	CAPEM []byte
	// Agents is the number of virtual agents. Default 100.
	Agents int
	// Changes is the number of changes whose fan-out is measured.
	// Default 5.
	Changes int
	// JoinConcurrency bounds the joins in flight. Default 32.
	JoinConcurrency int
	// StreamConcurrency bounds the netmap streams being opened at once.
	// Default 64.
	StreamConcurrency int
	// SourceAddrs makes agent i connect from its own loopback address
	// (127.1.0.1 and up); the server must listen on loopback.
	SourceAddrs bool
	// ServerPID, if not 0, is the server's process: its RSS and CPU time
	// are sampled from /proc.
	ServerPID int
	// PhaseTimeout bounds each phase (all joins, all first netmaps, the
	// fan-out of one change, settling). Default 10 minutes.
	PhaseTimeout time.Duration
	// WholeMaps makes the agents ask for whole netmaps on every change,
	// as agents did before deltas (api.NetmapDeltasParam), to compare.
	WholeMaps bool
	// Nodes, if not nil, makes the run one in Kubernetes mode: the
	// server follows the Nodes of an API server (it runs with
	// --kubeconfig), and before the joins a Node is created for every
	// agent through Nodes, with the pod CIDR node IPAM would give it (a
	// /24 of 10.0.0.0/8, which must be the server's cluster CIDR). After
	// the changes, NodeDeletes Nodes are deleted one after another and
	// the fan-out of each deletion measured.
	Nodes Nodes
	// NodeDeletes is the number of Node deletions measured in
	// Kubernetes mode. Default 3.
	NodeDeletes int
	// Logger receives progress. Default slog.Default().
	Logger *slog.Logger
}

// Validate fills in defaults and checks the values.
func (c *Config) Validate() error {
	if c.ServerURL == "" || c.Token == "" || len(c.CAPEM) == 0 {
		return errors.New("loadgen config: server URL, token and CA are required")
	}
	if c.Agents == 0 {
		c.Agents = 100
	}
	if c.Agents < 1 || c.Agents > 60000 {
		return fmt.Errorf("loadgen config: %d agents is out of range 1-60000", c.Agents)
	}
	if c.Changes == 0 {
		c.Changes = 5
	}
	if c.Changes < 1 || c.Changes > 250 {
		return fmt.Errorf("loadgen config: %d changes is out of range 1-250", c.Changes)
	}
	if c.Nodes != nil && c.NodeDeletes == 0 {
		c.NodeDeletes = 3
	}
	if c.NodeDeletes < 0 || c.NodeDeletes >= c.Agents {
		return fmt.Errorf("loadgen config: %d Node deletions with %d agents: want 0 to %d", c.NodeDeletes, c.Agents, c.Agents-1)
	}
	if c.JoinConcurrency <= 0 {
		c.JoinConcurrency = 32
	}
	if c.StreamConcurrency <= 0 {
		c.StreamConcurrency = 64
	}
	if c.PhaseTimeout <= 0 {
		c.PhaseTimeout = 10 * time.Minute
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

// Change is the fan-out of one change: an agent's report of a new
// external IP, until every agent's stream has delivered a netmap with it.
type Change struct {
	// All is the time until the last agent had the change.
	All time.Duration `json:"all"`
	// P50 and P99 are over the agents' delivery times.
	P50 time.Duration `json:"p50"`
	P99 time.Duration `json:"p99"`
	// Delivered is how many agents got it within the phase timeout.
	Delivered int `json:"delivered"`
	// StreamBytes is what all streams carried from the change until the
	// last agent had it (netmap bodies, not counting TLS and HTTP framing).
	StreamBytes int64 `json:"streamBytes"`
	// ServerCPU is the server's CPU time over the same interval.
	ServerCPU time.Duration `json:"serverCPU"`
	// ServerPeakRSS is the highest RSS sampled (every 50 ms) meanwhile.
	ServerPeakRSS int64 `json:"serverPeakRSS"`
}

// Result is what one run measured.
type Result struct {
	Agents int `json:"agents"`
	// WholeMaps: the streams carried whole netmaps, not deltas.
	WholeMaps bool `json:"wholeMaps,omitempty"`
	// Join: all agents joined, JoinConcurrency at a time.
	JoinTime     time.Duration `json:"joinTime"`
	JoinsPerSec  float64       `json:"joinsPerSec"`
	JoinP50      time.Duration `json:"joinP50"`
	JoinP99      time.Duration `json:"joinP99"`
	JoinFailures int           `json:"joinFailures"`
	// Joined is how many agents joined (all of them unless the phase
	// failed or timed out).
	Joined int `json:"joined"`
	// JoinRetries counts joins the server answered 503 (try again).
	JoinRetries int `json:"joinRetries"`
	// StreamsTime is from opening the first stream until every agent had
	// its first netmap; SettleTime is then until the server was idle.
	StreamsTime time.Duration `json:"streamsTime"`
	SettleTime  time.Duration `json:"settleTime"`
	// Changes are the measured fan-outs; FanoutP50/P99 are over all their
	// deliveries, FanoutAllMax is the slowest change's All.
	Changes      []Change      `json:"changes"`
	FanoutP50    time.Duration `json:"fanoutP50"`
	FanoutP99    time.Duration `json:"fanoutP99"`
	FanoutAllMax time.Duration `json:"fanoutAllMax"`
	// BytesPerChange is the mean of Changes' StreamBytes; MapBytes is one
	// agent's full netmap line; PeerBytes is one peer entry of it, what an
	// incremental update of one peer would carry per agent.
	BytesPerChange int64 `json:"bytesPerChange"`
	MapBytes       int64 `json:"mapBytes"`
	PeerBytes      int64 `json:"peerBytes"`
	// Peers is the number of peers in one agent's netmap; AgentBytesPerPeer
	// is the Go heap one decoded netmap takes per peer (api.NetMap).
	Peers             int     `json:"peers"`
	AgentBytesPerPeer float64 `json:"agentBytesPerPeer"`
	// Server samples (zero without ServerPID).
	ServerRSSIdle int64 `json:"serverRSSIdle"`
	ServerRSSPeak int64 `json:"serverRSSPeak"`
	// ServerRSSMax is the highest RSS sampled over the whole run: joins,
	// first netmaps and changes.
	ServerRSSMax    int64         `json:"serverRSSMax"`
	ServerCPUJoin   time.Duration `json:"serverCPUJoin"`
	ServerCPUStream time.Duration `json:"serverCPUStreams"`
	CPUPerChange    time.Duration `json:"cpuPerChange"`
	StreamFailures  int64         `json:"streamFailures"`
	// ServerBusyIdle is the share of a CPU the server used in the last
	// second of settling (with every stream open and nothing changing).
	ServerBusyIdle float64 `json:"serverBusyIdle"`
	// Kubernetes mode (Config.Nodes): Kube is set; NodesTime is the
	// creation of every agent's Node; PodCIDRsTime is from opening the
	// first stream until every agent's netmap had the pod CIDR of the
	// last Node (taken from the Nodes); AnnotatedTime is from the end of
	// the joins until every Node carried Trellis's public-key annotation;
	// NodeDeletes are the fan-outs of Node deletions (until every other
	// agent's netmap dropped the deleted one) and NodeDeleteP99 the p99
	// over all their deliveries.
	Kube          bool          `json:"kube,omitempty"`
	NodesTime     time.Duration `json:"nodesTime,omitempty"`
	PodCIDRsTime  time.Duration `json:"podCIDRsTime,omitempty"`
	AnnotatedTime time.Duration `json:"annotatedTime,omitempty"`
	NodeDeletes   []Change      `json:"nodeDeletes,omitempty"`
	NodeDeleteP99 time.Duration `json:"nodeDeleteP99,omitempty"`
	// PodCIDRPeers is how many peers of one agent's netmap (read at the
	// end) carry a pod CIDR; in Kubernetes mode, from their Nodes.
	PodCIDRPeers int `json:"podCIDRPeers"`
	// ReconnectWhole and ReconnectResumed: every agent opens its stream
	// again at once, as after a server restart, asking for the whole
	// netmap, then resuming from it (api.NetmapHaveParam). Deltas only.
	ReconnectWhole   *Reconnect `json:"reconnectWhole,omitempty"`
	ReconnectResumed *Reconnect `json:"reconnectResumed,omitempty"`
}

// Reconnect is one storm of reconnecting agents, until each had the first
// line of its new stream.
type Reconnect struct {
	All       time.Duration `json:"all"`
	Bytes     int64         `json:"bytes"` // the first lines, all agents
	ServerCPU time.Duration `json:"serverCPU"`
	// Resumed is how many first lines were deltas (the agent's netmap
	// was current).
	Resumed int `json:"resumed"`
}

// Run joins cfg.Agents virtual agents, opens their netmap streams, makes
// cfg.Changes changes one after another and measures each fan-out. It
// closes every connection it opened before it returns.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	n := cfg.Agents
	res := &Result{Agents: n, WholeMaps: cfg.WholeMaps, Kube: cfg.Nodes != nil}
	runPeak := newPeakSampler(cfg.ServerPID)
	defer func() { res.ServerRSSMax = max(res.ServerRSSMax, runPeak.stop()) }()

	agents := make([]*vagent, n)
	if err := parallel(ctx, n, runtime.GOMAXPROCS(0)*2, func(i int) error {
		var src netip.Addr
		if cfg.SourceAddrs {
			src = sourceAddr(i)
		}
		a, err := newVAgent(i, cfg.ServerURL, cfg.CAPEM, src)
		agents[i] = a
		return err
	}); err != nil {
		return nil, fmt.Errorf("create agent identities: %w", err)
	}
	defer func() {
		for _, a := range agents {
			if a != nil {
				a.close()
			}
		}
	}()

	if cfg.Nodes != nil {
		if err := createNodes(ctx, cfg, agents, res); err != nil {
			return res, err
		}
	}

	// Joins.
	log.Info("joining", "agents", n, "concurrency", cfg.JoinConcurrency)
	cpu0 := sample(cfg.ServerPID)
	joinLat := make([]time.Duration, n)
	var joinFailures, joinRetries, joined atomic.Int64
	jctx, jcancel := context.WithTimeout(ctx, cfg.PhaseTimeout)
	start := time.Now()
	err := parallel(jctx, n, cfg.JoinConcurrency, func(i int) error {
		t := time.Now()
		// Like the agent, retry what the server calls temporary (503:
		// a lost race for a pod CIDR) with a growing, jittered delay.
		var err error
		for attempt := range maxJoinAttempts {
			if err = agents[i].join(jctx, cfg.Token); !errors.Is(err, errRetry) {
				break
			}
			joinRetries.Add(1)
			sleep(jctx, time.Duration(attempt+1)*50*time.Millisecond+time.Duration(mrand.Int64N(int64(50*time.Millisecond))))
		}
		joinLat[i] = time.Since(t)
		if err != nil {
			joinFailures.Add(1)
		} else {
			joined.Add(1)
		}
		return err
	})
	jcancel()
	res.JoinTime = time.Since(start)
	res.JoinFailures = int(joinFailures.Load())
	res.JoinRetries = int(joinRetries.Load())
	res.Joined = int(joined.Load())
	if err != nil {
		return res, fmt.Errorf("joins: %w", err)
	}
	res.JoinsPerSec = float64(n) / res.JoinTime.Seconds()
	res.JoinP50, res.JoinP99 = percentile(joinLat, 50), percentile(joinLat, 99)
	res.ServerCPUJoin = sample(cfg.ServerPID).CPU - cpu0.CPU
	log.Info("joined", "agents", n, "took", res.JoinTime.Round(time.Millisecond), "perSec", int(res.JoinsPerSec))
	joinedAt := time.Now()

	// Streams.
	sctx, stopStreams := context.WithCancel(ctx)
	var readers sync.WaitGroup
	defer func() {
		stopStreams()
		readers.Wait()
	}()
	f := newFollower(n)
	var podCIDRs *probe
	if cfg.Nodes != nil {
		// In Kubernetes mode a node has no pod CIDR, and so no peers,
		// until the server adopts its Node's: follow the last Node's
		// pod CIDR into every netmap, first lines included.
		podCIDRs = newProbe(`"`+podCIDROf(n-1).String()+`"`, n)
		f.target.Store(podCIDRs)
	}
	cpu0 = sample(cfg.ServerPID)
	start = time.Now()
	if podCIDRs != nil {
		podCIDRs.start = start
	}
	log.Info("opening netmap streams", "agents", n)
	octx, ocancel := context.WithTimeout(ctx, cfg.PhaseTimeout)
	err = parallel(octx, n, cfg.StreamConcurrency, func(i int) error {
		body, err := agents[i].openStream(sctx, !cfg.WholeMaps, "")
		if err != nil {
			return err
		}
		readers.Go(func() { _ = f.read(i, body) })
		return nil
	})
	if err == nil {
		select {
		case <-f.first:
		case <-octx.Done():
			err = fmt.Errorf("%d of %d agents got their first netmap within %v", f.firstN.Load(), n, cfg.PhaseTimeout)
		}
	}
	ocancel()
	res.StreamsTime = time.Since(start)
	if err != nil {
		return res, fmt.Errorf("netmap streams: %w", err)
	}
	log.Info("every agent has its first netmap", "took", res.StreamsTime.Round(time.Millisecond))
	if cfg.Nodes != nil {
		if err := waitKubeSync(ctx, cfg, podCIDRs, joinedAt, res); err != nil {
			return res, err
		}
		f.target.Store(nil)
	}
	settle := time.Now()
	base, err := waitIdle(ctx, cfg.ServerPID, 0, settleTimeout)
	if err != nil {
		return res, err
	}
	res.SettleTime = time.Since(settle)
	res.ServerBusyIdle = base
	res.ServerCPUStream = sample(cfg.ServerPID).CPU - cpu0.CPU
	res.ServerRSSIdle = sample(cfg.ServerPID).RSS
	log.Info("server idle", "settle", res.SettleTime.Round(time.Millisecond), "rssMiB", res.ServerRSSIdle>>20)

	// Changes.
	var all []time.Duration
	for k := range cfg.Changes {
		who := agents[(k*7919+1)%n]
		ext := netip.AddrFrom4([4]byte{198, 19, byte(k), 123})
		// The quote makes the marker match this address only (not
		// 198.19.1.123 inside 198.19.11.123); nothing can follow ".123".
		c, lat, err := fanout(ctx, cfg, f, `"`+ext.String(), nil, func() error { return who.report(ctx, ext) })
		if err != nil {
			return res, err
		}
		res.Changes = append(res.Changes, c)
		all = append(all, lat...)
		log.Info("change fanned out", "change", k+1, "of", cfg.Changes, "delivered", c.Delivered, "all", c.All.Round(time.Millisecond),
			"p50", c.P50.Round(time.Millisecond), "p99", c.P99.Round(time.Millisecond), "MiB", c.StreamBytes>>20, "serverCPU", c.ServerCPU)
		if c.Delivered < n {
			return res, fmt.Errorf("change %d reached %d of %d agents within %v", k+1, c.Delivered, n, cfg.PhaseTimeout)
		}
		if _, err := waitIdle(ctx, cfg.ServerPID, base, settleTimeout); err != nil {
			return res, err
		}
	}
	f.target.Store(nil)
	res.FanoutP50, res.FanoutP99 = percentile(all, 50), percentile(all, 99)
	live := agents
	if cfg.Nodes != nil {
		gone, err := deleteNodes(ctx, cfg, agents, f, base, res)
		if err != nil {
			return res, err
		}
		// A node without its Node has no peers; the reconnect storms
		// are of the others.
		live = slices.DeleteFunc(slices.Clone(agents), func(a *vagent) bool { return slices.Contains(gone, a.idx) })
	}
	var sumBytes int64
	var sumCPU time.Duration
	for _, c := range res.Changes {
		res.FanoutAllMax = max(res.FanoutAllMax, c.All)
		res.ServerRSSPeak = max(res.ServerRSSPeak, c.ServerPeakRSS)
		sumBytes += c.StreamBytes
		sumCPU += c.ServerCPU
	}
	res.BytesPerChange = sumBytes / int64(len(res.Changes))
	res.CPUPerChange = sumCPU / time.Duration(len(res.Changes))
	res.StreamFailures = f.failed.Load()

	// Measure an agent's memory with the streams closed, so that their
	// reads do not move the heap meanwhile.
	stopStreams()
	readers.Wait()
	if err := measureAgentMemory(ctx, agents[0], res); err != nil {
		return res, err
	}
	if cfg.WholeMaps {
		return res, nil
	}
	var haves []string
	if res.ReconnectWhole, haves, err = reconnectAll(ctx, cfg, live, nil); err != nil {
		return res, fmt.Errorf("reconnect for whole netmaps: %w", err)
	}
	if res.ReconnectResumed, _, err = reconnectAll(ctx, cfg, live, haves); err != nil {
		return res, fmt.Errorf("reconnect resuming: %w", err)
	}
	return res, nil
}

// fanout makes one change with do and follows marker into the netmap
// streams of every agent but those in skip until each had it, at most
// the phase timeout. It returns the change's figures and the delivery
// times.
func fanout(ctx context.Context, cfg Config, f *follower, marker string, skip []int, do func() error) (Change, []time.Duration, error) {
	p := newProbe(marker, cfg.Agents)
	for _, i := range skip {
		p.skip(i)
	}
	f.target.Store(p)
	defer f.target.Store(nil)
	bytes0 := f.bytes.Load()
	s0 := sample(cfg.ServerPID)
	peak := newPeakSampler(cfg.ServerPID)
	p.start = time.Now()
	if err := do(); err != nil {
		peak.stop()
		return Change{}, nil, err
	}
	timer := time.NewTimer(cfg.PhaseTimeout)
	select {
	case <-p.done:
	case <-timer.C:
	case <-ctx.Done():
	}
	timer.Stop()
	c := Change{StreamBytes: f.bytes.Load() - bytes0, ServerCPU: sample(cfg.ServerPID).CPU - s0.CPU, ServerPeakRSS: peak.stop()}
	lat := p.latencies()
	c.Delivered = len(lat)
	c.All, c.P50, c.P99 = slices.Max(append(lat, 0)), percentile(lat, 50), percentile(lat, 99)
	return c, lat, nil
}

// reconnectAll opens every agent's stream again (StreamConcurrency at a
// time), reads its first line and closes it. With haves, agent i says it
// holds haves[i]. It returns, for each agent whose first line was a whole
// netmap, the api.NetmapHaveParam value that names it.
func reconnectAll(ctx context.Context, cfg Config, agents []*vagent, haves []string) (*Reconnect, []string, error) {
	what := "whole"
	if haves != nil {
		what = "resuming"
	}
	cfg.Logger.Info("reconnecting every agent", "agents", len(agents), "first line", what)
	out := make([]string, len(agents))
	var bytesRead, resumed atomic.Int64
	rctx, cancel := context.WithTimeout(ctx, cfg.PhaseTimeout)
	defer cancel()
	s0 := sample(cfg.ServerPID)
	start := time.Now()
	err := parallel(rctx, len(agents), cfg.StreamConcurrency, func(i int) error {
		have := ""
		if haves != nil {
			have = haves[i]
		}
		body, err := agents[i].openStream(rctx, true, have)
		if err != nil {
			return err
		}
		defer body.Close()
		line, err := readLine(body)
		if err != nil {
			return fmt.Errorf("first line of agent %d: %w", i, err)
		}
		bytesRead.Add(int64(len(line) + 1))
		if bytes.HasPrefix(line, []byte(`{"delta"`)) {
			resumed.Add(1)
			return nil
		}
		out[i], err = haveOf(line)
		return err
	})
	r := &Reconnect{All: time.Since(start), Bytes: bytesRead.Load(), ServerCPU: sample(cfg.ServerPID).CPU - s0.CPU, Resumed: int(resumed.Load())}
	if err != nil {
		return r, nil, err
	}
	cfg.Logger.Info("every agent reconnected", "first line", what, "took", r.All.Round(time.Millisecond), "MiB", r.Bytes>>20, "resumed", r.Resumed, "serverCPU", r.ServerCPU)
	if _, err := waitIdle(ctx, cfg.ServerPID, 0, settleTimeout); err != nil {
		return r, nil, err
	}
	return r, out, nil
}

// readLine reads r up to its first non-empty line (without the '\n').
func readLine(r io.Reader) ([]byte, error) {
	var line []byte
	buf := make([]byte, 64<<10)
	for {
		n, err := r.Read(buf)
		line = append(line, buf[:n]...)
		for {
			i := bytes.IndexByte(line, '\n')
			if i < 0 {
				break
			}
			if i > 0 {
				return line[:i], nil
			}
			line = line[1:] // a keepalive
		}
		if err != nil {
			return nil, err
		}
	}
}

// haveOf is the api.NetmapHaveParam value of a whole netmap line as the
// server wrote it, from its bytes: the version, and the SHA-256 of what
// follows it up to the end of the peer list (api.NetMap.Digest), without
// decoding megabytes of JSON per agent.
func haveOf(line []byte) (string, error) {
	const head = `{"version":`
	comma := bytes.IndexByte(line, ',')
	if !bytes.HasPrefix(line, []byte(head)) || comma < 0 {
		return "", fmt.Errorf("not a netmap line: %.80q", line)
	}
	version, err := strconv.ParseInt(string(line[len(head):comma]), 10, 64)
	if err != nil {
		return "", fmt.Errorf("netmap version: %w", err)
	}
	// The peer list is followed by the server list, the server name or
	// the end. (A quote inside a JSON string is escaped, so these bytes
	// are structure wherever they occur.)
	end := -1
	for _, next := range []string{`],"servers":`, `],"serverName":`} {
		if end = bytes.LastIndex(line, []byte(next)); end >= 0 {
			break
		}
	}
	if end < 0 {
		if !bytes.HasSuffix(line, []byte("]}")) {
			return "", fmt.Errorf("no peer list in netmap line: %.80q", line)
		}
		end = len(line) - 2
	}
	return api.FormatHave(version, sha256.Sum256(line[comma:end+1])), nil
}

// measureAgentMemory opens a stream as agent a, takes its first netmap and
// measures its size on the wire and in the Go heap once decoded (over
// several decoded copies, to rise above the noise of other goroutines).
func measureAgentMemory(ctx context.Context, a *vagent, res *Result) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	body, err := a.openStream(ctx, false, "")
	if err != nil {
		return err
	}
	defer body.Close()
	line, err := readLine(body)
	if err != nil {
		return fmt.Errorf("read a netmap: %w", err)
	}
	res.MapBytes = int64(len(line) + 1)
	body.Close()
	copies := min(max(1, (64<<20)/len(line)), 2000)
	nms := make([]api.NetMap, copies)
	var before, after runtime.MemStats
	runtime.GC()
	time.Sleep(100 * time.Millisecond) // let closed connections wind down
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range nms {
		if err := json.Unmarshal(line, &nms[i]); err != nil {
			return fmt.Errorf("decode netmap: %w", err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	nm := &nms[0]
	res.Peers = len(nm.Peers)
	for _, p := range nm.Peers {
		if slices.ContainsFunc(p.AllowedIPs, func(a netip.Prefix) bool { return a.Bits() < a.Addr().BitLen() }) {
			res.PodCIDRPeers++
		}
	}
	if res.Peers > 0 {
		res.AgentBytesPerPeer = float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / float64(res.Peers*copies)
		pb, _ := json.Marshal(nm.Peers[len(nm.Peers)/2])
		res.PeerBytes = int64(len(pb) + 1)
	}
	runtime.KeepAlive(nms)
	return nil
}

// maxJoinAttempts bounds the tries of one join.
const maxJoinAttempts = 20

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// parallel runs fn(0..n-1) with at most conc at once and returns the
// first error; after an error or the end of ctx it starts no more.
func parallel(ctx context.Context, n, conc int, fn func(i int) error) error {
	var next atomic.Int64
	var first error
	var once sync.Once
	var wg sync.WaitGroup
	for range min(conc, n) {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := fn(i); err != nil {
					once.Do(func() { first = err })
					next.Store(int64(n))
					return
				}
			}
		})
	}
	wg.Wait()
	if first == nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return first
}

// percentile returns the p-th percentile (nearest rank) of ds.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(float64(len(s))*p/100+0.5) - 1
	return s[min(max(i, 0), len(s)-1)]
}

// sample reads the server's stats, or nothing without a PID.
func sample(pid int) ProcStat {
	if pid == 0 {
		return ProcStat{}
	}
	s, _ := ReadProcStat(pid)
	return s
}

// settleTimeout bounds the wait for the server to become idle.
const settleTimeout = 2 * time.Minute

// waitIdle waits until the server used less than 2 % of a CPU, plus
// 1.5 × base, over one second, at most timeout, and returns the CPU share
// it used in the last second. A server that stays busy is not an error:
// the share it keeps using is then the baseline for later waits. Without
// a PID it waits a moment.
func waitIdle(ctx context.Context, pid int, base float64, timeout time.Duration) (float64, error) {
	const window = time.Second
	if pid == 0 {
		select {
		case <-time.After(window / 5):
			return 0, nil
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	deadline := time.Now().Add(timeout)
	for prev := sample(pid); ; {
		select {
		case <-time.After(window):
		case <-ctx.Done():
			return 0, ctx.Err()
		}
		cur := sample(pid)
		share := float64(cur.CPU-prev.CPU) / float64(window)
		if share < 0.02+1.5*base || time.Now().After(deadline) {
			return share, nil
		}
		prev = cur
	}
}

// peakSampler samples a process's RSS every 50 ms until stopped.
type peakSampler struct {
	peak atomic.Int64
	quit chan struct{}
	done chan struct{}
}

func newPeakSampler(pid int) *peakSampler {
	s := &peakSampler{quit: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		if pid == 0 {
			return
		}
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			s.peak.Store(max(s.peak.Load(), sample(pid).RSS))
			select {
			case <-s.quit:
				return
			case <-t.C:
			}
		}
	}()
	return s
}

// stop ends the sampling and returns the peak.
func (s *peakSampler) stop() int64 {
	close(s.quit)
	<-s.done
	return s.peak.Load()
}

// WriteJSON writes results as indented JSON.
func WriteJSON(w io.Writer, rs []*Result) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(rs)
}
