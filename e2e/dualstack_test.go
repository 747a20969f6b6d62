//go:build e2e

package e2e

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
)

// Dual-stack clusters: pods get an address of each family, on underlays
// that are dual-stack, IPv6-only or a mix of IPv4-only and dual-stack
// clouds.

// relayedTimeout bounds the first packets of pairs that need a relay.
const relayedTimeout = 90 * time.Second

// checkDataPlane checks a member's dual-stack data plane: one pod CIDR of
// each family, the WireGuard interface with the first address of each
// (/32 and /128), routes for both cluster CIDRs through it, the bridge
// with both gateways, IPv6 forwarding, and a pod with both addresses.
func (c *cluster) checkDataPlane(t *testing.T, m *member, n api.Node) {
	t.Helper()
	c4, c6 := netip.MustParsePrefix(clusterCIDR), netip.MustParsePrefix(clusterCIDR6)
	var p4, p6 netip.Prefix
	for _, p := range n.PodCIDRs {
		switch {
		case c4.Contains(p.Addr()) && p.Bits() == 24:
			p4 = p
		case c6.Contains(p.Addr()) && p.Bits() == 64:
			p6 = p
		}
	}
	if !p4.IsValid() || !p6.IsValid() || len(n.PodCIDRs) != 2 {
		t.Errorf("node %s: want a /24 in %s and a /64 in %s, got pod CIDRs %v", m.Name, c4, c6, n.PodCIDRs)
		return
	}
	wgAddrs, _ := m.Exec("ip", "-br", "addr", "show", "dev", wgIface)
	for _, want := range []string{p4.Addr().String() + "/32", p6.Addr().String() + "/128"} {
		if !strings.Contains(wgAddrs, want) {
			t.Errorf("node %s: %s has %q, want %s on it", m.Name, wgIface, strings.TrimSpace(wgAddrs), want)
		}
	}
	br, _ := m.Exec("ip", "-br", "addr", "show", "dev", "cni0")
	for _, want := range []string{p4.Addr().Next().String() + "/24", p6.Addr().Next().String() + "/64"} {
		if !strings.Contains(br, want) {
			t.Errorf("node %s: cni0 has %q, want gateway %s", m.Name, strings.TrimSpace(br), want)
		}
	}
	r4, _ := m.Exec("ip", "-4", "route", "show", "dev", wgIface)
	r6, _ := m.Exec("ip", "-6", "route", "show", "dev", wgIface)
	if !strings.Contains(r4, clusterCIDR) || !strings.Contains(r6, clusterCIDR6) {
		t.Errorf("node %s: routes via %s are %q and %q, want %s and %s", m.Name, wgIface, r4, r6, clusterCIDR, clusterCIDR6)
	}
	if fwd, err := m.Exec("sysctl", "-n", "net.ipv6.conf.all.forwarding"); err != nil || strings.TrimSpace(fwd) != "1" {
		t.Errorf("node %s: IPv6 forwarding = %q (%v), want 1", m.Name, fwd, err)
	}
	if m.pod != nil {
		if !p4.Contains(m.pod.IP) {
			t.Errorf("node %s: pod IPv4 %s is outside %s", m.Name, m.pod.IP, p4)
		}
		if ip6 := c.podIP(m, true); !p6.Contains(ip6) {
			t.Errorf("node %s: pod IPv6 %s is outside %s", m.Name, ip6, p6)
		}
	}
}

// checkEndpoints checks that each member's WireGuard peer for each other
// member has the endpoint want(from, to) names.
func (c *cluster) checkEndpoints(t *testing.T, ms []*member, nodes map[string]api.Node, want func(from, to *member) netip.Addr) {
	t.Helper()
	for _, m := range ms {
		err := Poll(meshTimeout, func() error {
			dev, err := m.wgShow()
			if err != nil {
				return err
			}
			var wrong []string
			for _, o := range ms {
				if o == m {
					continue
				}
				p, ok := dev.Peer(nodes[o.Name].PublicKey.String())
				ep := netip.AddrPortFrom(want(m, o), api.DefaultWireGuardPort).String()
				if !ok || p.Endpoint != ep {
					wrong = append(wrong, fmt.Sprintf("%s: endpoint %q, want %s", o.Name, p.Endpoint, ep))
				}
			}
			if len(wrong) > 0 {
				return fmt.Errorf("%s", strings.Join(wrong, "; "))
			}
			return nil
		})
		if err != nil {
			t.Errorf("%s's WireGuard peers: %v", m.Name, err)
		}
	}
}

