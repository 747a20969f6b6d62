//go:build e2e

package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Benchmarks run in the e2e harness only when TRELLIS_BENCH=1 (`make
// bench`): they take minutes and measure, they do not check. With
// TRELLIS_BENCH_OUT=DIR each writes its tables to DIR as Markdown.

// requireBench skips t unless benchmarks were asked for.
func requireBench(t *testing.T) {
	t.Helper()
	if os.Getenv("TRELLIS_BENCH") != "1" {
		t.Skip("a benchmark: run with TRELLIS_BENCH=1 (make bench)")
	}
}

// benchSeconds is the length of one iperf3 run: TRELLIS_BENCH_SECONDS,
// default 10.
func benchSeconds() int {
	if n, err := strconv.Atoi(os.Getenv("TRELLIS_BENCH_SECONDS")); err == nil && n > 0 && n <= 60 {
		return n
	}
	return 10
}

// benchRounds is how many times each data-plane path is measured
// (TRELLIS_BENCH_ROUNDS, default 5): the table reports medians.
func benchRounds() int {
	if n, err := strconv.Atoi(os.Getenv("TRELLIS_BENCH_ROUNDS")); err == nil && n > 0 && n <= 20 {
		return n
	}
	return 5
}

// writeBenchOutput writes a benchmark's Markdown to $TRELLIS_BENCH_OUT/name
// if that is set, and logs it.
func writeBenchOutput(t *testing.T, name, md string) {
	t.Helper()
	t.Logf("%s:\n%s", name, md)
	dir := os.Getenv("TRELLIS_BENCH_OUT")
	if dir == "" {
		return
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name), []byte(md), 0o644); err != nil {
		t.Fatal(err)
	}
}

// requireTools skips t unless the programs are installed.
func requireTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("benchmark needs %q on PATH: %v", tool, err)
		}
	}
}

// iperf3Received matches the received bytes and rate of the whole test in
// iperf3 -J output ("sum_received": {... "bytes": N, ... "bits_per_second": X ...}).
var iperf3Received = regexp.MustCompile(`"sum_received":\s*\{[^}]*"bytes":\s*([0-9.e+]+)[^}]*"bits_per_second":\s*([0-9.e+]+)`)

// iperf3 runs an iperf3 TCP test from namespace ns to dst (where an
// iperf3 server runs) with streams parallel streams, and returns the
// received rate in Gbit/s and the bytes received.
func iperf3(l *Lab, ns, dst string, streams, seconds int) (gbps, bytes float64, err error) {
	var out string
	// The server may take a moment to listen.
	err = Poll(10*time.Second, func() error {
		var err error
		out, err = l.Output(ns, "iperf3", "-c", dst, "-t", strconv.Itoa(seconds), "-P", strconv.Itoa(streams), "-J")
		if err != nil && strings.Contains(out+err.Error(), "onnection refused") {
			return err
		}
		if err != nil {
			return Permanent(err)
		}
		return nil
	})
	if err != nil {
		return 0, 0, fmt.Errorf("iperf3 -c %s -P %d in %s: %w", dst, streams, ns, err)
	}
	m := iperf3Received.FindStringSubmatch(out)
	if m == nil {
		return 0, 0, fmt.Errorf("iperf3 -c %s: no sum_received in its output: %.300s", dst, out)
	}
	if bytes, err = strconv.ParseFloat(m[1], 64); err != nil {
		return 0, 0, err
	}
	bps, err := strconv.ParseFloat(m[2], 64)
	return bps / 1e9, bytes, err
}

// cpuSeconds is the CPU time (user + system) the processes have used so
// far, from /proc/PID/stat.
func cpuSeconds(procs []*Proc) (float64, error) {
	var ticks float64
	for _, p := range procs {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.Pid()))
		if err != nil {
			return 0, err
		}
		// The command name (field 2) may hold spaces; count from after it.
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		if len(f) < 13 {
			return 0, fmt.Errorf("/proc/%d/stat: %d fields after the name", p.Pid(), len(f))
		}
		for _, v := range f[11:13] { // utime, stime (fields 14 and 15)
			n, err := strconv.ParseFloat(v, 64)
			if err != nil {
				return 0, fmt.Errorf("/proc/%d/stat: %w", p.Pid(), err)
			}
			ticks += n
		}
	}
	return ticks / clockTicks, nil
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat times: 100 on every
// Linux architecture Trellis builds for.
const clockTicks = 100

