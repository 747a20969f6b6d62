//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/ipam"
)

// benchNodes is the cluster size of TestBenchJoin: TRELLIS_BENCH_NODES,
// default 20.
func benchNodes() int {
	if n, err := strconv.Atoi(os.Getenv("TRELLIS_BENCH_NODES")); err == nil && n >= 2 && n <= 60 {
		return n
	}
	return 20
}

// logTime returns the time of the first line of a trellis log (slog text
// format) with msg="msg" and node=node.
func logTime(log, msg, node string) (time.Time, bool) {
	re := regexp.MustCompile(`(?m)^time=(\S+) .*msg="` + regexp.QuoteMeta(msg) + `" node=` + regexp.QuoteMeta(node) + `\b`)
	m := re.FindStringSubmatch(log)
	if m == nil {
		return time.Time{}, false
	}
	at, err := time.Parse(time.RFC3339Nano, m[1])
	return at, err == nil
}

// podCIDR4 returns the IPv4 pod CIDR of a CNI configuration list written
// by the agent (the subnet of its host-local IPAM range).
func podCIDR4(conflist string) (netip.Prefix, error) {
	b, err := os.ReadFile(conflist)
	if err != nil {
		return netip.Prefix{}, err
	}
	var list struct {
		Plugins []struct {
			IPAM struct {
				Ranges [][]struct {
					Subnet netip.Prefix `json:"subnet"`
				} `json:"ranges"`
			} `json:"ipam"`
		} `json:"plugins"`
	}
	if err := json.Unmarshal(b, &list); err != nil {
		return netip.Prefix{}, fmt.Errorf("%s: %w", conflist, err)
	}
	for _, p := range list.Plugins {
		for _, set := range p.IPAM.Ranges {
			for _, r := range set {
				if r.Subnet.Addr().Is4() {
					return r.Subnet, nil
				}
			}
		}
	}
	return netip.Prefix{}, fmt.Errorf("%s: no IPv4 subnet in its IPAM ranges", conflist)
}

// benchNode is one node of TestBenchJoin and what was measured of it,
// as durations since its process started.
type benchNode struct {
	m      *member
	tunnel netip.Addr // its address on the WireGuard interface
	// From its log: join answered, WireGuard device up, first peers set.
	joined, wgUp, peers time.Duration
	cni                 time.Duration // CNI configuration written (its mtime)
	cniAt               time.Time     // the same, as a time
	pod                 time.Duration // pod attached by the harness
	resets              int           // handshakes its agent started over
	nodeProbe, podProbe *prober
	toNode, toPod       map[string]time.Duration // first reply from each peer
	nodeAt              map[string]time.Time     // the same, as a time, node to node
}

