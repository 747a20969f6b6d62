//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
)

// The cluster builder: the one way the tests start trellis servers and
// agents (see doc.go for how a test uses it).

// Constants of the CLI contract the tests run against.
const (
	clusterCIDR  = "10.42.0.0/16"
	clusterCIDR6 = "fd00:42::/56"
	dualCIDRs    = clusterCIDR + "," + clusterCIDR6
	wgIface      = "trellis-wg"
	conflistName = "10-trellis.conflist"
	serverSecret = "e2e-secret"
	// serverPort is the HTTPS port of every server: the builder passes it
	// with --https-listen-port and dials it.
	serverPort = 6443

	// joinTimeout bounds a node's join and the first configuration of its
	// data plane.
	joinTimeout = 60 * time.Second
	// meshTimeout bounds the time until packets pass between two pods once
	// both nodes have joined.
	meshTimeout = 30 * time.Second
)

// seedServerFlags are the data-plane flags of the seed page's servers,
// which every server gets unless withServerFlags says otherwise.
var seedServerFlags = []string{"--flannel-backend=wireguard-native", "--flannel-external-ip"}

// cluster is a Trellis cluster in a lab: servers and agents, each a member
// with its own data and CNI configuration directories and, once attached,
// a pod. It knows the trellis binary, the join token and the admin
// configuration, and runs the trellis CLI on a server's machine.
type cluster struct {
	t        *testing.T
	lab      *Lab
	bin      string
	defaults []option   // applied to every start, before the start's own
	dual     bool       // the cluster CIDR has an IPv6 range: pods get both families
	server   *member    // the server the agents join and the CLI runs on
	token    string     // the server's full join token
	mu       sync.Mutex // guards members and the members' pod6
	members  []*member
	timings  []string // for the summary: time from start to first packets
}

// member is one trellis process on a node.
type member struct {
	*Node
	role    string // api.RoleServer or api.RoleAgent
	proc    *Proc
	dataDir string
	cniDir  string
	pod     *Pod
	pod6    netip.Addr // the pod's IPv6 address in a dual-stack cluster
}

// newCluster returns a cluster with no member yet. opts apply to every
// start of a member (withClusterCIDR, withServerFlags, overTailnet,
// beforeStart...), before the options of the start itself.
func newCluster(t *testing.T, lab *Lab, opts ...option) *cluster {
	c := &cluster{t: t, lab: lab, bin: trellisBinary(t), defaults: opts}
	c.dual = strings.Contains(c.config(nil).cidr, ":")
	// Registered after the lab's clean-up, so it runs first, while the
	// processes still run.
	t.Cleanup(func() {
		if t.Failed() {
			c.diagnose()
		}
	})
	return c
}

// option is a setting of a trellis start; given to newCluster it applies
// to every start in the cluster.
type option func(*startConfig)

// startConfig is what an option sets. The builder turns it into the
// command line (see command).
type startConfig struct {
	cidr        string   // servers: --cluster-cidr
	serverFlags []string // servers: the data-plane flags (default seedServerFlags)
	addrs       []string // --node-ip/--node-external-ip flags, when addrsSet
	addrsSet    bool
	via         *member // agents: the server to join; servers: the server whose datastore to join
	clusterInit bool    // servers: --cluster-init
	ipv6        bool    // agents: join the server at its public IPv6 address
	url         string  // agents: the server URL, instead of one the builder picks
	env         []string
	bin         string   // the trellis binary, when not the cluster's
	flags       []string // appended to the command line
	own         []string // the whole command line after the role, when set
	noWait      bool     // servers: do not wait for the join token
	hooks       []startHook
}

// A startHook runs before each trellis process of a member starts, after
// the options: it may change the start's configuration (flags, env) and
// start processes of its own on m's node with m.Start (they are the lab's:
// logged, and stopped when the test ends). overTailnet is one; a
// Kubernetes variant would start kube-apiserver on each server's node and
// add --kubeconfig.
type startHook func(m *member, cfg *startConfig)

