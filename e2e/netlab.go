//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// nsPrefix starts the name of every namespace the harness creates. The full
// prefix is "tr-<pid>-<lab>-", so that leftovers of a crashed run can be told
// from namespaces of a run still going.
const nsPrefix = "tr-"

// commandTimeout bounds every one-shot command the harness runs.
const commandTimeout = 30 * time.Second

var (
	labSeq         atomic.Int64
	leftoversOnce  sync.Once
	leftoverNameRE = regexp.MustCompile(`^` + nsPrefix + `(\d+)-`)
)

// Lab is a set of network namespaces and processes owned by one test. All of
// it is removed when the test ends, also when it fails.
type Lab struct {
	t      testing.TB
	prefix string // namespace name prefix, "tr-<pid>-<n>-"
	dir    string // scratch directory, removed after the lab

	mu         sync.Mutex
	namespaces []string // in creation order
	procs      []*Proc
	internet   *Router
	segments   map[netip.Prefix]string // public subnet -> bridge in the router namespace
	nodes      map[string]*Node
	pods       int
}

// NewLab returns an empty lab. It skips the test unless it runs as root with
// the tools the harness needs, and removes the namespaces that a crashed
// earlier run left behind.
func NewLab(t testing.TB) *Lab {
	t.Helper()
	RequireRoot(t)
	leftoversOnce.Do(func() { removeLeftovers(t) })

	l := &Lab{
		t:        t,
		prefix:   fmt.Sprintf("%s%d-%d-", nsPrefix, os.Getpid(), labSeq.Add(1)),
		dir:      t.TempDir(), // created before Cleanup below, so removed after it
		segments: map[netip.Prefix]string{},
		nodes:    map[string]*Node{},
	}
	t.Cleanup(l.close)
	return l
}

// RequireRoot skips the test unless it runs as root and the commands the
// harness uses are installed.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("e2e tests need root: they create network namespaces, veth pairs, bridges and nftables rules (run: sudo go test -tags e2e ./e2e/...)")
	}
	for _, tool := range []string{"ip", "nft", "nsenter", "ping", "sh", "env"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("e2e tests need %q on PATH (iproute2, nftables, util-linux, iputils-ping): %v", tool, err)
		}
	}
}

// Prefix is the prefix of the names of this lab's namespaces.
func (l *Lab) Prefix() string { return l.prefix }

// TempDir returns a new directory under the lab's scratch directory. Unlike
// t.TempDir it is removed only after the lab's processes have stopped.
func (l *Lab) TempDir(name string) string {
	l.t.Helper()
	dir, err := os.MkdirTemp(l.dir, name+"-")
	if err != nil {
		l.t.Fatalf("create temp dir: %v", err)
	}
	return dir
}

// Exec runs a command in namespace ns and returns its combined output. The
// error says which command failed and includes the output.
func (l *Lab) Exec(ns string, args ...string) (string, error) {
	return run(append([]string{"ip", "netns", "exec", ns}, args...)...)
}

// MustExec is Exec that fails the test on error.
func (l *Lab) MustExec(ns string, args ...string) string {
	l.t.Helper()
	out, err := l.Exec(ns, args...)
	if err != nil {
		l.t.Fatal(err)
	}
	return out
}

// Output runs a command in namespace ns and returns its standard output;
// the error includes standard error.
func (l *Lab) Output(ns string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), commandTimeout)
	defer cancel()
	argv := append([]string{"ip", "netns", "exec", ns}, args...)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return string(out), nil
}

// run runs a command on the host with commandTimeout.
func run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), commandTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// must runs a host command and fails the test on error.
func (l *Lab) must(args ...string) string {
	l.t.Helper()
	out, err := run(args...)
	if err != nil {
		l.t.Fatal(err)
	}
	return out
}

// sysctl sets a sysctl inside namespace ns.
func (l *Lab) sysctl(ns, key, value string) {
	l.t.Helper()
	l.MustExec(ns, "sysctl", "-qw", key+"="+value)
}

