//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// benchNodes is the cluster size of TestBenchJoin: TRELLIS_BENCH_NODES,
// default 20.
func benchNodes() int {
	if n, err := strconv.Atoi(os.Getenv("TRELLIS_BENCH_NODES")); err == nil && n >= 2 && n <= 60 {
		return n
	}
	return 20
}

// pingReply is a reply line of `ping -D`: "[1700000000.123456] 64 bytes from".
var pingReply = regexp.MustCompile(`(?m)^\[(\d+)\.(\d+)\] \d+ bytes from`)

// firstReply returns the time of the first reply in the output of
// `ping -D`.
func firstReply(out string) (time.Time, bool) {
	m := pingReply.FindStringSubmatch(out)
	if m == nil {
		return time.Time{}, false
	}
	sec, _ := strconv.ParseInt(m[1], 10, 64)
	frac := m[2] + strings.Repeat("0", 9-min(len(m[2]), 9))
	ns, _ := strconv.ParseInt(frac[:9], 10, 64)
	return time.Unix(sec, ns), true
}

// TestBenchJoin starts a cluster of TRELLIS_BENCH_NODES nodes (default
// 20), each in a cloud of its own: the server first, then every agent at
// once. As soon as a node's pod is attached, its pod pings every other
// pod every 20 ms (one `ping -D` per pair); the time from the node's
// process start to the first reply from each peer is its join → first
// packet time. It includes the process start, the join, the WireGuard
// device, the CNI configuration and the harness attaching the pod (also
// listed, as a lower bound of what can be seen).
func TestBenchJoin(t *testing.T) {
	requireBench(t)
	n := benchNodes()
	lab := NewLab(t)
	c := newCluster(t, lab)
	nodes := make([]*Node, n)
	for i := range n {
		// 198.18.0.0/15 (benchmarking) for the clouds' public subnets,
		// 10.(100+i).0.0/24 for their LANs.
		nodes[i] = lab.Cloud(fmt.Sprintf("c%02d", i), fmt.Sprintf("198.18.%d.10/24", 100+i), fmt.Sprintf("10.%d.0.10/24", 100+i))
	}
	members := []*member{c.startServer(nodes[0])}
	clusterStart := time.Now()
	for _, nd := range nodes[1:] {
		members = append(members, c.startAgent(nd))
	}
	lastStart := time.Now()

	type pair struct {
		from, to *member
		proc     *Proc
	}
	var mu sync.Mutex
	var pairs []*pair
	attached := map[string]time.Duration{}
	var wg sync.WaitGroup
	ready := make(chan *member, n)
	for _, m := range members {
		wg.Go(func() {
			c.attachPod(m)
			mu.Lock()
			attached[m.Name] = time.Since(m.proc.StartedAt())
			mu.Unlock()
			ready <- m
		})
	}
	// Start the pings of a member once its pod and the peer's pod exist.
	var done []*member
	for range members {
		m := <-ready
		for _, o := range done {
			for _, pr := range [][2]*member{{m, o}, {o, m}} {
				p := lab.Start(pr[0].pod.NS, "ping", "-D", "-n", "-i", "0.02", "-w", strconv.Itoa(int(joinTimeout.Seconds())), pr[1].pod.IP.String())
				mu.Lock()
				pairs = append(pairs, &pair{from: pr[0], to: pr[1], proc: p})
				mu.Unlock()
			}
		}
		done = append(done, m)
	}
	wg.Wait()

	// Wait until every pair has a reply (bounded by joinTimeout).
	var firsts []time.Duration
	byNode := map[string]time.Duration{} // slowest peer per node
	var allAt time.Time
	err := Poll(joinTimeout, func() error {
		missing := 0
		for _, p := range pairs {
			if _, ok := firstReply(p.proc.Log()); !ok {
				missing++
			}
		}
		if missing > 0 {
			return fmt.Errorf("%d of %d pairs have no reply yet", missing, len(pairs))
		}
		return nil
	})
	for _, p := range pairs {
		_ = p.proc.Stop()
	}
	if err != nil {
		t.Fatalf("pods of %d nodes reaching each other: %v", n, err)
	}
	for _, p := range pairs {
		at, _ := firstReply(p.proc.Log())
		d := at.Sub(p.from.proc.StartedAt())
		firsts = append(firsts, d)
		byNode[p.from.Name] = max(byNode[p.from.Name], d)
		if at.After(allAt) {
			allAt = at
		}
	}
	slices.Sort(firsts)
	pct := func(p float64) time.Duration { return firsts[min(len(firsts)-1, int(float64(len(firsts))*p/100))] }
	var att []time.Duration
	for _, d := range attached {
		att = append(att, d)
	}
	slices.Sort(att)

	var b strings.Builder
	fmt.Fprintf(&b, "%d nodes (1 server + %d agents, each in its own cloud), all agents started at once; %d directed pod pairs.\n\n", n, n-1, len(pairs))
	b.WriteString("| measure | value |\n|---|---:|\n")
	fmt.Fprintf(&b, "| node start → first reply from a peer's pod, p50 | %.2f s |\n", pct(50).Seconds())
	fmt.Fprintf(&b, "| same, p90 | %.2f s |\n", pct(90).Seconds())
	fmt.Fprintf(&b, "| same, max (join → first packet to every peer) | %.2f s |\n", firsts[len(firsts)-1].Seconds())
	fmt.Fprintf(&b, "| node start → its pod attached by the harness, median / max | %.2f s / %.2f s |\n", att[len(att)/2].Seconds(), att[len(att)-1].Seconds())
	fmt.Fprintf(&b, "| first agent start → every pair has replied | %.2f s |\n", allAt.Sub(clusterStart).Seconds())
	fmt.Fprintf(&b, "| (starting the %d agent processes took) | %.2f s |\n", n-1, lastStart.Sub(clusterStart).Seconds())
	b.WriteString("\nPer node, slowest peer (start → first reply):\n\n| node | slowest peer | pod attached |\n|---|---:|---:|\n")
	for _, m := range members {
		fmt.Fprintf(&b, "| %s | %.2f s | %.2f s |\n", m.Name, byNode[m.Name].Seconds(), attached[m.Name].Seconds())
	}
	writeBenchOutput(t, "join.md", b.String())
}
