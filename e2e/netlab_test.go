//go:build e2e

package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestLab checks the harness on its own: topology, routing and NAT, nftables
// counters, private /run/wireguard per process, CNI pod attach, and
// cleanup.
func TestLab(t *testing.T) {
	var prefix string
	var procs []*Proc
	t.Run("topology", func(t *testing.T) {
		lab := NewLab(t)
		prefix = lab.Prefix()
		inet := lab.Internet()
		inet.Counter("icmp", "ip protocol icmp")
		inet.Counter("wireguard", "udp dport 51820", "udp sport 51820")
		inet.Counter("cluster", "ip saddr 10.42.0.0/16", "ip daddr 10.42.0.0/16")
		inet.Counter("homelan", "ip saddr 10.9.0.0/24", "ip daddr 10.9.0.0/24")

		c1 := lab.Cloud("c1", "198.51.100.10/24", "10.1.0.10/24")
		c2 := lab.Cloud("c2", "203.0.113.20/24", "10.2.0.20/24")
		c3 := lab.Cloud("c3", "192.0.2.30/24", "10.3.0.30/24")
		c1b := lab.Machine("c1b", "198.51.100.11/24", c1.LAN, "10.1.0.11/24")
		home := lab.Home("home", "203.0.113.50/24", "10.9.0.10/24")
		public := []*Node{c1, c2, c3, c1b}

		t.Run("internet", func(t *testing.T) {
			for _, a := range public {
				for _, b := range public {
					if a != b {
						if err := a.Ping(b.PublicIP); err != nil {
							t.Errorf("%s should reach %s's public address %s: %v", a.Name, b.Name, b.PublicIP, err)
						}
					}
				}
			}
			if n := inet.MustCount("icmp"); n == 0 {
				t.Errorf("icmp counter on the internet router: want > 0 after pings between clouds, got 0")
			}
		})

		t.Run("lan", func(t *testing.T) {
			if err := c1.Ping(c1b.LANIP); err != nil {
				t.Errorf("nodes of one cloud should reach each other on their LAN: %v", err)
			}
			for _, a := range []*Node{c1, c2, c3, home} {
				for _, b := range []*Node{c1, c2, c3, home} {
					if a != b && a.Ping(b.LANIP) == nil {
						t.Errorf("%s reached %s's LAN address %s: LANs must not be routed between clouds", a.Name, b.Name, b.LANIP)
					}
				}
			}
		})

		t.Run("nat", func(t *testing.T) {
			before := inet.MustCount("icmp")
			if err := home.Ping(c2.PublicIP); err != nil {
				t.Errorf("a home node should reach a cloud through its NAT router: %v", err)
			}
			if inet.MustCount("icmp") == before {
				t.Errorf("the home node's ping did not cross the internet router")
			}
			if n := inet.MustCount("homelan"); n != 0 {
				t.Errorf("packets with home LAN addresses on the internet: want 0 (masqueraded), got %d", n)
			}
			if c2.Ping(home.NATIP) != nil {
				t.Errorf("the home NAT router %s should answer pings from the internet", home.NATIP)
			}
		})

		t.Run("udp-counter", func(t *testing.T) {
			before := inet.MustCount("wireguard")
			if err := lab.SendUDP(c2.NS, netip.AddrPortFrom(c3.PublicIP, 51820)); err != nil {
				t.Fatal(err)
			}
			WaitFor(t, defaultTimeout, "the wireguard counter to count one datagram", func() error {
				if got := inet.MustCount("wireguard"); got != before+1 {
					return fmt.Errorf("counter went from %d to %d", before, got)
				}
				return nil
			})
		})

		t.Run("private-run-wireguard", func(t *testing.T) {
			script := `touch /run/wireguard/marker-$$ && exec sleep 300`
			p1 := c1.Start("sh", "-c", script)
			p2 := c2.Start("sh", "-c", script)
			procs = append(procs, p1, p2)
			for _, p := range []*Proc{p1, p2} {
				want := fmt.Sprintf("marker-%d", p.Pid())
				WaitFor(t, defaultTimeout, p.Name+" to see only its own marker in /run/wireguard", func() error {
					if err := p.Err(); err != nil {
						return err
					}
					out, err := p.Nsenter("ls", "/run/wireguard")
					if err != nil {
						return err
					}
					if got := strings.Fields(out); len(got) != 1 || got[0] != want {
						return fmt.Errorf("want [%s], got %v", want, got)
					}
					return nil
				})
				if _, err := os.Stat("/run/wireguard/" + want); err == nil {
					t.Errorf("the host sees %s's /run/wireguard/%s: the tmpfs is not private", p.Name, want)
				}
			}
			pid := p1.Pid()
			if err := p1.Restart(); err != nil {
				t.Errorf("restart: %v", err)
			}
			if p1.Pid() == pid || !p1.Running() {
				t.Errorf("after Restart: want a new running process, got pid %d (was %d), running=%v", p1.Pid(), pid, p1.Running())
			}
			if err := p2.Stop(); err != nil {
				t.Errorf("stop: %v", err)
			}
			if p2.Running() {
				t.Errorf("%s still runs after Stop", p2.Name)
			}
		})

		t.Run("cni", func(t *testing.T) {
			c3.MustExec("ip", "link", "add", "cni0", "type", "bridge")
			c3.MustExec("ip", "addr", "add", "10.42.7.1/24", "dev", "cni0")
			c3.MustExec("ip", "link", "set", "cni0", "up")
			conflist := filepath.Join(lab.TempDir("cni"), "10-trellis.conflist")
			if err := os.WriteFile(conflist, []byte(`{
  "cniVersion": "1.0.0",
  "name": "trellis",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.42.7.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}`), 0o644); err != nil {
				t.Fatal(err)
			}
			a := c3.MustAddPod(conflist)
			b := c3.MustAddPod(conflist)
			podNet := netip.MustParsePrefix("10.42.7.0/24")
			if !podNet.Contains(a.IP) || !podNet.Contains(b.IP) || a.IP == b.IP {
				t.Fatalf("pod addresses: want two distinct addresses in %s, got %s and %s", podNet, a.IP, b.IP)
			}
			for _, p := range []*Pod{a, b} {
				if err := p.ServeEcho(); err != nil {
					t.Fatalf("echo server in %s: %v", p.Name, err)
				}
			}
			if err := a.Ping(b.IP); err != nil {
				t.Error(err)
			}
			if err := a.TCPEcho(b.IP); err != nil {
				t.Error(err)
			}
			if err := b.TCPEcho(a.IP); err != nil {
				t.Error(err)
			}
			if err := b.Ping(netip.MustParseAddr("10.42.7.1")); err != nil {
				t.Errorf("pod should reach its gateway on cni0: %v", err)
			}
			if err := b.Ping(c3.PublicIP); err != nil {
				t.Errorf("pod should reach its node's address %s: %v", c3.PublicIP, err)
			}
			// Without a mesh, a pod's packet to another cloud leaves in
			// plaintext: the cluster counter must see it.
			if n := inet.MustCount("cluster"); n != 0 {
				t.Errorf("cluster counter before any pod traffic left the node: want 0, got %d", n)
			}
			_ = b.Ping(c1.PublicIP) // no way back: c1 has no route to pods
			if n := inet.MustCount("cluster"); n == 0 {
				t.Errorf("cluster counter after a pod sent a plaintext packet across the internet: want > 0, got 0")
			}
		})
	})

	if prefix == "" {
		return // skipped
	}
	if left := Namespaces(prefix); len(left) > 0 {
		t.Errorf("namespaces left after the lab's test ended: %v", left)
	}
	for _, p := range procs {
		if p.Running() {
			t.Errorf("%s (pid %d) still runs after the lab's test ended", p.Name, p.Pid())
		}
	}
}