// newNamespace creates namespace prefix+name with lo up.
func (l *Lab) newNamespace(name string) string {
	l.t.Helper()
	ns := l.prefix + name
	l.must("ip", "netns", "add", ns)
	l.mu.Lock()
	l.namespaces = append(l.namespaces, ns)
	l.mu.Unlock()
	l.must("ip", "-n", ns, "link", "set", "lo", "up")
	return ns
}

// veth creates a veth pair with one end named nameA in nsA and the other
// named nameB in nsB, both up.
func (l *Lab) veth(nsA, nameA, nsB, nameB string) {
	l.t.Helper()
	l.must("ip", "-n", nsA, "link", "add", nameA, "type", "veth", "peer", "name", nameB, "netns", nsB)
	l.must("ip", "-n", nsA, "link", "set", nameA, "up")
	l.must("ip", "-n", nsB, "link", "set", nameB, "up")
}

// Router is the "internet": one namespace that forwards between the public
// subnets of all clouds and homes. Each public subnet is a bridge in it
// holding the subnet's first address, so several machines can share one.
type Router struct {
	NS  string
	lab *Lab
}

// Internet returns the lab's internet router, creating it on first use. It
// forwards IPv4 and carries an nftables table "inet e2e" with an empty
// forward chain for counters.
func (l *Lab) Internet() *Router {
	l.t.Helper()
	l.mu.Lock()
	r := l.internet
	l.mu.Unlock()
	if r != nil {
		return r
	}
	r = &Router{NS: l.newNamespace("inet"), lab: l}
	l.sysctl(r.NS, "net.ipv4.ip_forward", "1")
	r.nft(`add table inet e2e
add chain inet e2e forward { type filter hook forward priority 0; policy accept; }`)
	l.mu.Lock()
	l.internet = r
	l.mu.Unlock()
	return r
}

// segment returns the bridge of public subnet p in the router namespace,
// creating it with p's first address.
func (r *Router) segment(p netip.Prefix) string {
	l := r.lab
	l.t.Helper()
	l.mu.Lock()
	br, ok := l.segments[p]
	if !ok {
		br = fmt.Sprintf("pub%d", len(l.segments))
		l.segments[p] = br
	}
	l.mu.Unlock()
	if !ok {
		l.must("ip", "-n", r.NS, "link", "add", br, "type", "bridge")
		l.must("ip", "-n", r.NS, "addr", "add", netip.PrefixFrom(p.Addr().Next(), p.Bits()).String(), "dev", br)
		l.must("ip", "-n", r.NS, "link", "set", br, "up")
	}
	return br
}

// attach connects interface ifname of namespace ns to the internet with
// address cidr, and routes ns's default route through the router.
func (r *Router) attach(ns, ifname, port string, cidr netip.Prefix) {
	l := r.lab
	l.t.Helper()
	br := r.segment(cidr.Masked())
	l.veth(ns, ifname, r.NS, port)
	l.must("ip", "-n", r.NS, "link", "set", port, "master", br)
	l.must("ip", "-n", ns, "addr", "add", cidr.String(), "dev", ifname)
	l.must("ip", "-n", ns, "route", "add", "default", "via", cidr.Masked().Addr().Next().String())
}

// nft feeds an nftables script to nft in the router namespace.
func (r *Router) nft(script string) {
	r.lab.t.Helper()
	cmd := exec.Command("ip", "netns", "exec", r.NS, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		r.lab.t.Fatalf("nft in %s: %v: %s\nscript:\n%s", r.NS, err, out, script)
	}
}

// Counter adds a named nftables counter to the router's forward path that
// counts every forwarded packet matching at least one of matches (nft
// expressions such as "ip saddr 10.42.0.0/16" or "udp dport 51820"). A
// packet that matches several is counted once.
func (r *Router) Counter(name string, matches ...string) {
	r.lab.t.Helper()
	if !regexp.MustCompile(`^[a-z][a-z0-9_]*$`).MatchString(name) {
		r.lab.t.Fatalf("counter name %q: want lower-case letters, digits and _", name)
	}
	// nft objects get a prefix so that names like "icmp" are not keywords.
	var b strings.Builder
	fmt.Fprintf(&b, "add counter inet e2e n_%s\n", name)
	fmt.Fprintf(&b, "add chain inet e2e count_%s\n", name)
	for _, m := range matches {
		fmt.Fprintf(&b, "add rule inet e2e count_%s %s counter name n_%s return\n", name, m, name)
	}
	fmt.Fprintf(&b, "add rule inet e2e forward jump count_%s\n", name)
	r.nft(b.String())
}