// withClusterCIDR sets the servers' --cluster-cidr (default clusterCIDR).
// Given to newCluster with an IPv6 range, it makes the cluster dual-stack:
// attachPod records each pod's IPv6 address, and checkPods and
// firstPackets use both families.
func withClusterCIDR(cidrs string) option { return func(s *startConfig) { s.cidr = cidrs } }

// withServerFlags replaces the data-plane flags servers get after the
// harness's own (default seedServerFlags).
func withServerFlags(flags ...string) option {
	return func(s *startConfig) { s.serverFlags = flags }
}

// dualStack is the configuration of the dual-stack tests: both cluster
// CIDRs, and servers without --flannel-external-ip.
func dualStack() option {
	return func(s *startConfig) {
		s.cidr = dualCIDRs
		s.serverFlags = []string{"--flannel-backend=wireguard-native"}
	}
}

// withAddressFlags replaces the address flags the builder derives from the
// node (--node-ip of its LAN address and --node-external-ip of its public
// one, each if it has one). With no flags the node finds its addresses.
func withAddressFlags(flags ...string) option {
	return func(s *startConfig) { s.addrs, s.addrsSet = flags, true }
}

// via makes an agent join through server s instead of the cluster's
// server, and a server join the datastore (embedded etcd) of server s with
// the cluster's token.
func via(s *member) option { return func(c *startConfig) { c.via = s } }

// withClusterInit starts a server that creates an embedded etcd cluster
// (--cluster-init) that other servers join with via.
func withClusterInit() option { return func(s *startConfig) { s.clusterInit = true } }

// overIPv6 makes an agent join its server at the server's public IPv6
// address.
func overIPv6() option { return func(s *startConfig) { s.ipv6 = true } }

// withServerURL makes an agent join the server at url.
func withServerURL(url string) option { return func(s *startConfig) { s.url = url } }

// asRelay makes an agent relay traffic between nodes that cannot reach
// each other (--relay).
func asRelay() option { return withFlags("--relay") }

// withMetrics serves the process's metrics at addr (--metrics-address).
func withMetrics(addr string) option { return withFlags("--metrics-address", addr) }

// withVPNAuth joins the node to a VPN instead of the WireGuard data plane
// (--vpn-auth=value).
func withVPNAuth(value string) option { return withFlags("--vpn-auth=" + value) }

// withBinary runs the member's processes from bin instead of the
// cluster's trellis (e.g. fakeClockBinary's).
func withBinary(bin string) option { return func(s *startConfig) { s.bin = bin } }

// withEnv sets environment variables (VAR=value) of the process.
func withEnv(vars ...string) option {
	return func(s *startConfig) { s.env = append(s.env, vars...) }
}

// withFlags appends flags to the command line.
func withFlags(flags ...string) option {
	return func(s *startConfig) { s.flags = append(s.flags, flags...) }
}

// flagsOnly makes the command line `trellis ROLE flags...` (plus
// --log-level, see logArgs): the test gives everything itself, for
// example --config FILE.
func flagsOnly(flags ...string) option {
	return func(s *startConfig) { s.own = append([]string{}, flags...) }
}

// noWait starts a server without waiting for its join token (it is
// expected to fail).
func noWait() option { return func(s *startConfig) { s.noWait = true } }

// beforeStart adds a hook that runs before each start.
func beforeStart(h startHook) option {
	return func(s *startConfig) { s.hooks = append(s.hooks, h) }
}

// overTailnet runs members on tn's nodes with tn as their data plane: each
// member's node must run tailscaled (tn.Start), whose `tailscale` command
// comes first on the member's PATH; no address flags (the node IP is the
// Tailscale IP), no data-plane flags on servers, and
// --vpn-route-approval-timeout tsApprovalFor.
func overTailnet(tn *Tailnet) option {
	return beforeStart(func(m *member, s *startConfig) {
		ts := tn.node(m.Node)
		if ts == nil {
			m.lab.t.Fatalf("%s does not run tailscaled of the tailnet: start it with Tailnet.Start", m.Name)
		}
		s.env = append([]string{"PATH=" + ts.PathDir + ":" + os.Getenv("PATH")}, s.env...)
		s.addrs, s.addrsSet = nil, true
		s.serverFlags = nil
		s.flags = append(s.flags, "--vpn-route-approval-timeout", tsApprovalFor)
	})
}