var pingRTT = regexp.MustCompile(`= ([0-9.]+)/([0-9.]+)/([0-9.]+)/([0-9.]+) ms`)

// pingAvg sends 200 pings 5 ms apart from ns to dst and returns the mean
// round-trip time in milliseconds.
func pingAvg(l *Lab, ns, dst string) (float64, error) {
	out, err := l.Output(ns, "ping", "-n", "-q", "-c", "200", "-i", "0.005", dst)
	if err != nil {
		return 0, err
	}
	m := pingRTT.FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("ping %s: no rtt line in %q", dst, out)
	}
	return strconv.ParseFloat(m[2], 64)
}

// offloads lists the offload features ethtool reports on for iface in the
// process's namespace (or why it cannot tell), and whether the TUN device
// was opened with IFF_VNET_HDR (`ip -d link`), which wireguard-go does
// only when it uses TSO/GSO and GRO.
func offloads(l *Lab, ns, iface string) string {
	var on []string
	if out, err := l.Output(ns, "ethtool", "-k", iface); err == nil {
		for _, f := range []string{"tcp-segmentation-offload", "tx-tcp-segmentation", "tx-tcp6-segmentation", "tx-udp-segmentation", "generic-segmentation-offload", "generic-receive-offload", "rx-gro-list", "rx-udp-gro-forwarding", "tx-checksumming"} {
			if regexp.MustCompile(`(?m)^\s*` + f + `: on`).MatchString(out) {
				on = append(on, f)
			}
		}
	} else {
		on = append(on, "ethtool: "+err.Error())
	}
	if out, err := l.Output(ns, "ip", "-d", "link", "show", iface); err == nil {
		if m := regexp.MustCompile(`vnet_hdr (on|off)`).FindStringSubmatch(out); m != nil {
			on = append(on, "vnet_hdr "+m[1])
		}
	}
	if len(on) == 0 {
		return "none"
	}
	return strings.Join(on, ", ")
}

// wireguardGo builds the wireguard-go daemon from the module version in
// go.mod (the one Trellis embeds).
func wireguardGo(t *testing.T) string {
	t.Helper()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "wireguard-go")
	cmd := exec.Command("go", "build", "-o", bin, "golang.zx2c4.com/wireguard")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build golang.zx2c4.com/wireguard: %v\n%s", err, out)
	}
	out, _ := exec.Command("go", "list", "-m", "-f", "{{.Version}}", "golang.zx2c4.com/wireguard").Output()
	t.Logf("reference daemon: wireguard-go %s", strings.TrimSpace(string(out)))
	return bin
}

// wgKeys returns a new private key and its public key from wg.
func wgKeys(t *testing.T) (string, string) {
	t.Helper()
	priv, err := exec.Command("wg", "genkey").Output()
	if err != nil {
		t.Fatalf("wg genkey: %v", err)
	}
	cmd := exec.Command("wg", "pubkey")
	cmd.Stdin = strings.NewReader(string(priv))
	pub, err := cmd.Output()
	if err != nil {
		t.Fatalf("wg pubkey: %v", err)
	}
	return strings.TrimSpace(string(priv)), strings.TrimSpace(string(pub))
}

// dpRow is one path of the data-plane table.
type dpRow struct {
	path            string
	one, four       float64 // Gbit/s
	cpuOne, cpuFour float64 // CPU seconds per GB of the WireGuard processes on both sides
	ping            float64 // ms
	offloads        string
	description     string
}