// Count returns the packets counted so far by counter name.
func (r *Router) Count(name string) (uint64, error) {
	out, err := r.lab.Exec(r.NS, "nft", "list", "counter", "inet", "e2e", "n_"+name)
	if err != nil {
		return 0, err
	}
	m := regexp.MustCompile(`packets (\d+) bytes`).FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("read counter %s: no packet count in %q", name, out)
	}
	return strconv.ParseUint(m[1], 10, 64)
}

// MustCount is Count that fails the test on error.
func (r *Router) MustCount(name string) uint64 {
	r.lab.t.Helper()
	n, err := r.Count(name)
	if err != nil {
		r.lab.t.Fatal(err)
	}
	return n
}

// LAN is a private layer-2 network: a bridge in a namespace of its own.
// Nothing routes it to other LANs or to the internet, except the NAT router
// of a home.
type LAN struct {
	Name   string
	NS     string
	Prefix netip.Prefix
	// Gateway is the NAT router's address on a home LAN; invalid in a cloud
	// LAN, which has no way out.
	Gateway netip.Addr
	lab     *Lab
	ports   int
}

// LAN creates a private network named name with subnet cidr.
func (l *Lab) LAN(name, cidr string) *LAN {
	l.t.Helper()
	p := mustPrefix(l.t, cidr).Masked()
	lan := &LAN{Name: name, NS: l.newNamespace(name + "-lan"), Prefix: p, lab: l}
	l.must("ip", "-n", lan.NS, "link", "add", "br0", "type", "bridge")
	l.must("ip", "-n", lan.NS, "link", "set", "br0", "up")
	return lan
}

// plug connects interface ifname in namespace ns to the LAN with address
// cidr.
func (lan *LAN) plug(ns, ifname string, cidr netip.Prefix) {
	l := lan.lab
	l.t.Helper()
	if cidr.Masked() != lan.Prefix {
		l.t.Fatalf("address %s is not in LAN %s (%s)", cidr, lan.Name, lan.Prefix)
	}
	lan.ports++
	port := fmt.Sprintf("p%d", lan.ports)
	l.veth(ns, ifname, lan.NS, port)
	l.must("ip", "-n", lan.NS, "link", "set", port, "master", "br0")
	l.must("ip", "-n", ns, "addr", "add", cidr.String(), "dev", ifname)
}

// Node is a machine: a network namespace with IPv4 forwarding on.
type Node struct {
	Name string
	NS   string
	// PublicIP is the address on the node's own interface eth0 to the
	// internet; invalid for a node behind NAT.
	PublicIP netip.Addr
	// NATIP is the public address of the NAT router in front of a node in a
	// home; invalid otherwise.
	NATIP netip.Addr
	// LANIP is the node's address on its LAN.
	LANIP netip.Addr
	LAN   *LAN
	lab   *Lab
}

// Machine creates a node named name (at most 12 characters). With a
// publicCIDR it has eth0 on the internet with that address and its default
// route through the router; it has eth1 on lan with lanCIDR. With no
// publicCIDR its LAN interface is eth0 and its default route goes through
// the LAN's gateway, if any.
func (l *Lab) Machine(name, publicCIDR string, lan *LAN, lanCIDR string) *Node {
	l.t.Helper()
	if len(name) > 12 {
		l.t.Fatalf("node name %q is longer than 12 characters (interface names derive from it)", name)
	}
	l.mu.Lock()
	_, dup := l.nodes[name]
	l.mu.Unlock()
	if dup {
		l.t.Fatalf("node %q exists already", name)
	}
	n := &Node{Name: name, NS: l.newNamespace(name), LAN: lan, lab: l}
	l.sysctl(n.NS, "net.ipv4.ip_forward", "1")
	lanIf := "eth0"
	if publicCIDR != "" {
		pub := mustPrefix(l.t, publicCIDR)
		n.PublicIP = pub.Addr()
		l.Internet().attach(n.NS, "eth0", name, pub)
		lanIf = "eth1"
	}
	if lan != nil {
		lp := mustPrefix(l.t, lanCIDR)
		n.LANIP = lp.Addr()
		lan.plug(n.NS, lanIf, lp)
		if publicCIDR == "" && lan.Gateway.IsValid() {
			l.must("ip", "-n", n.NS, "route", "add", "default", "via", lan.Gateway.String())
		}
	}
	l.mu.Lock()
	l.nodes[name] = n
	l.mu.Unlock()
	return n
}