// config is the configuration of a start of m: the defaults, the cluster's
// options, then opts, then the hooks (which run only when m is not nil).
func (c *cluster) config(m *member, opts ...option) *startConfig {
	s := &startConfig{cidr: clusterCIDR, serverFlags: seedServerFlags}
	for _, o := range c.defaults {
		o(s)
	}
	for _, o := range opts {
		o(s)
	}
	// Hooks append to copies, never to an option's slice.
	s.serverFlags, s.addrs = slices.Clip(s.serverFlags), slices.Clip(s.addrs)
	if m != nil {
		for _, h := range s.hooks {
			h(m, s)
		}
	}
	return s
}

// newMember adds a member on n with fresh data and CNI configuration
// directories, without starting it (see start).
func (c *cluster) newMember(n *Node, role string) *member {
	m := &member{Node: n, role: role, dataDir: c.lab.TempDir(n.Name + "-data"), cniDir: c.lab.TempDir(n.Name + "-cni")}
	c.mu.Lock()
	c.members = append(c.members, m)
	c.mu.Unlock()
	return m
}

// startServer starts a server on n and waits for its join token. The
// cluster's first server is the one agents join and the CLI runs on.
func (c *cluster) startServer(n *Node, opts ...option) *member {
	c.t.Helper()
	m := c.newMember(n, api.RoleServer)
	c.start(m, opts...)
	return m
}

// startAgent starts an agent on n that joins the cluster's server.
func (c *cluster) startAgent(n *Node, opts ...option) *member {
	c.t.Helper()
	m := c.newMember(n, api.RoleAgent)
	c.start(m, opts...)
	return m
}

// start starts m's trellis process with opts, on m's data and CNI
// directories; m.proc becomes the new process. A server's start waits for
// its join token unless noWait. Proc.Restart restarts with the same
// command line; start after Proc.Stop gives a new one.
func (c *cluster) start(m *member, opts ...option) {
	c.t.Helper()
	s := c.config(m, opts...)
	m.proc = m.Start(c.command(m, s)...)
	if m.role != api.RoleServer {
		return
	}
	if c.server == nil {
		c.server = m
	}
	if !s.noWait {
		c.waitToken(m)
	}
}

// command is m's command line for a start with s:
//
//	[env VARS...] trellis agent --server URL --token TOKEN <node flags> <flags>
//	[env VARS...] trellis server <node flags> <server flags> <datastore flags> --cluster-cidr CIDRS --https-listen-port 6443 <flags>
//
// where the node flags are --data-dir, --node-name, the address flags,
// --cni-conf-dir and --log-level (logArgs), and the datastore flags
// --token SECRET, --cluster-init --token SECRET, or (via) --server URL
// --token TOKEN.
func (c *cluster) command(m *member, s *startConfig) []string {
	var args []string
	if len(s.env) > 0 {
		args = append([]string{"env"}, s.env...)
	}
	bin := c.bin
	if s.bin != "" {
		bin = s.bin
	}
	args = append(args, bin, m.role)
	if s.own != nil {
		return append(append(args, s.own...), logArgs()...)
	}
	if m.role == api.RoleAgent {
		args = append(args, "--server", c.serverURL(m, s), "--token", c.token)
	}
	args = append(args, "--data-dir", m.dataDir, "--node-name", m.Name)
	if s.addrsSet {
		args = append(args, s.addrs...)
	} else {
		if m.LANIP.IsValid() {
			args = append(args, "--node-ip", m.LANIP.String())
		}
		if m.PublicIP.IsValid() {
			args = append(args, "--node-external-ip", m.PublicIP.String())
		}
	}
	args = append(args, "--cni-conf-dir", m.cniDir)
	args = append(args, logArgs()...)
	if m.role == api.RoleServer {
		args = append(args, s.serverFlags...)
		switch {
		case s.via != nil:
			args = append(args, "--server", c.serverURL(m, s), "--token", c.token)
		case s.clusterInit:
			args = append(args, "--cluster-init", "--token", serverSecret)
		default:
			args = append(args, "--token", serverSecret)
		}
		args = append(args, "--cluster-cidr", s.cidr, "--https-listen-port", strconv.Itoa(serverPort))
	}
	return append(args, s.flags...)
}