// countersDS adds the counters of a dual-stack lab: pod traffic of either
// family in the clear, WireGuard over each family, and any IPv4 at all.
func countersDS(inet *Router) {
	inet.Counter("plain", "ip saddr "+clusterCIDR, "ip daddr "+clusterCIDR, "ip6 saddr "+clusterCIDR6, "ip6 daddr "+clusterCIDR6)
	inet.Counter("wg4", "meta nfproto ipv4 udp dport 51820", "meta nfproto ipv4 udp sport 51820")
	inet.Counter("wg6", "meta nfproto ipv6 udp dport 51820", "meta nfproto ipv6 udp sport 51820")
	inet.Counter("ipv4", "meta nfproto ipv4")
}

func checkNoPlaintext(t *testing.T, inet *Router) {
	t.Helper()
	plain, wg4, wg6, v4 := inet.MustCount("plain"), inet.MustCount("wg4"), inet.MustCount("wg6"), inet.MustCount("ipv4")
	t.Logf("internet router: %d packets with pod addresses, %d WireGuard packets over IPv4, %d over IPv6, %d IPv4 packets in all", plain, wg4, wg6, v4)
	if plain != 0 {
		t.Errorf("the internet router forwarded %d packets with a pod address (%s or %s): pod traffic must cross inside WireGuard", plain, clusterCIDR, clusterCIDR6)
	}
}

// checkNodesTable checks that `trellis nodes` shows IPv6 pod CIDRs and
// addresses.
func (c *cluster) checkNodesTable(t *testing.T, nodes map[string]api.Node, ms []*member) {
	t.Helper()
	out, err := c.cli("nodes")
	if err != nil {
		t.Fatalf("trellis nodes: %v", err)
	}
	t.Logf("trellis nodes:\n%s", out)
	for _, m := range ms {
		n := nodes[m.Name]
		var line string
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, m.Name+" ") {
				line = l
			}
		}
		for _, p := range n.PodCIDRs {
			if !strings.Contains(line, p.String()) {
				t.Errorf("trellis nodes: %s's line %q does not show pod CIDR %s", m.Name, line, p)
			}
		}
		for _, a := range append(slices.Clone(n.InternalIPs), n.ExternalIPs...) {
			if !strings.Contains(line, a.String()) {
				t.Errorf("trellis nodes: %s's line %q does not show address %s", m.Name, line, a)
			}
		}
	}
}

