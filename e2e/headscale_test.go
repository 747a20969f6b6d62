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

// hsDualCIDRs is the seed page's dual-stack cluster CIDR.
const hsDualCIDRs = clusterCIDR + "," + hsClusterCIDR6

// TestHeadscaleDualStack: three nodes in three clouds join a real
// headscale's tailnet with the seed's dual-stack policy, trellis doing
// `tailscale up` itself from --vpn-auth, --vpn-auth-file and
// TRELLIS_VPN_AUTH. headscale approves every node's IPv4 and IPv6 pod CIDR
// by itself, the nodes see it, and IPv4 and IPv6 pods on the three nodes
// reach each other; the pods keep talking while headscale is down and
// after it restarts, and the nodes reconnect without logging in again.
// The same cluster over the test control server (subtest testcontrol)
// gives the timings to compare.
func TestHeadscaleDualStack(t *testing.T) {
	for _, v := range headscaleVersions() {
		t.Run(v, func(t *testing.T) {
			lab := NewLab(t)
			hs := lab.NewHeadscale(v, tsCtlCIDR, seedPolicy(fmt.Sprintf("%q", hsUserEmail), "", ""))
			dualStackOverTailnet(t, lab, hs.Tailnet, hs)
		})
	}
	t.Run("testcontrol", func(t *testing.T) {
		lab := NewLab(t)
		tn := lab.NewTailnet(tsCtlCIDR, hsDualCIDRs)
		dualStackOverTailnet(t, lab, tn, nil)
	})
}