// TestBenchDataPlane measures TCP throughput (iperf3, 1 and 4 streams) and
// ping latency between two namespaces joined by one veth: (a) over the
// veth itself, (b) node to node over the reference wireguard-go daemon
// configured with wg, (b') pod to pod over the daemon (pods on a plain
// bridge on each side, routed into the daemon's interface: the hops
// Trellis's pods take), (c) pod to pod over Trellis (server on one side,
// agent on the other, pods on the CNI bridge), and (c') node to node over
// Trellis's WireGuard interface. Same run, same machine. Besides Gbit/s it
// records the CPU time the WireGuard processes (daemon or trellis, both
// sides) spend per GB received: on a CPU-bound machine that is the cost
// that decides throughput, and it is steadier than Gbit/s.
func TestBenchDataPlane(t *testing.T) {
	requireBench(t)
	requireTools(t, "iperf3", "wg")
	lab := NewLab(t)
	secs := benchSeconds()
	wgGo := wireguardGo(t)

	// Two machines with one veth between them.
	nsA, nsB := lab.newNamespace("dpa"), lab.newNamespace("dpb")
	lab.veth(nsA, "eth0", nsB, "eth0")
	ipA, ipB := "198.18.0.1", "198.18.0.2"
	lab.must("ip", "-n", nsA, "addr", "add", ipA+"/24", "dev", "eth0")
	lab.must("ip", "-n", nsB, "addr", "add", ipB+"/24", "dev", "eth0")
	for _, ns := range []string{nsA, nsB} {
		lab.sysctl(ns, "net.ipv4.ip_forward", "1")
	}
	// A path is measured once per round; the paths take turns in a
	// different order each round, so that drift on a shared machine
	// (other processes, CPU frequency) does not favour one of them.
	type dpPath struct {
		path, desc, fromNS, toNS, dst, offl string
		procs                               []*Proc // the WireGuard processes, for CPU per GB
	}
	var paths []dpPath
	measure := func(p dpPath) dpRow {
		t.Helper()
		srv := lab.Start(p.toNS, "iperf3", "-s")
		r := dpRow{path: p.path, description: p.desc, offloads: p.offl}
		var err error
		if r.ping, err = pingAvg(lab, p.fromNS, p.dst); err != nil {
			t.Fatalf("%s: %v", p.path, err)
		}
		run := func(streams int) (gbps, cpuPerGB float64) {
			t.Helper()
			before, err := cpuSeconds(p.procs)
			if err != nil {
				t.Fatalf("%s: %v", p.path, err)
			}
			gbps, bytes, err := iperf3(lab, p.fromNS, p.dst, streams, secs)
			if err != nil {
				t.Fatalf("%s: %v", p.path, err)
			}
			after, err := cpuSeconds(p.procs)
			if err != nil {
				t.Fatalf("%s: %v", p.path, err)
			}
			return gbps, (after - before) / (bytes / 1e9)
		}
		r.one, r.cpuOne = run(1)
		r.four, r.cpuFour = run(4)
		if err := srv.Stop(); err != nil {
			t.Logf("stop iperf3: %v", err)
		}
		t.Logf("%s: 1 stream %.2f Gbit/s (%.2f CPU s/GB), 4 streams %.2f Gbit/s (%.2f CPU s/GB), ping %.3f ms; offloads: %s", p.path, r.one, r.cpuOne, r.four, r.cpuFour, r.ping, p.offl)
		return r
	}

	// (a) The underlay.
	paths = append(paths, dpPath{path: "(a) raw veth", desc: "namespace to namespace over the veth", fromNS: nsA, toNS: nsB, dst: ipB})

	// (b) The reference daemon, 10.99.0.0/24 inside, UDP 51900 outside.
	privA, pubA := wgKeys(t)
	privB, pubB := wgKeys(t)
	refA := lab.Start(nsA, "env", "LOG_LEVEL=error", wgGo, "-f", "wgref")
	refB := lab.Start(nsB, "env", "LOG_LEVEL=error", wgGo, "-f", "wgref")
	setup := func(p *Proc, priv, peerPub, peerIP, addr, peerAddr, peerPods string) {
		t.Helper()
		keyFile := filepath.Join(lab.TempDir("wgkey"), "key")
		if err := os.WriteFile(keyFile, []byte(priv+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		WaitFor(t, defaultTimeout, "wireguard-go's UAPI socket in "+p.NS, func() error {
			if err := p.Err(); err != nil {
				return err
			}
			_, err := p.Nsenter("wg", "show", "wgref")
			return err
		})
		for _, args := range [][]string{
			{"wg", "set", "wgref", "private-key", keyFile, "listen-port", "51900",
				"peer", peerPub, "endpoint", peerIP + ":51900", "allowed-ips", peerAddr + "/32," + peerPods},
			{"ip", "addr", "add", addr + "/24", "dev", "wgref"},
			{"ip", "link", "set", "wgref", "mtu", "1420", "up"},
			{"ip", "route", "add", peerPods, "dev", "wgref"},
		} {
			if out, err := p.Nsenter(args...); err != nil {
				t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
			}
		}
	}
	setup(refA, privA, pubB, ipB, "10.99.0.1", "10.99.0.2", "10.98.2.0/24")
	setup(refB, privB, pubA, ipA, "10.99.0.2", "10.99.0.1", "10.98.1.0/24")
	// (b') a pod on each side behind a bridge, as Trellis's CNI plugs
	// them: pod eth0 → veth → bridge → routed into wgref (MTU 1420).
	refPod := func(node, name string, subnet int) string {
		t.Helper()
		pod := lab.newNamespace(name)
		br := fmt.Sprintf("10.98.%d.1", subnet)
		lab.must("ip", "-n", node, "link", "add", "refbr0", "mtu", "1420", "type", "bridge")
		lab.must("ip", "-n", node, "addr", "add", br+"/24", "dev", "refbr0")
		lab.must("ip", "-n", node, "link", "set", "refbr0", "up")
		lab.veth(node, "refpod0", pod, "eth0")
		lab.must("ip", "-n", node, "link", "set", "refpod0", "mtu", "1420", "master", "refbr0")
		lab.must("ip", "-n", pod, "link", "set", "eth0", "mtu", "1420")
		lab.must("ip", "-n", pod, "addr", "add", fmt.Sprintf("10.98.%d.2/24", subnet), "dev", "eth0")
		lab.must("ip", "-n", pod, "route", "add", "default", "via", br)
		return pod
	}
	refPodA, refPodB := refPod(nsA, "dpa-rpod", 1), refPod(nsB, "dpb-rpod", 2)
	refOffl := offloads(lab, nsA, "wgref")
	refProcs := []*Proc{refA, refB}
	paths = append(paths,
		dpPath{path: "(b) wireguard-go daemon, node to node", desc: "wireguard-go + wg, namespace to namespace", fromNS: nsA, toNS: nsB, dst: "10.99.0.2", offl: refOffl, procs: refProcs},
		dpPath{path: "(b') wireguard-go daemon, pod to pod", desc: "pod → bridge → wgref → veth → wgref → bridge → pod", fromNS: refPodA, toNS: refPodB, dst: "10.98.2.2", offl: refOffl, procs: refProcs})
	// The daemon stays up (idle while the others are measured): its
	// interface, port and addresses do not overlap Trellis's.

	// (c) Trellis: the server (with its own node) on A, an agent on B.
	c := newCluster(t, lab)
	nodeA := &Node{Name: "dpa", NS: nsA, PublicIP: mustAddr(t, ipA), LANIP: mustAddr(t, ipA), lab: lab}
	nodeB := &Node{Name: "dpb", NS: nsB, PublicIP: mustAddr(t, ipB), LANIP: mustAddr(t, ipB), lab: lab}
	srv := c.startServer(nodeA)
	agent := c.startAgent(nodeB)
	c.attachPod(srv)
	c.attachPod(agent)
	WaitFor(t, joinTimeout, "the pods to reach each other", func() error {
		if err := srv.pod.Ping(agent.pod.IP); err != nil {
			return err
		}
		return agent.pod.Ping(srv.pod.IP)
	})
	nodes := c.waitNodes(srv, agent)
	trOffl := offloads(lab, nsA, wgIface)
	// The agent's node holds the first address of its pod CIDR.
	bWG := nodes[agent.Name].PodCIDRs[0].Addr().Next().String()
	trProcs := []*Proc{srv.proc, agent.proc}
	paths = append(paths,
		dpPath{path: "(c) Trellis, pod to pod", desc: "pod → cni0 → trellis-wg → veth → trellis-wg → cni0 → pod", fromNS: srv.pod.NS, toNS: agent.pod.NS, dst: agent.pod.IP.String(), offl: trOffl, procs: trProcs},
		dpPath{path: "(c') Trellis, node to node", desc: "namespace to namespace over trellis-wg", fromNS: nsA, toNS: nsB, dst: bWG, offl: trOffl, procs: trProcs})

	rounds := benchRounds()
	samples := make([][]dpRow, len(paths))
	for r := range rounds {
		for k := range paths {
			i := (k + r) % len(paths)
			samples[i] = append(samples[i], measure(paths[i]))
		}
	}
	rows := make([]dpRow, len(paths))
	spread := make([]string, len(paths))
	for i, ss := range samples {
		rows[i] = dpRow{path: paths[i].path, description: paths[i].desc, offloads: paths[i].offl,
			one:     median(ss, func(r dpRow) float64 { return r.one }),
			four:    median(ss, func(r dpRow) float64 { return r.four }),
			cpuOne:  median(ss, func(r dpRow) float64 { return r.cpuOne }),
			cpuFour: median(ss, func(r dpRow) float64 { return r.cpuFour }),
			ping:    median(ss, func(r dpRow) float64 { return r.ping }),
		}
		var runs []string
		for _, r := range ss {
			runs = append(runs, fmt.Sprintf("%.2f/%.2f", r.one, r.four))
		}
		spread[i] = strings.Join(runs, ", ")
	}
	raw, ref, refPods, pod, node := rows[0], rows[1], rows[2], rows[3], rows[4]
	for _, p := range []*Proc{refA, refB} {
		if err := p.Stop(); err != nil {
			t.Logf("stop wireguard-go: %v", err)
		}
	}

	var b strings.Builder
	fmt.Fprintf(&b, "iperf3 %d s per run, TCP; ping: 200 × 5 ms, idle link. %d rounds, the paths in turn (a different order each round); medians, then every round's 1-stream/4-stream Gbit/s.\n\n", secs, rounds)
	b.WriteString("| path | 1 stream Gbit/s | 4 streams Gbit/s | WireGuard CPU s/GB (1/4 streams) | ping avg ms | rounds (1/4 streams) | TUN offloads on |\n|---|---:|---:|---:|---:|---|---|\n")
	for i, r := range rows {
		offl, cpu := r.offloads, "n/a"
		if offl == "" {
			offl = "n/a"
		}
		if paths[i].procs != nil {
			cpu = fmt.Sprintf("%.2f / %.2f", r.cpuOne, r.cpuFour)
		}
		fmt.Fprintf(&b, "| %s | %.2f | %.2f | %s | %.3f | %s | %s |\n", r.path, r.one, r.four, cpu, r.ping, spread[i], offl)
	}
	label := func(r dpRow) string { return r.path[:strings.Index(r.path, ")")+1] }
	b.WriteString("\n| ratio | 1 stream | 4 streams | added latency |\n|---|---:|---:|---:|\n")
	for _, r := range []dpRow{ref, refPods, pod, node} {
		fmt.Fprintf(&b, "| %s / (a) | %.2f | %.2f | +%.3f ms vs (a) |\n", label(r), r.one/raw.one, r.four/raw.four, r.ping-raw.ping)
	}
	// Like with like: Trellis pod to pod against the daemon pod to pod,
	// node to node against node to node.
	for _, c := range [][2]dpRow{{pod, refPods}, {node, ref}} {
		fmt.Fprintf(&b, "| %s / %s | %.2f | %.2f | %+.3f ms vs %s |\n", label(c[0]), label(c[1]), c[0].one/c[1].one, c[0].four/c[1].four, c[0].ping-c[1].ping, label(c[1]))
	}
	fmt.Fprintf(&b, "| %s / (b) | %.2f | %.2f | %+.3f ms vs (b) |\n", label(pod), pod.one/ref.one, pod.four/ref.four, pod.ping-ref.ping)
	b.WriteString("\n| WireGuard CPU per GB, Trellis / daemon | 1 stream | 4 streams |\n|---|---:|---:|\n")
	for _, c := range [][2]dpRow{{pod, refPods}, {node, ref}} {
		fmt.Fprintf(&b, "| %s / %s | %.2f | %.2f |\n", label(c[0]), label(c[1]), c[0].cpuOne/c[1].cpuOne, c[0].cpuFour/c[1].cpuFour)
	}
	writeBenchOutput(t, "dataplane.md", b.String())
}

// median returns the median of f over rows.
func median(rows []dpRow, f func(dpRow) float64) float64 {
	vs := make([]float64, len(rows))
	for i, r := range rows {
		vs[i] = f(r)
	}
	slices.Sort(vs)
	if n := len(vs); n%2 == 0 {
		return (vs[n/2-1] + vs[n/2]) / 2
	}
	return vs[len(vs)/2]
}

func mustAddr(t *testing.T, s string) netip.Addr {
	t.Helper()
	return mustPrefix(t, s+"/32").Addr()
}
