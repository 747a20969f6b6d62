//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
)

// Constants of the CLI contract the tests run against.
const (
	clusterCIDR  = "10.42.0.0/16"
	wgIface      = "trellis-wg"
	conflistName = "10-trellis.conflist"
	serverSecret = "e2e-secret"

	// joinTimeout bounds a node's join and the first configuration of its
	// data plane.
	joinTimeout = 60 * time.Second
	// meshTimeout bounds the time until packets pass between two pods once
	// both nodes have joined.
	meshTimeout = 30 * time.Second
)

// cluster is a Trellis cluster in a lab: one server and agents, each a
// member with its own data and CNI configuration directories and a pod.
type cluster struct {
	t       *testing.T
	lab     *Lab
	bin     string
	server  *member
	token   string // the server's full join token
	mu      sync.Mutex
	members []*member
	timings []string // for the summary: time from start to first packets
}

// member is one trellis process on a node.
type member struct {
	*Node
	role    string // api.RoleServer or api.RoleAgent
	proc    *Proc
	dataDir string
	cniDir  string
	pod     *Pod
}

func newCluster(t *testing.T, lab *Lab) *cluster {
	c := &cluster{t: t, lab: lab, bin: trellisBinary(t)}
	// Registered after the lab's clean-up, so it runs first, while the
	// processes still run.
	t.Cleanup(func() {
		if t.Failed() {
			c.diagnose()
		}
	})
	return c
}

func (c *cluster) newMember(n *Node, role string) *member {
	m := &member{Node: n, role: role, dataDir: c.lab.TempDir(n.Name + "-data"), cniDir: c.lab.TempDir(n.Name + "-cni")}
	c.mu.Lock()
	c.members = append(c.members, m)
	c.mu.Unlock()
	return m
}

// nodeArgs are the flags every trellis node gets.
func (m *member) nodeArgs() []string {
	args := []string{
		"--data-dir", m.dataDir,
		"--node-name", m.Name,
		"--node-ip", m.LANIP.String(),
		"--node-external-ip", m.PublicIP.String(),
		"--cni-conf-dir", m.cniDir,
	}
	return append(args, logArgs()...)
}

// logArgs are the logging flags of trellis processes: TRELLIS_E2E_LOG_LEVEL
// (debug, info, warn, error) sets --log-level.
func logArgs() []string {
	if level := os.Getenv("TRELLIS_E2E_LOG_LEVEL"); level != "" {
		return []string{"--log-level", level}
	}
	return nil
}

// startServer starts the server on n and waits for its join token.
func (c *cluster) startServer(n *Node) *member {
	c.t.Helper()
	m := c.newMember(n, api.RoleServer)
	args := append([]string{c.bin, "server"}, m.nodeArgs()...)
	args = append(args,
		"--flannel-backend=wireguard-native", "--flannel-external-ip",
		"--token", serverSecret, "--cluster-cidr", clusterCIDR, "--https-listen-port", "6443")
	m.proc = n.Start(args...)
	c.server = m
	tokenFile := filepath.Join(m.dataDir, "server", "token")
	WaitFor(c.t, joinTimeout, "the server to write its join token to "+tokenFile, func() error {
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
		c.token = tok
		return nil
	})
	return m
}

// startAgent starts an agent on n that joins the server.
func (c *cluster) startAgent(n *Node) *member {
	c.t.Helper()
	m := c.newMember(n, api.RoleAgent)
	args := append([]string{c.bin, "agent",
		"--server", "https://" + netip.AddrPortFrom(c.server.PublicIP, 6443).String(),
		"--token", c.token}, m.nodeArgs()...)
	m.proc = n.Start(args...)
	return m
}

// adminConfig is the admin credentials file the server writes.
func (c *cluster) adminConfig() string {
	return filepath.Join(c.server.dataDir, "server", "admin.yaml")
}