// Cloud creates a cloud: a LAN named name+"-lan" with one node on it that
// also has public address publicCIDR (e.g. "198.51.100.10/24") on the
// internet, whose router side is the subnet's first address. Further nodes
// join the cloud with l.Machine(name, public, node.LAN, lanCIDR).
func (l *Lab) Cloud(name, publicCIDR, lanCIDR string) *Node {
	l.t.Helper()
	return l.Machine(name, publicCIDR, l.LAN(name, lanCIDR), lanCIDR)
}

// Home creates a home network: a NAT router with public address publicCIDR
// on the internet and the LAN's first address on a LAN, masquerading what
// leaves through it, and one node on the LAN with lanCIDR and its default
// route through the router. Further nodes join with
// l.Machine(name, "", node.LAN, lanCIDR).
func (l *Lab) Home(name, publicCIDR, lanCIDR string) *Node {
	l.t.Helper()
	if len(name) > 11 {
		l.t.Fatalf("home name %q is longer than 11 characters (interface names derive from it)", name)
	}
	pub := mustPrefix(l.t, publicCIDR)
	lan := l.LAN(name, lanCIDR)
	lan.Gateway = lan.Prefix.Addr().Next()
	if mustPrefix(l.t, lanCIDR).Addr() == lan.Gateway {
		l.t.Fatalf("home %s: node address %s is the gateway's address", name, lanCIDR)
	}
	return l.natted("home", name, pub, lan, lanCIDR, `add table ip nat
add chain ip nat postrouting { type nat hook postrouting priority srcnat; policy accept; }
add rule ip nat postrouting oifname "eth0" masquerade
`)
}

// natted puts a NAT router in front of lan: public address pub on the
// internet (eth0), the LAN's gateway on eth1, forwarding on and the
// nftables rules given; then one node with lanCIDR on the LAN, whose
// NATIP is pub. kind names the place in messages.
func (l *Lab) natted(kind, name string, pub netip.Prefix, lan *LAN, lanCIDR, rules string) *Node {
	l.t.Helper()
	nat := l.newNamespace(name + "-nat")
	l.sysctl(nat, "net.ipv4.ip_forward", "1")
	l.Internet().attach(nat, "eth0", name+"-nat", pub)
	lan.plug(nat, "eth1", netip.PrefixFrom(lan.Gateway, lan.Prefix.Bits()))
	cmd := exec.Command("ip", "netns", "exec", nat, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		l.t.Fatalf("%s %s: nft: %v: %s", kind, name, err, out)
	}
	n := l.Machine(name, "", lan, lanCIDR)
	n.NATIP = pub.Addr()
	return n
}

// Exec runs a command in the node's namespace.
func (n *Node) Exec(args ...string) (string, error) { return n.lab.Exec(n.NS, args...) }

// MustExec runs a command in the node's namespace and fails the test on
// error.
func (n *Node) MustExec(args ...string) string {
	n.lab.t.Helper()
	return n.lab.MustExec(n.NS, args...)
}

// Start starts a long-running process in the node's namespace (see
// Lab.Start).
func (n *Node) Start(args ...string) *Proc {
	n.lab.t.Helper()
	return n.lab.Start(n.NS, args...)
}