// serverURL is the URL m joins with s: s.url, or the address of the server
// (s.via or the cluster's) from m: its public IPv6 address with overIPv6,
// its LAN address when both are on one LAN, else its public IPv4 address.
func (c *cluster) serverURL(m *member, s *startConfig) string {
	if s.url != "" {
		return s.url
	}
	srv := c.server
	if s.via != nil {
		srv = s.via
	}
	if srv == nil {
		c.t.Fatalf("%s's %s joins no server: start one first", m.Name, m.role)
	}
	a := srv.PublicIP
	switch {
	case s.ipv6:
		a = srv.PublicIP6()
	case m.LAN != nil && m.LAN == srv.LAN:
		a = srv.LANIP
	}
	return "https://" + netip.AddrPortFrom(a, serverPort).String()
}

// logArgs are the logging flags of trellis processes: TRELLIS_E2E_LOG_LEVEL
// (debug, info, warn, error) sets --log-level.
func logArgs() []string {
	if level := os.Getenv("TRELLIS_E2E_LOG_LEVEL"); level != "" {
		return []string{"--log-level", level}
	}
	return nil
}

// waitToken waits until server m has written its join token
// (<data-dir>/server/token), K10<sha256>::server:<serverSecret>, the same
// as the cluster's other servers (one CA, one secret), and keeps it for
// the agents.
func (c *cluster) waitToken(m *member) {
	c.t.Helper()
	tokenFile := filepath.Join(m.dataDir, "server", "token")
	WaitFor(c.t, joinTimeout, m.Name+"'s server to write its join token to "+tokenFile, func() error {
		if err := m.proc.Err(); err != nil {
			return err
		}
		b, err := os.ReadFile(tokenFile)
		if err != nil {
			return err
		}
		tok := strings.TrimSpace(string(b))
		if !strings.HasPrefix(tok, "K10") || !strings.HasSuffix(tok, "::server:"+serverSecret) {
			return fmt.Errorf("want K10<sha256>::server:%s, got %q", serverSecret, tok)
		}
		if c.token != "" && tok != c.token {
			return Permanent(fmt.Errorf("%s has token %q, want the first server's %q (one CA, one secret)", m.Name, tok, c.token))
		}
		c.token = tok
		return nil
	})
}

// adminConfig is the admin credentials file the server writes.
func (c *cluster) adminConfig() string {
	return filepath.Join(c.server.dataDir, "server", "admin.yaml")
}

// cli runs `trellis args... --admin-config ADMIN` on the server's machine
// and returns its standard output.
func (c *cluster) cli(args ...string) (string, error) {
	return c.lab.Output(c.server.NS, append(append([]string{c.bin}, args...), "--admin-config", c.adminConfig())...)
}

// nodes runs `trellis nodes -o json` on the server's machine.
func (c *cluster) nodes() (map[string]api.Node, error) {
	out, err := c.cli("nodes", "-o", "json")
	if err != nil {
		return nil, err
	}
	var list []api.Node
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		return nil, fmt.Errorf("trellis nodes -o json: %w; output: %q", err, out)
	}
	byName := map[string]api.Node{}
	for _, n := range list {
		byName[n.Name] = n
	}
	return byName, nil
}

// waitNodes waits until `trellis nodes` lists exactly the given members,
// all ready, and returns the listing.
func (c *cluster) waitNodes(ms ...*member) map[string]api.Node {
	c.t.Helper()
	return c.waitListed(joinTimeout, ms, ms)
}