// nodes runs `trellis nodes -o json` on the server's machine.
func (c *cluster) nodes() (map[string]api.Node, error) {
	out, err := c.lab.Output(c.server.NS, c.bin, "nodes", "--admin-config", c.adminConfig(), "-o", "json")
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
	var want []string
	for _, m := range ms {
		want = append(want, m.Name)
	}
	slices.Sort(want)
	var nodes map[string]api.Node
	WaitFor(c.t, joinTimeout, fmt.Sprintf("trellis nodes to list exactly %v, all ready", want), func() error {
		for _, m := range ms {
			if err := m.proc.Err(); err != nil {
				return err
			}
		}
		var err error
		if nodes, err = c.nodes(); err != nil {
			return err
		}
		var got, notReady []string
		for name, n := range nodes {
			got = append(got, name)
			if !n.Ready {
				notReady = append(notReady, name)
			}
		}
		slices.Sort(got)
		if !slices.Equal(got, want) {
			return fmt.Errorf("listed %v", got)
		}
		if len(notReady) > 0 {
			return fmt.Errorf("not ready: %v", notReady)
		}
		return nil
	})
	return nodes
}

// attachPod waits for m's CNI configuration, attaches a pod with it and
// starts an echo server in the pod.
func (c *cluster) attachPod(m *member) {
	c.t.Helper()
	m.pod = m.MustAddPod(c.waitCNIConfig(m))
	if err := m.pod.ServeEcho(); err != nil {
		c.t.Fatalf("echo server in %s's pod: %v", m.Name, err)
	}
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
// than itself) with ICMP and TCP within timeout, all pairs at once, and
// fails the test listing every pair that does not.
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
			wg.Go(func() {
				err := Poll(timeout, func() error { return a.pod.Ping(b.pod.IP) })
				if err == nil {
					err = Poll(timeout, func() error { return a.pod.TCPEcho(b.pod.IP) })
				}
				if err != nil {
					mu.Lock()
					failures = append(failures, fmt.Sprintf("%s → %s: %v", a.Name, b.Name, err))
					mu.Unlock()
				}
			})
		}
	}
	wg.Wait()
	if len(failures) > 0 {
		slices.Sort(failures)
		c.t.Fatalf("%s: want every pod to reach every other pod (ping and TCP) within %v; %d pairs do not:\n%s",
			what, timeout, len(failures), strings.Join(failures, "\n"))
	}
}