// TestDualStackMesh: three dual-stack clouds, a dual-stack cluster CIDR.
// Pods of every node reach pods of every other on both families; the
// mesh prefers IPv4 endpoints, and falls back to IPv6 for a pair whose
// IPv4 path drops WireGuard.
func TestDualStackMesh(t *testing.T) {
	lab := NewLab(t)
	c := newCluster(t, lab, dualStack())
	inet := lab.Internet6()
	countersDS(inet)

	c1 := lab.Cloud("cloud1", "198.51.100.10/24", "10.1.0.10/24")
	c1.AddPublic6("2001:db8:1::10/64")
	c2 := lab.Cloud("cloud2", "203.0.113.20/24", "10.2.0.20/24")
	c2.AddPublic6("2001:db8:2::20/64")
	c3 := lab.Cloud("cloud3", "192.0.2.30/24", "10.3.0.30/24")
	c3.AddPublic6("2001:db8:3::30/64")

	ext := func(n *Node) string { return n.PublicIP.String() + "," + n.PublicIP6().String() }
	server := c.startServer(c1, withAddressFlags("--node-ip", c1.LANIP.String(), "--node-external-ip", ext(c1)), withFlags("--flannel-external-ip"))
	// One agent joins over IPv4, the other over IPv6; the IPv6 addresses
	// come first on purpose (the flag order does not pick the family).
	agent2 := c.startAgent(c2, withAddressFlags("--node-ip", c2.LANIP.String(),
		"--node-external-ip", c2.PublicIP6().String(), "--node-external-ip", c2.PublicIP.String()))
	agent3 := c.startAgent(c3, overIPv6(), withAddressFlags("--node-ip", c3.LANIP.String(), "--node-external-ip", ext(c3)))
	three := []*member{server, agent2, agent3}
	for _, m := range three {
		c.attachPod(m)
	}
	defer func() {
		t.Logf("time from a node's start to its pod's first packet through to each peer's pod:\n%s", strings.Join(c.timings, "\n"))
	}()
	if failed := c.firstPackets("first start", three, three, joinTimeout); len(failed) > 0 {
		t.Errorf("after the first start, pods do not reach each other within %v:\n%s", joinTimeout, strings.Join(failed, "\n"))
	}

	var nodes map[string]api.Node
	t.Run("1-data-plane", func(t *testing.T) {
		nodes = c.waitNodes(three...)
		for _, m := range three {
			c.checkDataPlane(t, m, nodes[m.Name])
		}
	})
	if t.Failed() {
		t.FailNow()
	}
	t.Run("2-pods-reach-pods", func(t *testing.T) {
		c.checkPods("dual-stack underlay", three, three, meshTimeout)
	})
	t.Run("3-ipv4-endpoints-preferred", func(t *testing.T) {
		c.checkEndpoints(t, three, nodes, func(_, to *member) netip.Addr { return to.PublicIP })
	})
	t.Run("4-nodes-table", func(t *testing.T) {
		c.checkNodesTable(t, nodes, three)
	})

	t.Run("5-ipv4-blocked-falls-back-to-ipv6", func(t *testing.T) {
		c4 := lab.Cloud("cloud4", "198.18.0.40/24", "10.4.0.40/24")
		c4.AddPublic6("2001:db8:4::40/64")
		// The internet drops WireGuard over IPv4 between cloud2 and
		// cloud4; IPv6 gets through.
		inet.nft(fmt.Sprintf(`add chain inet e2e block4 { type filter hook forward priority -10; policy accept; }
add rule inet e2e block4 ip saddr %[1]s ip daddr %[2]s udp dport 51820 drop
add rule inet e2e block4 ip saddr %[2]s ip daddr %[1]s udp dport 51820 drop
`, c2.PublicIP, c4.PublicIP))
		agent4 := c.startAgent(c4, withAddressFlags("--node-ip", c4.LANIP.String(), "--node-external-ip", ext(c4)))
		c.attachPod(agent4)
		four := []*member{server, agent2, agent3, agent4}
		start := agent4.proc.StartedAt()
		if failed := c.firstPackets("join cloud4", []*member{agent4}, four, relayedTimeout); len(failed) > 0 {
			t.Errorf("cloud4's pod does not reach the others within %v:\n%s", relayedTimeout, strings.Join(failed, "\n"))
		}
		var took time.Duration
		WaitFor(t, relayedTimeout, "cloud2↔cloud4 to go direct over IPv6", func() error {
			ps, err := c.paths()
			if err != nil {
				return err
			}
			for _, k := range []string{"cloud2→cloud4", "cloud4→cloud2"} {
				p := ps[k]
				if p.Kind != api.PathDirect || !p.Endpoint.Addr().Is6() {
					return fmt.Errorf("%s is %s via %q to %v (%s)", k, p.Kind, p.Via, p.Endpoint, p.Reason)
				}
			}
			took = time.Since(start)
			return nil
		})
		t.Logf("cloud2↔cloud4 direct over IPv6 %.1fs after cloud4's agent started", took.Seconds())
		nodes = c.waitNodes(four...)
		c.checkEndpoints(t, four, nodes, func(from, to *member) netip.Addr {
			if (from == agent2 && to == agent4) || (from == agent4 && to == agent2) {
				return to.PublicIP6()
			}
			return to.PublicIP
		})
		c.checkPods("with IPv4 WireGuard blocked between two clouds", four, four, meshTimeout)
	})

	t.Run("6-no-plaintext", func(t *testing.T) {
		checkNoPlaintext(t, inet)
		if inet.MustCount("wg6") == 0 {
			t.Errorf("no WireGuard packets over IPv6, though cloud2↔cloud4 must use it")
		}
	})
}