// dualStackOverTailnet runs the dual-stack cluster over tn; with hs (tn is
// then hs's) it also checks headscale's approvals and restarts it.
func dualStackOverTailnet(t *testing.T, lab *Lab, tn *Tailnet, hs *Headscale) {
	ctl := "testcontrol"
	if hs != nil {
		ctl = "headscale " + hs.Version
	}
	inet := lab.Internet()
	inet.Counter("cluster", "ip saddr "+clusterCIDR, "ip daddr "+clusterCIDR)
	inet.Counter("tailscale", "udp dport 41641", "udp sport 41641")
	c := newCluster(t, lab, overTailnet(tn), withClusterCIDR(hsDualCIDRs))
	ts1 := tn.Start(lab.Machine("ts1", "198.51.100.10/24", nil, ""))
	ts2 := tn.Start(lab.Machine("ts2", "203.0.113.20/24", nil, ""))
	ts3 := tn.Start(lab.Machine("ts3", "192.0.2.30/24", nil, ""))

	server := c.startServer(ts1.Node, withVPNAuth(vpnAuth(tn, tn.AuthKey, "ts1")))
	var serverIPs []netip.Addr
	WaitFor(t, joinTimeout, "the server's node on the tailnet", func() error {
		var err error
		serverIPs, err = ts1.IPs()
		if err == nil && len(serverIPs) == 0 {
			err = fmt.Errorf("no address yet")
		}
		return err
	})
	serverURL := "https://" + netip.AddrPortFrom(serverIPs[0], serverPort).String()
	authFile := filepath.Join(lab.TempDir("ts2-vpn"), "vpn-auth")
	if err := os.WriteFile(authFile, []byte(vpnAuth(tn, tn.AuthKey, "ts2")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	agent2 := c.startAgent(ts2.Node, withServerURL(serverURL), withFlags("--vpn-auth-file", authFile))
	agent3 := c.startAgent(ts3.Node, withServerURL(serverURL), withEnv("TRELLIS_VPN_AUTH="+vpnAuth(tn, tn.AuthKey, "ts3")))
	three := []*member{server, agent2, agent3}
	t.Cleanup(func() {
		if t.Failed() { // what each node's tailscale says of itself and its peers
			for _, ts := range []*TSNode{ts1, ts2, ts3} {
				out, err := ts.CLI("status", "--json")
				t.Logf("%s: tailscale status --json (err %v):\n%s", ts.Name, err, out)
			}
		}
	})

	// server start → first ping from its pod to another node's pod, per
	// family (the measurement the docs quote).
	c.attachPod(server)
	c.attachPod(agent2)
	c.attachPod(agent3)
	for _, v6 := range c.families() {
		fam := "IPv4"
		if v6 {
			fam = "IPv6"
		}
		dst := c.podIP(agent2, v6)
		if err := Poll(joinTimeout, func() error { return server.pod.Ping(dst) }); err != nil {
			t.Fatalf("%s pod of ts1 → ts2 (%s) over %s: %v", fam, dst, ctl, err)
		}
		t.Logf("measured: %s: trellis server --vpn-auth start → first %s pod ping ts1 → ts2: %.2fs (agent ts2 started %.2fs after the server)",
			ctl, fam, time.Since(server.proc.StartedAt()).Seconds(), agent2.proc.StartedAt().Sub(server.proc.StartedAt()).Seconds())
	}
	if failed := c.firstPackets("first start", three, three, joinTimeout); len(failed) > 0 {
		t.Fatalf("pods do not reach each other over %s within %v:\n%s", ctl, joinTimeout, strings.Join(failed, "\n"))
	}
	t.Logf("measured: %s: each node's start → its pod's first ping through to each peer's pod:\n%s", ctl, strings.Join(c.timings, "\n"))

	nodes := c.waitNodes(three...)
	WaitFor(t, joinTimeout, "every node to report its IPv4 and IPv6 pod CIDR routes approved", func() error {
		var err error
		if nodes, err = c.nodes(); err != nil {
			return err
		}
		for _, m := range three {
			n := nodes[m.Name]
			if len(n.PodCIDRs) != 2 {
				return Permanent(fmt.Errorf("%s: want an IPv4 and an IPv6 pod CIDR, got %v", m.Name, n.PodCIDRs))
			}
			if v := n.VPN; v == nil || !v.RoutesApproved || !slices.Equal(v.Routes, n.PodCIDRs) || v.Warning != "" {
				return fmt.Errorf("%s: vpn status %+v", m.Name, v)
			}
		}
		return nil
	})
	if hs != nil {
		routes, err := hs.Routes()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range three {
			want := slices.Clone(nodes[m.Name].PodCIDRs)
			slices.SortFunc(want, comparePrefixes)
			if got := routes[m.Name]; !slices.Equal(got.Approved, want) || !slices.Equal(got.Available, want) {
				t.Errorf("headscale lists %s with routes %+v, want %v advertised and auto-approved", m.Name, got, want)
			}
		}
		t.Logf("headscale nodes list-routes: %+v", routes)
	}
	c.checkPods("over "+ctl, three, three, meshTimeout)
	if plain := inet.MustCount("cluster"); plain != 0 {
		t.Errorf("the internet router forwarded %d packets with addresses in %s: pod traffic must cross inside Tailscale", plain, clusterCIDR)
	}
	if inet.MustCount("tailscale") == 0 {
		t.Errorf("no Tailscale packets crossed the internet router")
	}
	if hs == nil {
		return
	}

	t.Run("restart-under-traffic", func(t *testing.T) {
		ids := hsNodeIDs(t, hs)
		pingers := startPingers(c, []*member{server, agent2, agent3})
		if err := hs.Proc.Stop(); err != nil {
			t.Fatal(err)
		}
		c.checkPods("while headscale is down", three, three, meshTimeout)
		start := time.Now()
		if err := hs.Restart(); err != nil {
			t.Fatal(err)
		}
		WaitFor(t, joinTimeout, "every node online in headscale again", func() error {
			out, err := hs.CLI("nodes", "list", "-o", "json")
			if err != nil {
				return err
			}
			list, err := parseHSNodes(out)
			if err != nil {
				return Permanent(err)
			}
			for _, n := range list {
				if !n.Online {
					return fmt.Errorf("%s offline", n.GivenName)
				}
			}
			if len(list) != 3 {
				return fmt.Errorf("%d nodes", len(list))
			}
			return nil
		})
		t.Logf("measured: headscale %s restart → all three nodes online again: %.2fs", hs.Version, time.Since(start).Seconds())
		c.checkPods("after headscale restarted", three, three, meshTimeout)
		sent, lost := pingers.stop()
		t.Logf("measured: headscale %s stop+restart under traffic: %d pod pings (IPv4+IPv6, 5/s per pair), %d unanswered", hs.Version, sent, lost)
		if sent == 0 || lost*10 > sent {
			t.Errorf("pods did not keep talking through the headscale restart: %d of %d pings unanswered", lost, sent)
		}
		if got := hsNodeIDs(t, hs); !slices.Equal(got, ids) {
			t.Errorf("headscale's nodes were %v before the restart and %v after: the nodes must reconnect, not register again", ids, got)
		}
		for _, m := range three {
			if n := strings.Count(m.proc.Log(), "joining the tailnet"); n != 1 {
				t.Errorf("%s's log says %d times that it joins the tailnet, want once (no re-auth after a headscale restart)", m.Name, n)
			}
		}
		WaitFor(t, joinTimeout, "every node to report its routes approved after the restart", func() error {
			nodes, err := c.nodes()
			if err != nil {
				return err
			}
			for _, m := range three {
				if v := nodes[m.Name].VPN; v == nil || !v.RoutesApproved {
					return fmt.Errorf("%s: vpn status %+v", m.Name, v)
				}
			}
			return nil
		})
	})
}

// hsNode is a node as `headscale nodes list -o json` prints it.
type hsNode struct {
	ID        json.Number `json:"id"`
	GivenName string      `json:"given_name"`
	Online    bool        `json:"online"`
}

func parseHSNodes(out string) ([]hsNode, error) {
	var list []hsNode
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		return nil, fmt.Errorf("headscale nodes list -o json: %w: %q", err, out)
	}
	return list, nil
}

// hsNodeIDs lists headscale's nodes as "name=id", sorted.
func hsNodeIDs(t *testing.T, hs *Headscale) []string {
	t.Helper()
	out, err := hs.CLI("nodes", "list", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	list, err := parseHSNodes(out)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, n := range list {
		ids = append(ids, n.GivenName+"="+n.ID.String())
	}
	slices.Sort(ids)
	return ids
}

// pingers ping from each member's pod to every other member's pods, on
// each family, five times a second, until stop.
type pingers struct {
	done       chan struct{}
	wg         sync.WaitGroup
	mu         sync.Mutex
	sent, lost int
}

func startPingers(c *cluster, ms []*member) *pingers {
	p := &pingers{done: make(chan struct{})}
	for _, a := range ms {
		for _, b := range ms {
			if a == b {
				continue
			}
			for _, v6 := range c.families() {
				dst := c.podIP(b, v6)
				p.wg.Go(func() {
					tick := time.NewTicker(200 * time.Millisecond)
					defer tick.Stop()
					for {
						select {
						case <-p.done:
							return
						case <-tick.C:
						}
						err := pingWait(a.lab, a.pod.NS, dst, "1")
						p.mu.Lock()
						p.sent++
						if err != nil {
							p.lost++
						}
						p.mu.Unlock()
					}
				})
			}
		}
	}
	return p
}

// stop stops the pingers and returns how many pings they sent and how
// many went unanswered.
func (p *pingers) stop() (sent, lost int) {
	close(p.done)
	p.wg.Wait()
	return p.sent, p.lost
}

// forEachHeadscale runs f in a subtest per headscale version, each with a
// lab of its own and headscale started on it with policy.
func forEachHeadscale(t *testing.T, policy string, f func(t *testing.T, lab *Lab, hs *Headscale)) {
	for _, v := range headscaleVersions() {
		t.Run(v, func(t *testing.T) {
			lab := NewLab(t)
			f(t, lab, lab.NewHeadscale(v, tsCtlCIDR, policy))
		})
	}
}

// waitVPNWarning waits until `trellis nodes` shows a VPN warning on node
// name that contains every one of wants, and the node's log has it too
// (logfmt escapes its quotes: only wants without quotes are looked for
// there), and returns the node.
func waitVPNWarning(t *testing.T, c *cluster, m *member, wants ...string) api.Node {
	t.Helper()
	var node api.Node
	WaitFor(t, joinTimeout, m.Name+" to warn in trellis nodes", func() error {
		if err := m.proc.Err(); err != nil {
			return err
		}
		nodes, err := c.nodes()
		if err != nil {
			return err
		}
		node = nodes[m.Name]
		if node.VPN == nil {
			return fmt.Errorf("no vpn status")
		}
		for _, w := range wants {
			if !strings.Contains(node.VPN.Warning, w) {
				return fmt.Errorf("no %q in the warning %q", w, node.VPN.Warning)
			}
		}
		return nil
	})
	log := m.proc.Log()
	for _, w := range wants {
		if !strings.Contains(w, `"`) && !strings.Contains(log, w) {
			t.Errorf("%s's log lacks %q", m.Name, w)
		}
	}
	table, err := c.cli("nodes")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(table, "WARNING: node "+m.Name+":") {
		t.Errorf("trellis nodes prints no warning for %s:\n%s", m.Name, table)
	}
	t.Logf("trellis nodes:\n%s", table)
	return node
}

// printedStanza is the autoApprovers stanza at the end of a warning.
func printedStanza(t *testing.T, warning string) string {
	t.Helper()
	i := strings.Index(warning, `"autoApprovers": {`)
	if i < 0 {
		t.Fatalf("no autoApprovers stanza in %q", warning)
	}
	return warning[i:]
}

// waitApproved waits until `trellis nodes` shows the routes of every one
// of ms approved, with no warning.
func waitApproved(t *testing.T, c *cluster, ms ...*member) {
	t.Helper()
	took := WaitFor(t, joinTimeout, "trellis nodes to show the routes approved", func() error {
		nodes, err := c.nodes()
		if err != nil {
			return err
		}
		for _, m := range ms {
			if v := nodes[m.Name].VPN; v == nil || !v.RoutesApproved || v.Warning != "" {
				return fmt.Errorf("%s: vpn status %+v", m.Name, v)
			}
		}
		return nil
	})
	t.Logf("trellis nodes showed the routes approved after %.1fs", took.Seconds())
}

// startAgentVia starts an agent on ts that joins the cluster's server at
// the server node's tailnet IPv4 address, with vpnAuth opts.
func startAgentVia(t *testing.T, c *cluster, server, ts *TSNode, opts ...option) *member {
	t.Helper()
	ips, err := server.IPs()
	if err != nil || len(ips) == 0 {
		t.Fatalf("%s's tailnet addresses: %v %v", server.Name, ips, err)
	}
	return c.startAgent(ts.Node, append([]option{withServerURL("https://" + netip.AddrPortFrom(ips[0], serverPort).String())}, opts...)...)
}

// waitHSApproved waits until headscale lists every advertised route of
// each of names approved.
func waitHSApproved(t *testing.T, hs *Headscale, names ...string) {
	t.Helper()
	WaitFor(t, joinTimeout, fmt.Sprintf("headscale to approve the routes of %v", names), func() error {
		routes, err := hs.Routes()
		if err != nil {
			return err
		}
		for _, n := range names {
			if r := routes[n]; len(r.Available) == 0 || !slices.Equal(r.Approved, r.Available) {
				return fmt.Errorf("%s: %+v", n, r)
			}
		}
		return nil
	})
}

// TestHeadscaleApproverMatchesNoUser: the policy's approver names no
// headscale user (a typo: headscale says nothing, the routes stay
// unapproved). After --vpn-route-approval-timeout the nodes say so, in
// their logs and in trellis nodes, with an autoApprovers stanza for both
// families that names the node's user; that stanza, pasted into the policy
// as it is, gets both nodes' routes approved, and trellis nodes shows it.
func TestHeadscaleApproverMatchesNoUser(t *testing.T) {
	forEachHeadscale(t, seedPolicy(`"nobody@example.com"`, "", ""), func(t *testing.T, lab *Lab, hs *Headscale) {
		c := newCluster(t, lab, overTailnet(hs.Tailnet), withClusterCIDR(hsDualCIDRs))
		ts1 := hs.Start(lab.Machine("ts1", "198.51.100.10/24", nil, ""))
		ts2 := hs.Start(lab.Machine("ts2", "203.0.113.20/24", nil, ""))
		server := c.startServer(ts1.Node, withVPNAuth(vpnAuth(hs.Tailnet, hs.AuthKey, "ts1")))
		agent := startAgentVia(t, c, ts1, ts2, withVPNAuth(vpnAuth(hs.Tailnet, hs.AuthKey, "ts2")))
		owner := fmt.Sprintf("[%q]", hsUserEmail)
		var node api.Node
		for _, m := range []*member{server, agent} {
			node = waitVPNWarning(t, c, m, "has not approved this node's pod CIDR routes",
				fmt.Sprintf("%q: %s,", clusterCIDR, owner), fmt.Sprintf("%q: %s,", hsClusterCIDR6, owner))
		}
		if node.VPN.RoutesApproved {
			t.Errorf("vpn status %+v: routes approved, but the approver matches no user", node.VPN)
		}
		routes, err := hs.Routes()
		if err != nil {
			t.Fatal(err)
		}
		if len(routes["ts1"].Approved) != 0 || len(routes["ts1"].Available) != 2 {
			t.Fatalf("headscale lists ts1 with %+v: want two routes advertised, none approved", routes["ts1"])
		}
		stanza := printedStanza(t, node.VPN.Warning)
		if err := hs.SetPolicy("{\n" + stanza + "\n}\n"); err != nil {
			t.Fatal(err)
		}
		waitHSApproved(t, hs, "ts1", "ts2")
		waitApproved(t, c, server, agent)
	})
}

// TestHeadscaleTaggedKey: the nodes join with a tagged pre-auth key and the
// policy approves the user who owns the tag, which headscale never applies
// to a tagged node. The nodes say so, naming their tag; the stanza they
// print (with the policy's tagOwners) gets the routes approved.
func TestHeadscaleTaggedKey(t *testing.T) {
	const tag = "tag:trellis"
	tagOwners := fmt.Sprintf(`"tagOwners": {%q: [%q]},`, tag, hsUserEmail)
	forEachHeadscale(t, seedPolicy(fmt.Sprintf("%q", hsUserEmail), "", tagOwners), func(t *testing.T, lab *Lab, hs *Headscale) {
		key, err := hs.NewKey(tag)
		if err != nil {
			t.Fatal(err)
		}
		c := newCluster(t, lab, overTailnet(hs.Tailnet), withClusterCIDR(hsDualCIDRs))
		ts1 := hs.Start(lab.Machine("ts1", "198.51.100.10/24", nil, ""))
		authFile := filepath.Join(lab.TempDir("ts1-vpn"), "vpn-auth")
		if err := os.WriteFile(authFile, []byte(vpnAuth(hs.Tailnet, key, "ts1")), 0o600); err != nil {
			t.Fatal(err)
		}
		ts2 := hs.Start(lab.Machine("ts2", "203.0.113.20/24", nil, ""))
		server := c.startServer(ts1.Node, withFlags("--vpn-auth-file", authFile))
		agent := startAgentVia(t, c, ts1, ts2, withVPNAuth(vpnAuth(hs.Tailnet, key, "ts2")))
		owner := fmt.Sprintf("[%q]", tag)
		var node api.Node
		for _, m := range []*member{server, agent} {
			node = waitVPNWarning(t, c, m, "has not approved this node's pod CIDR routes", "tagged key ("+tag+")", "tagOwners",
				fmt.Sprintf("%q: %s,", clusterCIDR, owner), fmt.Sprintf("%q: %s,", hsClusterCIDR6, owner))
		}
		stanza := printedStanza(t, node.VPN.Warning)
		if err := hs.SetPolicy("{\n" + tagOwners + "\n" + stanza + "\n}\n"); err != nil {
			t.Fatal(err)
		}
		waitHSApproved(t, hs, "ts1", "ts2")
		waitApproved(t, c, server, agent)
		checkNoSecret(t, key, []*Proc{agent.proc}, server.proc, agent.proc)
	})
}

// TestHeadscaleDenyAll: a policy with "acls": [] lets no traffic through
// (headscale approves the routes but sends them to no peer; an agent
// cannot even reach its server over the tailnet). The nodes detect it from
// their packet filter and say why, the agent while it waits for its
// server, with a rule to add; the rule the server's node prints, put in
// the policy, lets the agent join and the pods reach each other on both
// families.
func TestHeadscaleDenyAll(t *testing.T) {
	approver := fmt.Sprintf("%q", hsUserEmail)
	forEachHeadscale(t, seedPolicy(approver, `"acls": [],`, ""), func(t *testing.T, lab *Lab, hs *Headscale) {
		c := newCluster(t, lab, overTailnet(hs.Tailnet), withClusterCIDR(hsDualCIDRs))
		ts1 := hs.Start(lab.Machine("ts1", "198.51.100.10/24", nil, ""))
		ts2 := hs.Start(lab.Machine("ts2", "203.0.113.20/24", nil, ""))
		t.Cleanup(func() {
			if t.Failed() {
				for _, ts := range []*TSNode{ts1, ts2} {
					out, err := ts.CLI("debug", "localapi", "debug-packet-filter-matches")
					t.Logf("%s's packet filter (err %v):\n%s", ts.Name, err, out)
					out, err = ts.CLI("status")
					t.Logf("%s's tailscale status (err %v):\n%s", ts.Name, err, out)
				}
				out, err := hs.CLI("nodes", "list-routes")
				t.Logf("headscale nodes list-routes (err %v):\n%s", err, out)
			}
		})
		server := c.startServer(ts1.Node, withVPNAuth(vpnAuth(hs.Tailnet, hs.AuthKey, "ts1")))
		ips, err := ts1.IPs()
		if err != nil || len(ips) == 0 {
			t.Fatalf("ts1's tailnet addresses: %v %v", ips, err)
		}
		agent := startAgentVia(t, c, ts1, ts2, withVPNAuth(vpnAuth(hs.Tailnet, hs.AuthKey, "ts2")))
		rule := fmt.Sprintf(`{"action": "accept", "src": [%q, %q, %q], "dst": [%q, %q, %q]}`,
			hsUserEmail, clusterCIDR, hsClusterCIDR6, hsUserEmail+":*", clusterCIDR+":*", hsClusterCIDR6+":*")
		node := waitVPNWarning(t, c, server, "the tailnet policy lets no traffic from the cluster reach this node's pod CIDRs", `"acls": []`, rule)
		if !node.VPN.PolicyDenies {
			t.Errorf("vpn status %+v: want policyDenies", node.VPN)
		}
		WaitFor(t, joinTimeout, "ts2's agent to say that the policy denies all traffic, at start and while it waits for its server", func() error {
			if err := agent.proc.Err(); err != nil {
				return err
			}
			log := agent.proc.Log()
			for _, want := range []string{"the tailnet policy lets no traffic at all reach this node", "waiting for the server",
				"hint=\"the tailnet policy lets no traffic reach this node"} {
				if !strings.Contains(log, want) {
					return fmt.Errorf("no %q in its log", want)
				}
			}
			return nil
		})
		if err := ts2.Ping(ips[0]); err == nil {
			t.Errorf("ts2 reaches ts1's tailnet address %s with \"acls\": []", ips[0])
		}
		i := strings.Index(node.VPN.Warning, `{"action"`)
		if err := hs.SetPolicy(seedPolicy(approver, `"acls": [`+node.VPN.Warning[i:]+`],`, "")); err != nil {
			t.Fatal(err)
		}
		two := []*member{server, agent}
		c.waitNodes(two...)
		for _, m := range two {
			c.attachPod(m)
		}
		waitApproved(t, c, two...)
		c.checkPods("after the printed rule was added to the policy", two, two, meshTimeout)
	})
}

// TestHeadscaleSecondCluster: a second cluster with the same cluster CIDR
// on the same tailnet (the seed page's warning). Its server refuses to
// start, naming the first cluster's node that routes the range.
func TestHeadscaleSecondCluster(t *testing.T) {
	forEachHeadscale(t, seedPolicy(fmt.Sprintf("%q", hsUserEmail), "", ""), func(t *testing.T, lab *Lab, hs *Headscale) {
		ts1 := hs.Start(lab.Machine("ts1", "198.51.100.10/24", nil, ""))
		ts2 := hs.Start(lab.Machine("ts2", "203.0.113.20/24", nil, ""))
		first := newCluster(t, lab, overTailnet(hs.Tailnet))
		a := first.startServer(ts1.Node, withVPNAuth(vpnAuth(hs.Tailnet, hs.AuthKey, "ts1")))
		first.waitCNIConfig(a) // its pod CIDR is advertised
		waitHSApproved(t, hs, "ts1")
		second := newCluster(t, lab, overTailnet(hs.Tailnet))
		b := second.startServer(ts2.Node, withVPNAuth(vpnAuth(hs.Tailnet, hs.AuthKey, "ts2")), noWait())
		log := waitExit(t, b.proc, 2*joinTimeout)
		for _, want := range []string{`VPN node "ts1"`, "not a node of this cluster", clusterCIDR, "Choose another --cluster-cidr", "exit status 1"} {
			if !strings.Contains(log, want) {
				t.Errorf("want %q in the second server's log:\n%s", want, log)
			}
		}
		if routes, err := ts2.AdvertisedRoutes(); err != nil || len(routes) != 0 {
			t.Errorf("the refused node advertises %v (%v), want nothing", routes, err)
		}
		if err := a.proc.Err(); err != nil {
			t.Errorf("the first cluster's server: %v", err)
		}
	})
}
