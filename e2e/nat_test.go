//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
)

// paths runs `trellis paths -o json` and indexes the result by "from→to".
func (c *cluster) paths() (map[string]api.Path, error) {
	out, err := c.cli("paths", "-o", "json")
	if err != nil {
		return nil, err
	}
	var list []api.Path
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		return nil, fmt.Errorf("trellis paths -o json: %w; output %q", err, out)
	}
	m := map[string]api.Path{}
	for _, p := range list {
		m[p.From+"→"+p.To] = p
	}
	return m, nil
}

// waitPath waits until from reaches to by the given kind (and relay).
func (c *cluster) waitPath(from, to, kind, via string, timeout time.Duration) {
	c.t.Helper()
	WaitFor(c.t, timeout, fmt.Sprintf("path %s→%s to be %s %s", from, to, kind, via), func() error {
		ps, err := c.paths()
		if err != nil {
			return err
		}
		p := ps[from+"→"+to]
		if p.Kind != kind || p.Via != via {
			return fmt.Errorf("path is %s via %q (%s)", p.Kind, p.Via, p.Reason)
		}
		return nil
	})
}

// symmetricNAT makes a home's NAT router map every flow to a random port,
// as carrier-grade NATs do: hole punching cannot work through it.
func symmetricNAT(t *testing.T, lab *Lab, home string) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", lab.Prefix()+home+"-nat", "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(`flush chain ip nat postrouting
add rule ip nat postrouting oifname "eth0" masquerade fully-random
`)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("symmetric NAT on %s: %v: %s", home, err, out)
	}
}