// TestIPv6OnlyUnderlay: the clouds' public links carry IPv6 only. The
// server and one agent name their addresses; another agent detects its
// node IP (IPv6) on its own. IPv4 and IPv6 pod traffic both cross.
func TestIPv6OnlyUnderlay(t *testing.T) {
	lab := NewLab(t)
	c := newCluster(t, lab, dualStack())
	inet := lab.Internet6()
	countersDS(inet)

	c1 := lab.Cloud6("cloud1", "2001:db8:1::10/64", "10.1.0.10/24")
	c2 := lab.Cloud6("cloud2", "2001:db8:2::20/64", "10.2.0.20/24")
	c3 := lab.Cloud6("cloud3", "2001:db8:3::30/64", "10.3.0.30/24")

	server := c.startServer(c1, withAddressFlags("--node-ip", c1.LANIP.String(), "--node-external-ip", c1.PublicIP6().String()))
	agent2 := c.startAgent(c2, overIPv6(), withAddressFlags("--node-ip", c2.LANIP.String(), "--node-external-ip", c2.PublicIP6().String()))
	agent3 := c.startAgent(c3, overIPv6(), withAddressFlags()) // node IP detected
	three := []*member{server, agent2, agent3}
	for _, m := range three {
		c.attachPod(m)
	}
	defer func() {
		t.Logf("time from a node's start to its pod's first packet through to each peer's pod:\n%s", strings.Join(c.timings, "\n"))
	}()
	if failed := c.firstPackets("first start", three, three, joinTimeout); len(failed) > 0 {
		t.Errorf("after the first start, pods do not reach each other within %v:\n%s", joinTimeout, strings.Join(failed, "\n"))
	}

	var nodes map[string]api.Node
	t.Run("1-data-plane", func(t *testing.T) {
		nodes = c.waitNodes(three...)
		for _, m := range three {
			c.checkDataPlane(t, m, nodes[m.Name])
		}
		if got := nodes[agent3.Name].InternalIPs; !slices.Equal(got, []netip.Addr{c3.PublicIP6()}) {
			t.Errorf("agent3 detected node IPs %v, want [%s] (the source of its IPv6 default route)", got, c3.PublicIP6())
		}
	})
	if t.Failed() {
		t.FailNow()
	}
	t.Run("2-pods-reach-pods", func(t *testing.T) {
		c.checkPods("IPv6-only underlay", three, three, meshTimeout)
	})
	t.Run("3-ipv6-endpoints", func(t *testing.T) {
		c.checkEndpoints(t, three, nodes, func(_, to *member) netip.Addr { return to.PublicIP6() })
	})
	t.Run("4-nodes-table", func(t *testing.T) {
		c.checkNodesTable(t, nodes, three)
	})
	t.Run("5-no-ipv4-on-the-internet", func(t *testing.T) {
		checkNoPlaintext(t, inet)
		if n := inet.MustCount("ipv4"); n != 0 {
			t.Errorf("the internet router forwarded %d IPv4 packets; the underlay is IPv6-only", n)
		}
		if inet.MustCount("wg6") == 0 {
			t.Errorf("no WireGuard packets over IPv6")
		}
	})
}