// waitListed waits until `trellis nodes` lists exactly listed, with those
// in ready ready (and their processes running), and returns the listing.
func (c *cluster) waitListed(timeout time.Duration, listed, ready []*member) map[string]api.Node {
	c.t.Helper()
	var want, wantReady []string
	for _, m := range listed {
		want = append(want, m.Name)
	}
	for _, m := range ready {
		wantReady = append(wantReady, m.Name)
	}
	slices.Sort(want)
	slices.Sort(wantReady)
	what := fmt.Sprintf("trellis nodes to list exactly %v, all ready", want)
	if !slices.Equal(want, wantReady) {
		what = fmt.Sprintf("trellis nodes to list exactly %v, with %v ready", want, wantReady)
	}
	var nodes map[string]api.Node
	WaitFor(c.t, timeout, what, func() error {
		for _, m := range ready {
			if err := m.proc.Err(); err != nil {
				return err
			}
		}
		var err error
		if nodes, err = c.nodes(); err != nil {
			return err
		}
		var got, notReady []string
		for name := range nodes {
			got = append(got, name)
		}
		slices.Sort(got)
		if !slices.Equal(got, want) {
			return fmt.Errorf("listed %v", got)
		}
		for _, r := range wantReady {
			if !nodes[r].Ready {
				notReady = append(notReady, r)
			}
		}
		if len(notReady) > 0 {
			return fmt.Errorf("not ready: %v", notReady)
		}
		return nil
	})
	return nodes
}

// attachPod waits for m's CNI configuration, attaches a pod with it and
// starts an echo server in the pod. In a dual-stack cluster it records the
// pod's IPv6 address.
func (c *cluster) attachPod(m *member) {
	c.t.Helper()
	m.pod = m.MustAddPod(c.waitCNIConfig(m))
	if err := m.pod.ServeEcho(); err != nil {
		c.t.Fatalf("echo server in %s's pod: %v", m.Name, err)
	}
	if c.dual {
		ip6, err := m.pod.IP6()
		if err != nil {
			c.t.Fatal(err)
		}
		c.mu.Lock()
		m.pod6 = ip6
		c.mu.Unlock()
	}
}