// TestBenchJoin starts a cluster of TRELLIS_BENCH_NODES nodes (default
// 20), each in a cloud of its own: the server first, then every agent at
// once. It measures, from each node's process start, its join → first
// packet time to every peer, twice:
//
//   - node to node: a prober in each node's namespace pings the tunnel
//     address of every peer every 20 ms as soon as both have written
//     their CNI configuration (joined, data plane up). This is Trellis's
//     own time: process start, join, WireGuard device, netmap, handshake.
//   - pod to pod: a prober in each pod pings every other pod the same way
//     once both are attached. This adds the harness attaching the pod
//     with the CNI plugins (listed too).
//
// Each pair stops at its first reply, so the probes add little load.
// Per-node phases come from the agents' logs.
func TestBenchJoin(t *testing.T) {
	requireBench(t)
	n := benchNodes()
	lab := NewLab(t)
	c := newCluster(t, lab)
	bn := make([]*benchNode, n)
	for i := range n {
		// 198.18.0.0/15 (benchmarking) for the clouds' public subnets,
		// 10.(100+i).0.0/24 for their LANs.
		nd := lab.Cloud(fmt.Sprintf("c%02d", i), fmt.Sprintf("198.18.%d.10/24", 100+i), fmt.Sprintf("10.%d.0.10/24", 100+i))
		bn[i] = &benchNode{nodeProbe: startProber(lab, nd.NS), toNode: map[string]time.Duration{}, toPod: map[string]time.Duration{}, nodeAt: map[string]time.Time{}}
		bn[i].m = &member{Node: nd} // replaced when started
	}
	bn[0].m = c.startServer(bn[0].m.Node)
	clusterStart := time.Now()
	for _, b := range bn[1:] {
		b.m = c.startAgent(b.m.Node)
	}
	lastStart := time.Now()

	var wg sync.WaitGroup
	ready, attached := make(chan *benchNode, n), make(chan *benchNode, n)
	for _, b := range bn {
		wg.Go(func() {
			// Failing ends this goroutine (runtime.Goexit): say so, as nil.
			var isReady, isAttached bool
			defer func() {
				if !isReady {
					ready <- nil
				}
				if !isAttached {
					attached <- nil
				}
			}()
			conflist := c.waitCNIConfig(b.m)
			if fi, err := os.Stat(conflist); err == nil {
				b.cniAt = fi.ModTime()
				b.cni = b.cniAt.Sub(b.m.proc.StartedAt())
			}
			cidr, err := podCIDR4(conflist)
			if err != nil {
				t.Error(err)
				return
			}
			b.tunnel = ipam.TunnelAddr(cidr).Addr()
			ready <- b
			isReady = true
			b.m.pod = b.m.MustAddPod(conflist)
			b.pod = time.Since(b.m.proc.StartedAt())
			attached <- b
			isAttached = true
		})
	}
	// Probe a pair as soon as both ends exist.
	var joined, podded []*benchNode
	for range 2 * n {
		select {
		case b := <-ready:
			if b == nil {
				continue
			}
			for _, o := range joined {
				mustAdd(t, b.nodeProbe, o.tunnel)
				mustAdd(t, o.nodeProbe, b.tunnel)
			}
			joined = append(joined, b)
		case b := <-attached:
			if b == nil {
				continue
			}
			b.podProbe = startProber(lab, b.m.pod.NS)
			for _, o := range podded {
				mustAdd(t, b.podProbe, o.m.pod.IP)
				mustAdd(t, o.podProbe, b.m.pod.IP)
			}
			podded = append(podded, b)
		}
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}

	// Wait until every pair has answered (bounded by joinTimeout).
	var allAt time.Time
	err := Poll(joinTimeout, func() error {
		missing := 0
		for _, b := range bn {
			nodes, pods := b.nodeProbe.replies(), b.podProbe.replies()
			for _, o := range bn {
				if o == b {
					continue
				}
				if at, ok := nodes[o.tunnel]; ok {
					b.toNode[o.m.Name] = at.Sub(b.m.proc.StartedAt())
					b.nodeAt[o.m.Name] = at
				} else {
					missing++
				}
				if at, ok := pods[o.m.pod.IP]; ok {
					b.toPod[o.m.Name] = at.Sub(b.m.proc.StartedAt())
					if at.After(allAt) {
						allAt = at
					}
				} else {
					missing++
				}
			}
		}
		if missing > 0 {
			return fmt.Errorf("%d of %d node and pod pairs have no reply yet", missing, 2*n*(n-1))
		}
		return nil
	})
	for _, b := range bn {
		_ = b.nodeProbe.proc.Stop()
		_ = b.podProbe.proc.Stop()
	}
	if err != nil {
		t.Fatalf("%d nodes reaching each other: %v", n, err)
	}
	for _, b := range bn {
		log, name, start := b.m.proc.Log(), b.m.Name, b.m.proc.StartedAt()
		for msg, d := range map[string]*time.Duration{"joined the cluster": &b.joined, "WireGuard device up": &b.wgUp, "WireGuard peers changed": &b.peers} {
			if at, ok := logTime(log, msg, name); ok {
				*d = at.Sub(start)
			}
		}
		b.resets = strings.Count(log, `msg="WireGuard handshake started over"`)
	}
	writeBenchOutput(t, "join.md", joinReport(bn, allAt.Sub(clusterStart), lastStart.Sub(clusterStart)))
}

func mustAdd(t *testing.T, p *prober, a netip.Addr) {
	if err := p.add(a); err != nil {
		t.Error(err)
	}
}