// TestNATRelaysAndDynamicIPs is issue 4's end-to-end test: nodes in two
// homes behind NAT (one of them a symmetric NAT), two public relays, a
// cloud node whose public IP changes, and the seed's manual IP change.
func TestNATRelaysAndDynamicIPs(t *testing.T) {
	lab := NewLab(t)
	c := newCluster(t, lab)
	inet := lab.Internet()
	inet.Counter("cluster", "ip saddr "+clusterCIDR, "ip daddr "+clusterCIDR)

	srvNode := lab.Cloud("srv", "198.51.100.10/24", "10.1.0.10/24")
	raNode := lab.Cloud("ra", "203.0.113.20/24", "10.2.0.20/24")
	rbNode := lab.Cloud("rb", "192.0.2.30/24", "10.3.0.30/24")
	dynNode := lab.Cloud("mover", "198.51.100.40/24", "10.4.0.40/24")
	h1 := lab.Home("home1", "198.18.0.50/24", "192.168.1.10/24")
	h1b := lab.Machine("home1b", "", h1.LAN, "192.168.1.11/24")
	h2 := lab.Home("home2", "198.18.1.60/24", "192.168.2.10/24")
	symmetricNAT(t, lab, "home2")

	rbConfig := lab.TempDir("rb-config") + "/config.yaml"
	srv := c.startServer(srvNode)
	// Relays sort before the server ("ra" < "rb" < "srv"), so ra is the
	// first choice and rb the next.
	ra := c.startAgent(raNode, asRelay())
	rb := c.startAgent(rbNode, asRelay())
	// dyn has its public address on its interface and no flags: it must
	// find and follow its address itself.
	dyn := c.startAgent(dynNode, withAddressFlags())
	// Homes: no external IP (they have no public address of their own),
	// no port forwarding.
	home1 := c.startAgent(h1)
	home1b := c.startAgent(h1b)
	home2 := c.startAgent(h2)
	all := []*member{srv, ra, rb, dyn, home1, home1b, home2}
	for _, m := range all {
		c.attachPod(m)
	}
	c.waitNodes(all...)

	t.Run("0-homes-through-a-relay", func(t *testing.T) {
		// The symmetric NAT defeats hole punching: the first packet between
		// the homes waits for the agents to judge the direct path failing
		// (handshakeGrace) and the server to relay the pair.
		WaitFor(t, 90*time.Second, "home1 ↔ home2 pods", func() error {
			if err := home1.pod.Ping(home2.pod.IP); err != nil {
				return err
			}
			return home2.pod.Ping(home1.pod.IP)
		})
		t.Logf("measured: two homes behind NAT (one symmetric; direct fails, relayed) → first packet %.2fs after the later of them started", time.Since(home2.proc.StartedAt()).Seconds())
	})

	t.Run("1-every-pod-reaches-every-pod", func(t *testing.T) {
		c.checkPods("homes behind NAT and clouds", all, all, 90*time.Second)
	})
	if t.Failed() {
		t.FailNow()
	}

	t.Run("2-paths", func(t *testing.T) {
		// The symmetric NAT defeats hole punching: home1 and home2 are
		// relayed, through the first relay.
		c.waitPath("home1", "home2", api.PathRelayed, "ra", 60*time.Second)
		c.waitPath("home2", "home1", api.PathRelayed, "ra", 5*time.Second)
		// Behind one NAT: direct on the LAN.
		c.waitPath("home1", "home1b", api.PathDirect, "", 5*time.Second)
		// NAT to cloud: direct.
		for _, h := range []string{"home1", "home1b", "home2"} {
			c.waitPath(h, "srv", api.PathDirect, "", 5*time.Second)
			c.waitPath("mover", h, api.PathDirect, "", 5*time.Second)
		}
		ps, err := c.paths()
		if err != nil {
			t.Fatal(err)
		}
		if p := ps["home1→home2"]; p.Reason == "" {
			t.Errorf("a relayed path must say why: %+v", p)
		}
		// Two nodes behind one public IP are told apart by the ports
		// their NAT mapped.
		dev, err := srv.wgShow()
		if err != nil {
			t.Fatal(err)
		}
		var natEndpoints []string
		for _, p := range dev.Peers {
			if strings.HasPrefix(p.Endpoint, h1.NATIP.String()+":") {
				natEndpoints = append(natEndpoints, p.Endpoint)
			}
		}
		if len(natEndpoints) != 2 || natEndpoints[0] == natEndpoints[1] {
			t.Errorf("server's peers behind home1's NAT %s: want two distinct endpoints, got %v", h1.NATIP, natEndpoints)
		}
	})

	t.Run("3-relay-loss", func(t *testing.T) {
		stopped := time.Now()
		if err := ra.proc.Stop(); err != nil {
			t.Logf("stopping relay ra: %v", err)
		}
		WaitFor(t, 60*time.Second, "home1 ↔ home2 through another relay", func() error {
			if err := home1.pod.Ping(home2.pod.IP); err != nil {
				return err
			}
			return home2.pod.Ping(home1.pod.IP)
		})
		t.Logf("measured: relay loss → home1↔home2 traffic restored %.2fs after the relay was told to stop", time.Since(stopped).Seconds())
		c.waitPath("home1", "home2", api.PathRelayed, "rb", 10*time.Second)
	})

	t.Run("4-public-ip-change-without-restart", func(t *testing.T) {
		oldIP, newIP := "198.51.100.40/24", "198.51.100.41/24"
		pid := dyn.proc.Pid()
		start := time.Now()
		dynNode.MustExec("ip", "addr", "del", oldIP, "dev", "eth0")
		dynNode.MustExec("ip", "addr", "add", newIP, "dev", "eth0")
		dynNode.MustExec("ip", "route", "replace", "default", "via", "198.51.100.1")
		// The old address is released: the internet drops what is sent
		// to it.
		lab.MustExec(inet.NS, "ip", "route", "add", "blackhole", "198.51.100.40/32")
		d := WaitFor(t, 30*time.Second, "pods reach dyn's pod again", func() error {
			for _, m := range []*member{srv, home1, home2} {
				if err := m.pod.Ping(dyn.pod.IP); err != nil {
					return fmt.Errorf("%s → dyn: %w", m.Name, err)
				}
			}
			return dyn.pod.Ping(srv.pod.IP)
		})
		t.Logf("measured: public IP change → traffic to and from dyn's pod restored in %.2fs (%.2fs after the change)", d.Seconds(), time.Since(start).Seconds())
		if dev, err := srv.wgShow(); err == nil {
			for _, p := range dev.Peers {
				if strings.HasPrefix(p.Endpoint, "198.51.100.4") {
					t.Logf("server's endpoint for mover now: %s", p.Endpoint)
				}
			}
		}
		if dyn.proc.Pid() != pid || dyn.proc.Err() != nil {
			t.Fatalf("dyn's agent restarted or died: %v", dyn.proc.Err())
		}
		WaitFor(t, 10*time.Second, "trellis nodes to list dyn's new address", func() error {
			nodes, err := c.nodes()
			if err != nil {
				return err
			}
			if !slices.Contains(nodes["mover"].InternalIPs, netip.MustParseAddr("198.51.100.41")) {
				return fmt.Errorf("mover's internal IPs are %v", nodes["mover"].InternalIPs)
			}
			return nil
		})
	})

	t.Run("5-seed-way-flag-change-and-restart-leaves-no-stale-peer", func(t *testing.T) {
		if err := rb.proc.Stop(); err != nil {
			t.Logf("stopping rb: %v", err)
		}
		rbNode.MustExec("ip", "addr", "del", "192.0.2.30/24", "dev", "eth0")
		rbNode.MustExec("ip", "addr", "add", "192.0.2.31/24", "dev", "eth0")
		rbNode.MustExec("ip", "route", "replace", "default", "via", "192.0.2.1")
		// This time --node-external-ip comes from a config file, so that
		// the next step can change it with SIGHUP.
		if err := os.WriteFile(rbConfig, []byte("node-external-ip: 192.0.2.31\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		c.start(rb, withAddressFlags("--node-ip", rbNode.LANIP.String()), asRelay(), withFlags("--config", rbConfig))
		live := []*member{srv, rb, dyn, home1, home1b, home2}
		c.checkPods("after rb's restart with a new --node-external-ip", live, live, 60*time.Second)
		// Every live node has exactly the other live nodes (and the stopped
		// relay ra, which is still a member) as peers, once each; the
		// server reaches rb at its new address.
		WaitFor(t, 10*time.Second, "no stale peers", func() error {
			for _, m := range live {
				dev, err := m.wgShow()
				if err != nil {
					return err
				}
				if len(dev.Peers) != len(all)-1 {
					return fmt.Errorf("%s has %d peers, want %d", m.Name, len(dev.Peers), len(all)-1)
				}
			}
			dev, err := srv.wgShow()
			if err != nil {
				return err
			}
			for _, p := range dev.Peers {
				if strings.HasPrefix(p.Endpoint, "192.0.2.30:") {
					return fmt.Errorf("server still sends to rb's old address %s", p.Endpoint)
				}
			}
			return nil
		})
	})

	t.Run("6-sighup-reloads-node-external-ip", func(t *testing.T) {
		pid := rb.proc.Pid()
		rbNode.MustExec("ip", "addr", "del", "192.0.2.31/24", "dev", "eth0")
		rbNode.MustExec("ip", "addr", "add", "192.0.2.32/24", "dev", "eth0")
		rbNode.MustExec("ip", "route", "replace", "default", "via", "192.0.2.1")
		if err := os.WriteFile(rbConfig, []byte("node-external-ip: 192.0.2.32\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if err := syscall.Kill(pid, syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		WaitFor(t, 15*time.Second, "the server to send to rb's reloaded address", func() error {
			dev, err := srv.wgShow()
			if err != nil {
				return err
			}
			for _, p := range dev.Peers {
				if strings.HasPrefix(p.Endpoint, "192.0.2.32:") {
					return nil
				}
			}
			return fmt.Errorf("no peer at 192.0.2.32")
		})
		if err := Poll(30*time.Second, func() error { return srv.pod.Ping(rb.pod.IP) }); err != nil {
			t.Fatalf("server pod → rb pod after SIGHUP: %v", err)
		}
		t.Logf("measured: SIGHUP with a new --node-external-ip → traffic in %.2fs, no restart", time.Since(start).Seconds())
		if rb.proc.Pid() != pid || rb.proc.Err() != nil {
			t.Fatalf("rb restarted or died: %v", rb.proc.Err())
		}
	})

	if n := inet.MustCount("cluster"); n != 0 {
		t.Errorf("%d plaintext pod packets crossed the internet; want 0", n)
	}
}