// podIP is m's pod address of one family.
func (c *cluster) podIP(m *member, v6 bool) netip.Addr {
	if !v6 {
		return m.pod.IP
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return m.pod6
}

// families are the pod address families of the cluster: IPv4, and IPv6
// in a dual-stack cluster.
func (c *cluster) families() []bool {
	if c.dual {
		return []bool{false, true}
	}
	return []bool{false}
}

// waitCNIConfig waits until m's agent has written its CNI configuration
// (it does once the node has joined and its data plane is up) and returns
// its path.
func (c *cluster) waitCNIConfig(m *member) string {
	c.t.Helper()
	conflist := filepath.Join(m.cniDir, conflistName)
	WaitFor(c.t, joinTimeout, m.Name+"'s agent to write "+conflist, func() error {
		if err := m.proc.Err(); err != nil {
			return err
		}
		b, err := os.ReadFile(conflist)
		if err != nil {
			return err
		}
		if !json.Valid(b) {
			return fmt.Errorf("not valid JSON: %q", b)
		}
		return nil
	})
	return conflist
}

// checkPods checks that every pod of from reaches every pod of to (other
// than itself) with ICMP and TCP within timeout, on each family of the
// cluster, all pairs at once, and fails the test listing every pair that
// does not.
func (c *cluster) checkPods(what string, from, to []*member, timeout time.Duration) {
	c.t.Helper()
	var mu sync.Mutex
	var failures []string
	var wg sync.WaitGroup
	for _, a := range from {
		for _, b := range to {
			if a == b {
				continue
			}
			for _, v6 := range c.families() {
				dst := c.podIP(b, v6)
				wg.Go(func() {
					err := Poll(timeout, func() error { return a.pod.Ping(dst) })
					if err == nil {
						err = Poll(timeout, func() error { return a.pod.TCPEcho(dst) })
					}
					if err != nil {
						mu.Lock()
						if c.dual {
							failures = append(failures, fmt.Sprintf("%s → %s (%s): %v", a.Name, b.Name, dst, err))
						} else {
							failures = append(failures, fmt.Sprintf("%s → %s: %v", a.Name, b.Name, err))
						}
						mu.Unlock()
					}
				})
			}
		}
	}
	wg.Wait()
	if len(failures) == 0 {
		return
	}
	slices.Sort(failures)
	if c.dual {
		c.t.Fatalf("%s: want every pod to reach every other pod on IPv4 and IPv6 (ping and TCP) within %v; %d do not:\n%s",
			what, timeout, len(failures), strings.Join(failures, "\n"))
	}
	c.t.Fatalf("%s: want every pod to reach every other pod (ping and TCP) within %v; %d pairs do not:\n%s",
		what, timeout, len(failures), strings.Join(failures, "\n"))
}

// firstPackets measures, for each of ms, the time from its process's start
// to the first ping from its pod that gets through to each pod of peers,
// on each family of the cluster. It records the times for the summary and
// returns the pairs that do not get through within timeout.
func (c *cluster) firstPackets(event string, ms, peers []*member, timeout time.Duration) []string {
	var mu sync.Mutex
	var failures []string
	var wg sync.WaitGroup
	for _, m := range ms {
		start := m.proc.StartedAt()
		for _, p := range peers {
			if p == m {
				continue
			}
			for _, v6 := range c.families() {
				dst := c.podIP(p, v6)
				wg.Go(func() {
					err := Poll(timeout, func() error { return m.pod.Ping(dst) })
					mu.Lock()
					defer mu.Unlock()
					if !c.dual {
						if err != nil {
							failures = append(failures, fmt.Sprintf("%s → %s: %v", m.Name, p.Name, err))
							return
						}
						c.timings = append(c.timings, fmt.Sprintf("%-16s %-7s → %-7s %6.2fs", event, m.Name, p.Name, time.Since(start).Seconds()))
						return
					}
					if err != nil {
						failures = append(failures, fmt.Sprintf("%s → %s (%s): %v", m.Name, p.Name, dst, err))
						return
					}
					fam := "IPv4"
					if v6 {
						fam = "IPv6"
					}
					c.timings = append(c.timings, fmt.Sprintf("%-12s %-7s → %-7s %s %6.2fs", event, m.Name, p.Name, fam, time.Since(start).Seconds()))
				})
			}
		}
	}
	wg.Wait()
	return failures
}

// wgShow returns m's WireGuard device.
func (m *member) wgShow() (WGDevice, error) {
	if err := m.proc.Err(); err != nil {
		return WGDevice{}, err
	}
	return m.proc.WGShow(wgIface)
}

// diagnose logs each member's WireGuard device, addresses and routes, and
// the node list (and in a dual-stack cluster the IPv6 addresses and routes,
// and the paths).
func (c *cluster) diagnose() {
	for _, m := range c.members {
		if m.proc == nil {
			continue
		}
		var b strings.Builder
		fmt.Fprintf(&b, "==== %s (%s, pid %d, running %v)\n", m.Name, m.role, m.proc.Pid(), m.proc.Running())
		if out, err := m.proc.Nsenter("wg", "show", wgIface, "dump"); err == nil {
			b.WriteString(out)
		} else {
			fmt.Fprintf(&b, "wg show: %v\n", err)
		}
		cmds := [][]string{{"ip", "-br", "-4", "addr"}, {"ip", "-4", "route"}}
		if c.dual {
			cmds = append(cmds, []string{"ip", "-br", "-6", "addr"}, []string{"ip", "-6", "route"})
		}
		for _, cmd := range cmds {
			out, _ := m.Exec(cmd...)
			b.WriteString(out)
		}
		c.t.Logf("%s", b.String())
	}
	if c.server != nil {
		out, err := c.cli("nodes")
		c.t.Logf("trellis nodes (err %v):\n%s", err, out)
		if c.dual {
			out, err := c.cli("paths")
			c.t.Logf("trellis paths (err %v):\n%s", err, out)
		}
	}
}