// firstPackets measures, for each of ms, the time from its process's start
// to the first ping from its pod that gets through to each pod of peers.
// It records the times for the summary and returns the pairs that do not
// get through within joinTimeout.
func (c *cluster) firstPackets(event string, ms, peers []*member) []string {
	var mu sync.Mutex
	var failures []string
	var wg sync.WaitGroup
	for _, m := range ms {
		start := m.proc.StartedAt()
		for _, p := range peers {
			if p == m {
				continue
			}
			wg.Go(func() {
				err := Poll(joinTimeout, func() error { return m.pod.Ping(p.pod.IP) })
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					failures = append(failures, fmt.Sprintf("%s → %s: %v", m.Name, p.Name, err))
					return
				}
				c.timings = append(c.timings, fmt.Sprintf("%-16s %-7s → %-7s %6.2fs", event, m.Name, p.Name, time.Since(start).Seconds()))
			})
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

// checkPeers checks that each of ms has exactly the others as WireGuard
// peers, with their listed public keys and, since every member is in a
// cloud of its own, their external address on port 51820 as endpoint.
func (c *cluster) checkPeers(t *testing.T, ms []*member, nodes map[string]api.Node) {
	t.Helper()
	for _, m := range ms {
		dev, err := m.wgShow()
		if err != nil {
			t.Errorf("wg show on %s: %v", m.Name, err)
			continue
		}
		var want []string
		for _, o := range ms {
			if o == m {
				continue
			}
			key := nodes[o.Name].PublicKey.String()
			want = append(want, key)
			p, ok := dev.Peer(key)
			if !ok {
				t.Errorf("%s's %s has no peer for %s (key %s); peers: %+v", m.Name, wgIface, o.Name, key, dev.Peers)
				continue
			}
			if ep := netip.AddrPortFrom(o.PublicIP, api.DefaultWireGuardPort).String(); p.Endpoint != ep {
				t.Errorf("%s's peer %s: want endpoint %s (its external address), got %s", m.Name, o.Name, ep, p.Endpoint)
			}
		}
		if len(dev.Peers) != len(want) {
			t.Errorf("%s's %s: want %d peers, got %d: %+v", m.Name, wgIface, len(want), len(dev.Peers), dev.Peers)
		}
	}
}

// diagnose logs each member's WireGuard device, addresses and routes, and
// the node list.
func (c *cluster) diagnose() {
	for _, m := range c.members {
		var b strings.Builder
		fmt.Fprintf(&b, "==== %s (%s, pid %d, running %v)\n", m.Name, m.role, m.proc.Pid(), m.proc.Running())
		if out, err := m.proc.Nsenter("wg", "show", wgIface, "dump"); err == nil {
			b.WriteString(out)
		} else {
			fmt.Fprintf(&b, "wg show: %v\n", err)
		}
		for _, cmd := range [][]string{{"ip", "-br", "-4", "addr"}, {"ip", "-4", "route"}} {
			out, _ := m.Exec(cmd...)
			b.WriteString(out)
		}
		c.t.Logf("%s", b.String())
	}
	if c.server != nil {
		out, err := c.lab.Output(c.server.NS, c.bin, "nodes", "--admin-config", c.adminConfig())
		c.t.Logf("trellis nodes (err %v):\n%s", err, out)
	}
}

// TestMulticloudMesh is the cluster of the seed page: a server in one
// cloud, agents in two others, joined over the internet with WireGuard
// between nodes that share no private network.
func TestMulticloudMesh(t *testing.T) {
	lab := NewLab(t)
	c := newCluster(t, lab)
	inet := lab.Internet()
	inet.Counter("cluster", "ip saddr "+clusterCIDR, "ip daddr "+clusterCIDR)
	inet.Counter("wireguard", "udp dport 51820", "udp sport 51820")

	c1 := lab.Cloud("cloud1", "198.51.100.10/24", "10.1.0.10/24")
	c2 := lab.Cloud("cloud2", "203.0.113.20/24", "10.2.0.20/24")
	c3 := lab.Cloud("cloud3", "192.0.2.30/24", "10.3.0.30/24")

	server := c.startServer(c1)
	agent2 := c.startAgent(c2)
	agent3 := c.startAgent(c3)
	three := []*member{server, agent2, agent3}
	for _, m := range three {
		c.attachPod(m)
	}
	if failed := c.firstPackets("first start", three, three); len(failed) > 0 {
		t.Errorf("after the first start, pods do not reach each other within %v:\n%s", joinTimeout, strings.Join(failed, "\n"))
	}
	defer func() {
		t.Logf("time from a node's (re)start to its pod's first packet through to each peer's pod:\n%s", strings.Join(c.timings, "\n"))
	}()

	var nodes map[string]api.Node
	t.Run("1-nodes", func(t *testing.T) {
		nodes = c.waitNodes(three...)
		cidrs := map[netip.Prefix]string{}
		keys := map[api.Key]string{}
		cluster := netip.MustParsePrefix(clusterCIDR)
		for _, m := range three {
			n := nodes[m.Name]
			if !n.HasRole(m.role) {
				t.Errorf("node %s: want role %s, got %v", m.Name, m.role, n.Roles)
			}
			if !slices.Contains(n.ExternalIPs, m.PublicIP) {
				t.Errorf("node %s: want external IP %s, got %v", m.Name, m.PublicIP, n.ExternalIPs)
			}
			if !slices.Contains(n.InternalIPs, m.LANIP) {
				t.Errorf("node %s: want internal IP %s, got %v", m.Name, m.LANIP, n.InternalIPs)
			}
			if len(n.PodCIDRs) != 1 || !cluster.Contains(n.PodCIDRs[0].Addr()) || n.PodCIDRs[0].Bits() != 24 {
				t.Errorf("node %s: want one /24 pod CIDR in %s, got %v", m.Name, cluster, n.PodCIDRs)
			} else if other, dup := cidrs[n.PodCIDRs[0]]; dup {
				t.Errorf("nodes %s and %s have the same pod CIDR %s", other, m.Name, n.PodCIDRs[0])
			} else {
				cidrs[n.PodCIDRs[0]] = m.Name
			}
			if n.PublicKey.IsZero() {
				t.Errorf("node %s has no public key", m.Name)
			} else if other, dup := keys[n.PublicKey]; dup {
				t.Errorf("nodes %s and %s have the same public key %s", other, m.Name, n.PublicKey)
			} else {
				keys[n.PublicKey] = m.Name
			}
			if dev, err := m.wgShow(); err != nil {
				t.Errorf("node %s: wg show %s: %v", m.Name, wgIface, err)
			} else if dev.PublicKey != n.PublicKey.String() {
				t.Errorf("node %s: trellis nodes lists public key %s, but %s has %s", m.Name, n.PublicKey, wgIface, dev.PublicKey)
			}
			if m.pod != nil && len(n.PodCIDRs) == 1 && !n.PodCIDRs[0].Contains(m.pod.IP) {
				t.Errorf("node %s: its pod got %s from CNI, outside the node's pod CIDR %s", m.Name, m.pod.IP, n.PodCIDRs[0])
			}
		}
		c.checkPeers(t, three, nodes)
	})
	if t.Failed() {
		t.FailNow()
	}

	t.Run("2-pods-reach-pods", func(t *testing.T) {
		c.checkPods("three clouds", three, three, meshTimeout)
	})

	t.Run("3-no-plaintext-on-internet", func(t *testing.T) {
		checkCounters(t, inet)
	})

	t.Run("4-agent-restart", func(t *testing.T) {
		before := nodes[agent2.Name]
		if err := agent2.proc.Restart(); err != nil {
			t.Errorf("restart %s: %v", agent2.Name, err)
		}
		if failed := c.firstPackets("agent restart", []*member{agent2}, three); len(failed) > 0 {
			t.Errorf("after restarting %s's agent, its pod does not reach the others within %v:\n%s", agent2.Name, joinTimeout, strings.Join(failed, "\n"))
		}
		after := c.waitNodes(three...)[agent2.Name]
		if after.PublicKey != before.PublicKey {
			t.Errorf("%s's public key changed across a restart: was %s, now %s", agent2.Name, before.PublicKey, after.PublicKey)
		}
		if !slices.Equal(after.PodCIDRs, before.PodCIDRs) {
			t.Errorf("%s's pod CIDR changed across a restart: was %v, now %v", agent2.Name, before.PodCIDRs, after.PodCIDRs)
		}
		if dev, err := agent2.wgShow(); err != nil {
			t.Errorf("wg show on %s after restart: %v", agent2.Name, err)
		} else if dev.PublicKey != before.PublicKey.String() {
			t.Errorf("%s's %s has key %s after restart, want %s", agent2.Name, wgIface, dev.PublicKey, before.PublicKey)
		}
		c.checkPods("after an agent restart", three, three, meshTimeout)
	})

	var agent4 *member
	t.Run("5-server-restart", func(t *testing.T) {
		if err := server.proc.Stop(); err != nil {
			t.Errorf("stop server: %v", err)
		}
		// The server's own data plane goes with its process; the agents'
		// tunnels must carry on without it.
		agents := []*member{agent2, agent3}
		c.checkPods("right after the server stopped", agents, agents, 5*time.Second)
		downFor := 5 * time.Second
		for end := time.Now().Add(downFor); time.Now().Before(end); {
			c.checkPods("while the server is down", agents, agents, time.Second)
		}
		offsets := map[*member]int64{agent2: agent2.proc.LogSize(), agent3: agent3.proc.LogSize()}
		if err := server.proc.Restart(); err != nil {
			t.Errorf("restart server: %v", err)
		}
		// Nothing changed while the server was down: the agents resume
		// their netmap streams with an empty delta, not the whole map.
		for m, off := range offsets {
			if _, err := waitLogLine(m.proc, off, joinTimeout, "netmap stream connected"); err != nil {
				t.Errorf("%s did not reconnect its netmap stream: %v", m.Name, err)
				continue
			}
			if lines, _ := m.proc.LogLinesSince(off, "netmap stream connected"); !strings.Contains(strings.Join(lines, "\n"), "resumed=true") {
				t.Errorf("%s did not resume its netmap stream after the server restart: %q", m.Name, lines)
			}
		}
		if failed := c.firstPackets("server restart", []*member{server}, three); len(failed) > 0 {
			t.Errorf("after restarting the server, its pod does not reach the others within %v:\n%s", joinTimeout, strings.Join(failed, "\n"))
		}
		c.waitNodes(three...)
		c.checkPods("after the server restarted", three, three, meshTimeout)

		c4 := lab.Cloud("cloud4", "198.18.0.40/24", "10.4.0.40/24")
		agent4 = c.startAgent(c4)
		c.attachPod(agent4)
		four := []*member{server, agent2, agent3, agent4}
		if failed := c.firstPackets("join (4th node)", []*member{agent4}, four); len(failed) > 0 {
			t.Errorf("a fourth node's pod does not reach the others within %v:\n%s", joinTimeout, strings.Join(failed, "\n"))
		}
		nodes = c.waitNodes(four...)
		c.checkPeers(t, four, nodes)
		c.checkPods("with a fourth node", four, four, meshTimeout)
	})
	if agent4 == nil || t.Failed() {
		t.FailNow()
	}

	t.Run("6-node-delete", func(t *testing.T) {
		gone := nodes[agent3.Name].PublicKey.String()
		remaining := []*member{server, agent2, agent4}
		start := time.Now()
		if out, err := lab.Output(server.NS, c.bin, "node", "delete", agent3.Name, "--admin-config", c.adminConfig()); err != nil {
			t.Fatalf("trellis node delete %s: %v (output %q)", agent3.Name, err, out)
		}
		var wg sync.WaitGroup
		for _, m := range remaining {
			wg.Go(func() {
				err := Poll(10*time.Second, func() error {
					dev, err := m.wgShow()
					if err != nil {
						return err
					}
					if p, ok := dev.Peer(gone); ok {
						return fmt.Errorf("still has peer %s (endpoint %s, allowed IPs %v)", gone, p.Endpoint, p.AllowedIPs)
					}
					return nil
				})
				if err != nil {
					t.Errorf("%s: want %s's peer removed from %s after trellis node delete: %v", m.Name, agent3.Name, wgIface, err)
					return
				}
				t.Logf("%s removed %s's peer %.2fs after the delete", m.Name, agent3.Name, time.Since(start).Seconds())
			})
		}
		wg.Wait()
		nodes, err := c.nodes()
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := nodes[agent3.Name]; ok {
			t.Errorf("trellis nodes still lists %s after trellis node delete", agent3.Name)
		}
		c.checkPods("after deleting a node", remaining, remaining, meshTimeout)
	})

	t.Run("no-plaintext-at-the-end", func(t *testing.T) {
		checkCounters(t, inet)
	})
}

// checkCounters checks the internet router's counters: no packet with a
// cluster address, some WireGuard packets.
func checkCounters(t *testing.T, inet *Router) {
	t.Helper()
	plain, wg := inet.MustCount("cluster"), inet.MustCount("wireguard")
	t.Logf("internet router: %d packets with cluster addresses, %d WireGuard packets", plain, wg)
	if plain != 0 {
		t.Errorf("packets with a source or destination in %s forwarded by the internet router: want 0 (pod traffic must cross inside WireGuard), got %d", clusterCIDR, plain)
	}
	if wg == 0 {
		t.Errorf("UDP port 51820 packets forwarded by the internet router: want > 0 after pods talked across clouds, got 0")
	}
}