// joinReport is TestBenchJoin's Markdown.
func joinReport(bn []*benchNode, all, starting time.Duration) string {
	n := len(bn)
	var b strings.Builder
	fmt.Fprintf(&b, "%d nodes (1 server + %d agents, each in its own cloud), all agents started at once; %d directed pairs. "+
		"Times from each node's process start; probes every %v, each pair until its first reply.\n\n", n, n-1, n*(n-1), probeInterval)
	b.WriteString("| measure | p50 | p90 | max |\n|---|---:|---:|---:|\n")
	row := func(what string, ds []time.Duration) {
		slices.Sort(ds)
		pct := func(p int) time.Duration { return ds[min(len(ds)-1, len(ds)*p/100)] }
		fmt.Fprintf(&b, "| %s | %.2f s | %.2f s | %.2f s |\n", what, pct(50).Seconds(), pct(90).Seconds(), ds[len(ds)-1].Seconds())
	}
	per := func(f func(*benchNode) time.Duration) []time.Duration {
		var ds []time.Duration
		for _, x := range bn {
			ds = append(ds, f(x))
		}
		return ds
	}
	pairs := func(f func(*benchNode) map[string]time.Duration) []time.Duration {
		var ds []time.Duration
		for _, x := range bn {
			for _, d := range f(x) {
				ds = append(ds, d)
			}
		}
		return ds
	}
	row("node: join answered", per(func(x *benchNode) time.Duration { return x.joined }))
	row("node: WireGuard device up", per(func(x *benchNode) time.Duration { return x.wgUp }))
	row("node: first WireGuard peers set", per(func(x *benchNode) time.Duration { return x.peers }))
	row("node: CNI configuration written", per(func(x *benchNode) time.Duration { return x.cni }))
	row("**pair: first reply from the peer node (through the tunnel)**", pairs(func(x *benchNode) map[string]time.Duration { return x.toNode }))
	// The mesh's own part: from the moment both ends had joined and set
	// up their data plane (the later CNI configuration) to the reply.
	mesh := func(x *benchNode) map[string]time.Duration {
		out := map[string]time.Duration{}
		for _, o := range bn {
			if at, ok := x.nodeAt[o.m.Name]; ok {
				ready := x.cniAt
				if o.cniAt.After(ready) {
					ready = o.cniAt
				}
				out[o.m.Name] = at.Sub(ready)
			}
		}
		return out
	}
	row("pair: the same, from both nodes' CNI configuration (netmap + handshake)", pairs(mesh))
	row("node: its pod attached by the harness", per(func(x *benchNode) time.Duration { return x.pod }))
	row("pair: first reply from the peer's pod", pairs(func(x *benchNode) map[string]time.Duration { return x.toPod }))

	var slow []string
	resets := 0
	for _, x := range bn {
		resets += x.resets
		m := mesh(x)
		for _, o := range bn {
			if d, ok := m[o.m.Name]; ok && d >= time.Second {
				slow = append(slow, fmt.Sprintf("%s→%s %.1f s", x.m.Name, o.m.Name, d.Seconds()))
			}
		}
	}
	b.WriteString("\n| | |\n|---|---:|\n")
	fmt.Fprintf(&b, "| first agent start → every pod pair has replied | %.2f s |\n", all.Seconds())
	fmt.Fprintf(&b, "| starting the %d agent processes took | %.2f s |\n", n-1, starting.Seconds())
	fmt.Fprintf(&b, "| WireGuard handshakes started over by the agents (first attempt per peer) | %d |\n", resets)
	fmt.Fprintf(&b, "| node pairs whose first reply came 1 s or more after both were ready | %d %s |\n", len(slow), strings.Join(slow, ", "))

	b.WriteString("\nPer node (seconds from its process start):\n\n" +
		"| node | joined | WireGuard up | first peers | CNI config | slowest peer node | pod attached | slowest peer pod | restarts |\n" +
		"|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, x := range bn {
		slowest := func(m map[string]time.Duration) time.Duration {
			var d time.Duration
			for _, v := range m {
				d = max(d, v)
			}
			return d
		}
		fmt.Fprintf(&b, "| %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %d |\n", x.m.Name,
			x.joined.Seconds(), x.wgUp.Seconds(), x.peers.Seconds(), x.cni.Seconds(),
			slowest(x.toNode).Seconds(), x.pod.Seconds(), slowest(x.toPod).Seconds(), x.resets)
	}
	return b.String()
}