// TestMixedFamilyClouds: a dual-stack server cloud, an IPv4-only cloud, a
// dual-stack cloud and an IPv6-only cloud. Each pair uses a family both
// have; the IPv4-only and the IPv6-only clouds share none and are relayed
// through the server. Every pod reaches every other on both families.
func TestMixedFamilyClouds(t *testing.T) {
	lab := NewLab(t)
	c := newCluster(t, lab, dualStack())
	inet := lab.Internet6()
	countersDS(inet)

	c1 := lab.Cloud("cloud1", "198.51.100.10/24", "10.1.0.10/24")
	c1.AddPublic6("2001:db8:1::10/64")
	c2 := lab.Cloud("cloud2", "203.0.113.20/24", "10.2.0.20/24") // IPv4 only
	c3 := lab.Cloud("cloud3", "192.0.2.30/24", "10.3.0.30/24")
	c3.AddPublic6("2001:db8:3::30/64")
	c4 := lab.Cloud6("cloud4", "2001:db8:4::40/64", "10.4.0.40/24") // IPv6 only

	ext := func(n *Node) string { return n.PublicIP.String() + "," + n.PublicIP6().String() }
	server := c.startServer(c1, withAddressFlags("--node-ip", c1.LANIP.String(), "--node-external-ip", ext(c1)))
	agent2 := c.startAgent(c2, withAddressFlags("--node-ip", c2.LANIP.String(), "--node-external-ip", c2.PublicIP.String()))
	agent3 := c.startAgent(c3, withAddressFlags("--node-ip", c3.LANIP.String(), "--node-external-ip", ext(c3)))
	agent4 := c.startAgent(c4, overIPv6(), withAddressFlags("--node-ip", c4.LANIP.String(), "--node-external-ip", c4.PublicIP6().String()))
	four := []*member{server, agent2, agent3, agent4}
	for _, m := range four {
		c.attachPod(m)
	}
	defer func() {
		t.Logf("time from a node's start to its pod's first packet through to each peer's pod:\n%s", strings.Join(c.timings, "\n"))
	}()
	if failed := c.firstPackets("first start", four, four, relayedTimeout); len(failed) > 0 {
		t.Errorf("after the first start, pods do not reach each other within %v:\n%s", relayedTimeout, strings.Join(failed, "\n"))
	}

	var nodes map[string]api.Node
	t.Run("1-data-plane", func(t *testing.T) {
		nodes = c.waitNodes(four...)
		for _, m := range four {
			c.checkDataPlane(t, m, nodes[m.Name])
		}
	})
	if t.Failed() {
		t.FailNow()
	}
	t.Run("2-paths", func(t *testing.T) {
		WaitFor(t, relayedTimeout, "cloud2↔cloud4 relayed through the server, every other pair direct", func() error {
			ps, err := c.paths()
			if err != nil {
				return err
			}
			var wrong []string
			for k, p := range ps {
				relayed := k == "cloud2→cloud4" || k == "cloud4→cloud2"
				switch {
				case relayed && (p.Kind != api.PathRelayed || p.Via != server.Name):
					wrong = append(wrong, fmt.Sprintf("%s is %s via %q (%s), want relayed via %s", k, p.Kind, p.Via, p.Reason, server.Name))
				case !relayed && p.Kind != api.PathDirect:
					wrong = append(wrong, fmt.Sprintf("%s is %s via %q (%s), want direct", k, p.Kind, p.Via, p.Reason))
				}
			}
			if len(ps) != 12 {
				wrong = append(wrong, fmt.Sprintf("%d paths, want 12", len(ps)))
			}
			if len(wrong) > 0 {
				slices.Sort(wrong)
				return fmt.Errorf("%s", strings.Join(wrong, "; "))
			}
			return nil
		})
		t.Logf("cloud2↔cloud4 relayed %.1fs after the last agent started", time.Since(agent4.proc.StartedAt()).Seconds())
	})
	t.Run("3-endpoints", func(t *testing.T) {
		direct := []*member{server, agent2, agent3}
		c.checkEndpoints(t, direct, nodes, func(_, to *member) netip.Addr { return to.PublicIP })
		c.checkEndpoints(t, []*member{server, agent3, agent4}, nodes, func(from, to *member) netip.Addr {
			if from == agent4 || to == agent4 {
				return to.PublicIP6()
			}
			return to.PublicIP
		})
	})
	t.Run("4-pods-reach-pods", func(t *testing.T) {
		c.checkPods("IPv4-only, dual-stack and IPv6-only clouds", four, four, meshTimeout)
	})
	t.Run("5-no-plaintext", func(t *testing.T) {
		checkNoPlaintext(t, inet)
		if inet.MustCount("wg4") == 0 || inet.MustCount("wg6") == 0 {
			t.Errorf("want WireGuard over both families on the internet")
		}
	})
}
