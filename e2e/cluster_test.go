//go:build e2e

package e2e

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
)

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
	if failed := c.firstPackets("first start", three, three, joinTimeout); len(failed) > 0 {
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
		if failed := c.firstPackets("agent restart", []*member{agent2}, three, joinTimeout); len(failed) > 0 {
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
		if failed := c.firstPackets("server restart", []*member{server}, three, joinTimeout); len(failed) > 0 {
			t.Errorf("after restarting the server, its pod does not reach the others within %v:\n%s", joinTimeout, strings.Join(failed, "\n"))
		}
		c.waitNodes(three...)
		c.checkPods("after the server restarted", three, three, meshTimeout)

		c4 := lab.Cloud("cloud4", "198.18.0.40/24", "10.4.0.40/24")
		agent4 = c.startAgent(c4)
		c.attachPod(agent4)
		four := []*member{server, agent2, agent3, agent4}
		if failed := c.firstPackets("join (4th node)", []*member{agent4}, four, joinTimeout); len(failed) > 0 {
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
		if out, err := c.cli("node", "delete", agent3.Name); err != nil {
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
