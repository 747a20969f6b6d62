//go:build e2e

package e2e

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
)

// Addresses of the Tailscale labs: the control server and three clouds.
const (
	tsCtlCIDR     = "198.18.0.2/24"
	tsApprovalFor = "5s" // --vpn-route-approval-timeout in these tests
)

// vpnAuth is a --vpn-auth value for tn.
func vpnAuth(tn *Tailnet, key, hostname string) string {
	return fmt.Sprintf("name=tailscale,joinKey=%s,controlServerURL=%s,extraArgs=--hostname=%s --accept-dns=false", key, tn.URL, hostname)
}

// waitExit waits for p to exit and returns its log.
func waitExit(t *testing.T, p *Proc, timeout time.Duration) string {
	t.Helper()
	WaitFor(t, timeout, p.Name+" to exit", func() error {
		if p.Running() {
			return fmt.Errorf("still running")
		}
		return nil
	})
	return p.Log()
}

// checkNoSecret fails if the join key shows in the arguments of any process
// on the machine (but those in allowed, which were given it on their
// command line by the test, as a user may) or in the logs of procs (but the
// harness's own start lines, which echo the command line).
func checkNoSecret(t *testing.T, secret string, allowed []*Proc, procs ...*Proc) {
	t.Helper()
	ok := map[string]bool{}
	for _, p := range allowed {
		ok[fmt.Sprint(p.Pid())] = true
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && !ok[e.Name()] && strings.Contains(string(b), secret) {
			t.Errorf("process %s has the join key in its arguments: %q", e.Name(), strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	for _, p := range procs {
		for _, line := range strings.Split(p.Log(), "\n") {
			if strings.Contains(line, secret) && !strings.HasPrefix(line, "=== ") {
				t.Errorf("the join key is in the log of %s (%s): %s", p.Name, p.LogPath, line)
			}
		}
	}
}

// TestTailscaleCluster is the seed's Tailscale integration: three nodes in
// three clouds join a tailnet of a self-hosted control server
// (controlServerURL), form a cluster over it, and their pods reach each
// other through Tailscale subnet routes.
func TestTailscaleCluster(t *testing.T) {
	lab := NewLab(t)
	inet := lab.Internet()
	inet.Counter("cluster", "ip saddr "+clusterCIDR, "ip daddr "+clusterCIDR)
	inet.Counter("tailscale", "udp dport 41641", "udp sport 41641")
	tn := lab.NewTailnet(tsCtlCIDR, clusterCIDR)
	c := newCluster(t, lab, overTailnet(tn))
	ts1 := tn.Start(lab.Machine("ts1", "198.51.100.10/24", nil, ""))
	ts2 := tn.Start(lab.Machine("ts2", "203.0.113.20/24", nil, ""))
	ts3 := tn.Start(lab.Machine("ts3", "192.0.2.30/24", nil, ""))

	// ts3's operator had it on the tailnet already, routing a LAN of its
	// own: Trellis must neither log in again nor drop that route.
	userRoute := netip.MustParsePrefix("10.99.3.0/24")
	if err := ts3.Up("--advertise-routes=" + userRoute.String()); err != nil {
		t.Fatalf("tailscale up on ts3 (as its operator): %v", err)
	}

	start := time.Now()
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
	serverURL := "https://" + netip.AddrPortFrom(serverIPs[0], serverPort).String() // over the tailnet

	authFile := filepath.Join(lab.TempDir("ts2-vpn"), "vpn-auth")
	if err := os.WriteFile(authFile, []byte("\n"+vpnAuth(tn, tn.AuthKey, "ts2")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	agent2 := c.startAgent(ts2.Node, withServerURL(serverURL), withFlags("--vpn-auth-file", authFile))
	agent3 := c.startAgent(ts3.Node, withServerURL(serverURL), withEnv("TRELLIS_VPN_AUTH="+vpnAuth(tn, tn.AuthKey, "ts3")))
	three := []*member{server, agent2, agent3}
	for _, m := range three {
		c.attachPod(m)
	}
	if failed := c.firstPackets("first start", three, three, joinTimeout); len(failed) > 0 {
		t.Errorf("pods do not reach each other over the tailnet within %v:\n%s", joinTimeout, strings.Join(failed, "\n"))
	}
	t.Logf("cluster over the tailnet: all nodes' pods reach each other %.2fs after the server started", time.Since(start).Seconds())
	defer func() {
		t.Logf("time from a node's start to its pod's first packet through to each peer's pod:\n%s", strings.Join(c.timings, "\n"))
	}()

	var nodes map[string]api.Node
	t.Run("1-nodes-use-tailscale", func(t *testing.T) {
		nodes = c.waitNodes(three...)
		WaitFor(t, joinTimeout, "every node to report approved pod CIDR routes", func() error {
			var err error
			if nodes, err = c.nodes(); err != nil {
				return err
			}
			for _, m := range three {
				if v := nodes[m.Name].VPN; v == nil || !v.RoutesApproved {
					return fmt.Errorf("%s: vpn status %+v", m.Name, v)
				}
			}
			return nil
		})
		for _, ts := range []*TSNode{ts1, ts2, ts3} {
			n := nodes[ts.Name]
			ips, err := ts.IPs()
			if err != nil {
				t.Fatal(err)
			}
			got := slices.Clone(n.InternalIPs)
			slices.SortFunc(got, netip.Addr.Compare)
			if !slices.Equal(got, ips) || len(ips) < 2 {
				t.Errorf("node %s: want its Tailscale IPs %v (IPv4 and IPv6) as node IPs, got %v", ts.Name, ips, n.InternalIPs)
			}
			if !n.PublicKey.IsZero() || n.ListenPort != 0 {
				t.Errorf("node %s: want no WireGuard key and port with the VPN carrier, got %s:%d", ts.Name, n.PublicKey, n.ListenPort)
			}
			if _, err := ts.Exec("ip", "link", "show", wgIface); err == nil {
				t.Errorf("node %s has a %s interface: the WireGuard data plane must not start with --vpn-auth", ts.Name, wgIface)
			}
			if n.VPN == nil || n.VPN.Provider != "tailscale" || !slices.Equal(n.VPN.Routes, n.PodCIDRs) {
				t.Errorf("node %s: want vpn status of tailscale with routes %v, got %+v", ts.Name, n.PodCIDRs, n.VPN)
			}
			routes, err := ts.AdvertisedRoutes()
			if err != nil {
				t.Fatal(err)
			}
			want := slices.Clone(n.PodCIDRs)
			if ts == ts3 {
				want = append(want, userRoute)
			}
			slices.SortFunc(want, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
			if !slices.Equal(routes, want) {
				t.Errorf("node %s advertises %v, want %v (its pod CIDRs added to what it advertised before)", ts.Name, routes, want)
			}
		}
		if !strings.Contains(agent3.proc.Log(), "not logging in again") {
			t.Errorf("ts3 was logged in and running: want the agent to say it does not log in again")
		}
		// The serving certificate names the server's Tailscale IPs (the
		// agents joined through one of them, so TLS checked it too).
		b, err := os.ReadFile(filepath.Join(server.dataDir, "server", "tls", "serving.crt"))
		if err != nil {
			t.Fatal(err)
		}
		blk, _ := pem.Decode(b)
		cert, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		for _, ip := range serverIPs {
			if !slices.ContainsFunc(cert.IPAddresses, func(x net.IP) bool { a, _ := netip.AddrFromSlice(x); return a.Unmap() == ip }) {
				t.Errorf("serving certificate IP SANs %v lack the server's Tailscale IP %s", cert.IPAddresses, ip)
			}
		}
	})
	if t.Failed() {
		t.FailNow()
	}

	t.Run("2-pods-reach-pods", func(t *testing.T) {
		c.checkPods("over the tailnet", three, three, meshTimeout)
	})

	t.Run("3-pod-traffic-inside-tailscale", func(t *testing.T) {
		plain, wg := inet.MustCount("cluster"), inet.MustCount("tailscale")
		t.Logf("internet router: %d packets with cluster addresses, %d Tailscale (UDP 41641) packets", plain, wg)
		if plain != 0 {
			t.Errorf("the internet router forwarded %d packets with addresses in %s: pod traffic must cross inside Tailscale", plain, clusterCIDR)
		}
		if wg == 0 {
			t.Errorf("no Tailscale packets crossed the internet router: the pods' traffic did not go over the tailnet")
		}
	})

	t.Run("4-join-key-not-shown", func(t *testing.T) {
		// The server got the key on its command line (--vpn-auth), as a
		// user may; tailscale up must not get it there from Trellis.
		checkNoSecret(t, tn.AuthKey, []*Proc{server.proc, tn.ctlProc}, server.proc, agent2.proc, agent3.proc)
	})

	t.Run("5-node-delete-withdraws-routes", func(t *testing.T) {
		pod3 := nodes[agent3.Name].PodCIDRs
		if out, err := c.cli("node", "delete", agent3.Name); err != nil {
			t.Fatalf("trellis node delete: %v (%q)", err, out)
		}
		WaitFor(t, 30*time.Second, "ts3 to withdraw its pod CIDR route and keep its own", func() error {
			routes, err := ts3.AdvertisedRoutes()
			if err != nil {
				return err
			}
			if !slices.Equal(routes, []netip.Prefix{userRoute}) {
				return fmt.Errorf("advertises %v (pod CIDR %v)", routes, pod3)
			}
			return nil
		})
		if out, _ := ts3.Exec("ip", "route", "show", clusterCIDR); strings.Contains(out, "tailscale0") {
			t.Errorf("ts3 still routes %s to tailscale0 after leaving: %s", clusterCIDR, out)
		}
		c.checkPods("after deleting a node", three[:2], three[:2], meshTimeout)
	})

	t.Run("6-cleanup-withdraws-routes", func(t *testing.T) {
		if err := agent2.proc.Stop(); err != nil {
			t.Fatal(err)
		}
		before, err := ts2.AdvertisedRoutes()
		if err != nil || len(before) != 1 {
			t.Fatalf("ts2 advertises %v (%v) after its agent stopped: a restart must not withdraw routes", before, err)
		}
		out, err := lab.Output(ts2.NS, "env", "PATH="+ts2.PathDir+":"+os.Getenv("PATH"), c.bin, "cleanup", "--data-dir", agent2.dataDir)
		if err != nil {
			t.Fatalf("trellis cleanup: %v (%q)", err, out)
		}
		if routes, err := ts2.AdvertisedRoutes(); err != nil || len(routes) != 0 {
			t.Errorf("after trellis cleanup ts2 advertises %v (%v), want nothing", routes, err)
		}
	})
}

// TestTailscaleWrongJoinKey: a node whose join key the control server
// refuses stops with tailscale's message and a non-zero exit, and the key
// shows nowhere.
func TestTailscaleWrongJoinKey(t *testing.T) {
	lab := NewLab(t)
	tn := lab.NewTailnet(tsCtlCIDR, clusterCIDR)
	c := newCluster(t, lab, overTailnet(tn))
	ts1 := tn.Start(lab.Machine("ts1", "198.51.100.10/24", nil, ""))
	wrong := "tskey-wrong-" + fmt.Sprint(time.Now().UnixNano())
	m := c.startServer(ts1.Node, withEnv("TRELLIS_VPN_AUTH="+vpnAuth(tn, wrong, "ts1")), noWait())
	time.Sleep(500 * time.Millisecond)
	checkNoSecret(t, wrong, nil) // while it runs
	log := waitExit(t, m.proc, 90*time.Second)
	if !strings.Contains(log, "exit status 1") {
		t.Errorf("want exit status 1, log:\n%s", log)
	}
	for _, want := range []string{"join the tailnet (tailscale up)", "invalid", "check the joinKey"} {
		if !strings.Contains(log, want) {
			t.Errorf("want %q in the log:\n%s", want, log)
		}
	}
	checkNoSecret(t, wrong, nil, m.proc)
}

// TestTailscaleRoutesNotApproved: a control server that does not approve
// the pod CIDR routes by itself. The nodes say so, in their logs and in
// trellis nodes, with the autoApprovers stanza for the cluster's CIDRs, and
// notice when the routes are approved by hand.
func TestTailscaleRoutesNotApproved(t *testing.T) {
	lab := NewLab(t)
	tn := lab.NewTailnet(tsCtlCIDR, "")
	c := newCluster(t, lab, overTailnet(tn))
	ts1 := tn.Start(lab.Machine("ts1", "198.51.100.10/24", nil, ""))
	const v6CIDR = clusterCIDR6
	server := c.startServer(ts1.Node, withClusterCIDR(clusterCIDR+","+v6CIDR), withVPNAuth(vpnAuth(tn, tn.AuthKey, "ts1")))
	stanzaLine4 := fmt.Sprintf("%q: [", clusterCIDR)
	stanzaLine6 := fmt.Sprintf("%q: [", v6CIDR)
	WaitFor(t, joinTimeout, "the server's node to warn about unapproved routes", func() error {
		if err := server.proc.Err(); err != nil {
			return err
		}
		log := server.proc.Log()
		// The log quotes the message (logfmt): the stanza's quotes are
		// escaped there.
		for _, want := range []string{"has not approved this node's pod CIDR routes", `\"autoApprovers\": {`, `\"routes\": {`,
			`\"` + clusterCIDR + `\": [`, `\"` + v6CIDR + `\": [`} {
			if !strings.Contains(log, want) {
				return fmt.Errorf("no %q in the log yet", want)
			}
		}
		return nil
	})
	var node api.Node
	WaitFor(t, joinTimeout, "trellis nodes to show the unapproved routes", func() error {
		nodes, err := c.nodes()
		if err != nil {
			return err
		}
		node = nodes["ts1"]
		if node.VPN == nil || node.VPN.RoutesApproved || !strings.Contains(node.VPN.Warning, stanzaLine4) || !strings.Contains(node.VPN.Warning, stanzaLine6) {
			return fmt.Errorf("vpn status %+v", node.VPN)
		}
		return nil
	})
	table, err := c.cli("nodes")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"ROUTES-APPROVED", "False", "WARNING: node ts1:", "autoApprovers", stanzaLine4, stanzaLine6} {
		if !strings.Contains(table, want) {
			t.Errorf("trellis nodes: want %q in:\n%s", want, table)
		}
	}
	t.Logf("trellis nodes:\n%s", table)

	if err := tn.Approve("ts1", node.PodCIDRs...); err != nil {
		t.Fatal(err)
	}
	WaitFor(t, joinTimeout, "trellis nodes to show the routes approved", func() error {
		nodes, err := c.nodes()
		if err != nil {
			return err
		}
		if v := nodes["ts1"].VPN; v == nil || !v.RoutesApproved || v.Warning != "" {
			return fmt.Errorf("vpn status %+v", v)
		}
		return nil
	})
}

// TestTailscaleForeignPrefix: another tailnet node already routes the
// cluster CIDR (another cluster on the same tailnet). A server with that
// CIDR refuses to start; with another --cluster-cidr it starts.
func TestTailscaleForeignPrefix(t *testing.T) {
	lab := NewLab(t)
	tn := lab.NewTailnet(tsCtlCIDR, "10.0.0.0/8")
	c := newCluster(t, lab, overTailnet(tn))
	foreign := tn.Start(lab.Machine("other", "203.0.113.20/24", nil, ""))
	if err := foreign.Up("--advertise-routes=10.42.0.0/16"); err != nil {
		t.Fatal(err)
	}
	WaitFor(t, joinTimeout, "the control server to approve the foreign route", func() error {
		nodes, err := tn.Nodes()
		if err != nil {
			return err
		}
		if !slices.Contains(nodes["other"].Approved, netip.MustParsePrefix("10.42.0.0/16")) {
			return fmt.Errorf("nodes: %+v", nodes)
		}
		return nil
	})
	ts1 := tn.Start(lab.Machine("ts1", "198.51.100.10/24", nil, ""))
	m := c.startServer(ts1.Node, withVPNAuth(vpnAuth(tn, tn.AuthKey, "ts1")), noWait())
	log := waitExit(t, m.proc, 2*joinTimeout)
	for _, want := range []string{`VPN node "other"`, "10.42.0.0/16", "not a node of this cluster", "Choose another --cluster-cidr", "exit status 1"} {
		if !strings.Contains(log, want) {
			t.Errorf("want %q in the log:\n%s", want, log)
		}
	}
	if routes, err := ts1.AdvertisedRoutes(); err != nil || len(routes) != 0 {
		t.Errorf("the refused node advertises %v (%v), want nothing", routes, err)
	}

	// Another range on a fresh data dir: no clash.
	c2 := newCluster(t, lab, overTailnet(tn))
	ok := c2.startServer(ts1.Node, withClusterCIDR("10.77.0.0/16"), withVPNAuth(vpnAuth(tn, tn.AuthKey, "ts1")))
	c2.waitNodes(ok)
}