// Ping sends one ICMP echo from the node's namespace to dst.
func (n *Node) Ping(dst netip.Addr) error { return ping(n.lab, n.NS, dst) }

func ping(l *Lab, ns string, dst netip.Addr) error { return pingWait(l, ns, dst, "1") }

// pingWait sends one ICMP echo from ns to dst and waits wait seconds (ping
// -W; fractions allowed) for the answer.
func pingWait(l *Lab, ns string, dst netip.Addr, wait string) error {
	_, err := l.Exec(ns, "ping", "-n", "-q", "-c", "1", "-W", wait, dst.String())
	return err
}

func mustPrefix(t testing.TB, s string) netip.Prefix {
	t.Helper()
	p, err := netip.ParsePrefix(s)
	if err != nil || !p.Addr().Is4() {
		t.Fatalf("want an IPv4 address with prefix length such as 198.51.100.10/24, got %q (%v)", s, err)
	}
	return p
}

// close stops the lab's processes, reports their logs if the test failed,
// and deletes its namespaces, last created first.
func (l *Lab) close() {
	l.mu.Lock()
	procs := l.procs
	namespaces := l.namespaces
	l.mu.Unlock()
	for i := len(procs) - 1; i >= 0; i-- {
		if err := procs[i].Stop(); err != nil {
			l.t.Logf("clean up: %v", err)
		}
	}
	if l.t.Failed() || os.Getenv("TRELLIS_E2E_KEEP_LOGS") != "" {
		l.reportLogs(procs, l.t.Failed())
	}
	for i := len(namespaces) - 1; i >= 0; i-- {
		if err := deleteNamespace(namespaces[i]); err != nil {
			l.t.Errorf("clean up: %v", err)
		}
	}
}

// deleteNamespace kills what still runs in ns (only processes of this
// harness run there) and deletes it.
func deleteNamespace(ns string) error {
	if out, err := run("ip", "netns", "pids", ns); err == nil {
		for _, f := range strings.Fields(out) {
			if pid, err := strconv.Atoi(f); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	_, err := run("ip", "netns", "del", ns)
	return err
}

// removeLeftovers deletes the namespaces of earlier runs of this harness
// whose process is gone.
func removeLeftovers(t testing.TB) {
	entries, err := os.ReadDir("/run/netns")
	if err != nil {
		return
	}
	for _, e := range entries {
		m := leftoverNameRE.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		pid, _ := strconv.Atoi(m[1])
		if pid == os.Getpid() || alive(pid) {
			continue // ours, or a run that is still going
		}
		if err := deleteNamespace(e.Name()); err != nil {
			t.Logf("remove leftover namespace %s: %v", e.Name(), err)
		} else {
			t.Logf("removed leftover namespace %s of an earlier run", e.Name())
		}
	}
}

// alive reports whether process pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// pid (comm) state ...; comm may contain spaces and parentheses.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}

// Namespaces lists the existing namespaces whose names start with prefix.
func Namespaces(prefix string) []string {
	entries, _ := os.ReadDir("/run/netns")
	var names []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			names = append(names, e.Name())
		}
	}
	return names
}

// artifactsDir is where full logs of failed tests go, relative to the
// package directory (ignored by git).
const artifactsDir = "artifacts"

// reportLogs copies the process logs to artifacts/<test>/ and, if
// printTails, prints the tail of each.
func (l *Lab) reportLogs(procs []*Proc, printTails bool) {
	if len(procs) == 0 {
		return
	}
	dst := filepath.Join(artifactsDir, strings.ReplaceAll(l.t.Name(), "/", "_"))
	_ = os.MkdirAll(dst, 0o755)
	for _, p := range procs {
		data, err := os.ReadFile(p.LogPath)
		if err != nil {
			continue
		}
		if printTails {
			l.t.Logf("---- last lines of %s (%s) ----\n%s", p.Name, p.LogPath, tail(string(data), 40))
		}
		_ = os.WriteFile(filepath.Join(dst, filepath.Base(p.LogPath)), data, 0o644)
	}
	if abs, err := filepath.Abs(dst); err == nil {
		l.t.Logf("full logs in %s", abs)
	}
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
