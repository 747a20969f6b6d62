//go:build e2e

package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// driftRepairTimeout bounds each repair: well under the agent's 10 s
// resync backstop, so that a pass only the backstop makes fails the test.
// The agent repairs on the netlink or inotify event (tens of ms) or, for a
// WireGuard peer, at its next status tick (1 s).
const driftRepairTimeout = 5 * time.Second

// hostState is what a node's network and CNI directory look like, as
// lines that can be compared: routes (main table), addresses of the
// interfaces named, and the files of the CNI directory with their hashes.
func hostState(t *testing.T, m *member, ifaces []string) []string {
	t.Helper()
	var out []string
	for _, fam := range []string{"-4", "-6"} {
		routes, err := m.Exec("ip", "-o", fam, "route", "show", "table", "main")
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(strings.TrimSpace(routes), "\n") {
			// IPv6 link-local routes and addresses are the kernel's (a
			// bridge made again gets a new one).
			if l = strings.TrimSpace(strings.ReplaceAll(l, " linkdown", "")); l != "" && !strings.HasPrefix(l, "fe80:") {
				out = append(out, "route "+l)
			}
		}
	}
	for _, ifc := range ifaces {
		addrs, err := m.Exec("ip", "-o", "addr", "show", "dev", ifc)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(strings.TrimSpace(addrs), "\n") {
			f := strings.Fields(l)
			if len(f) >= 4 && !strings.HasPrefix(f[3], "fe80:") {
				out = append(out, "addr "+ifc+" "+f[3]) // "N: ifc inet ADDR/LEN ..."
			}
		}
	}
	entries, err := os.ReadDir(m.cniDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(m.cniDir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		out = append(out, "file "+e.Name()+" "+hex.EncodeToString(sum[:8]))
	}
	slices.Sort(out)
	return out
}

// TestDriftRepair breaks parts of a running node's data plane the way an
// operator, a package upgrade or another CNI installer would, and checks
// that the agent repairs each without a restart, that pod traffic to the
// node comes back, and that nothing on the host that Trellis did not
// create is touched. It prints the time of each repair.
func TestDriftRepair(t *testing.T) {
	lab := NewLab(t)
	c := newCluster(t, lab)
	cloud1 := lab.Cloud("cloud1", "198.51.100.10/24", "10.1.0.10/24")
	cloud2 := lab.Cloud("cloud2", "203.0.113.20/24", "10.2.0.20/24")
	cloud3 := lab.Cloud("cloud3", "192.0.2.30/24", "10.3.0.30/24")
	server := c.startServer(cloud1)
	a2 := c.startAgent(cloud2)
	a3 := c.startAgent(cloud3)
	all := []*member{server, a2, a3}
	nodes := c.waitNodes(all...)
	for _, m := range all {
		c.attachPod(m)
	}
	c.checkPods("before the drift", all, all, meshTimeout)
	victim := a2
	pid := victim.proc.Pid()

	key1 := nodes[server.Name].PublicKey.String()
	conflist := filepath.Join(victim.cniDir, conflistName)
	ours, err := os.ReadFile(conflist)
	if err != nil {
		t.Fatal(err)
	}
	podTraffic := func() error {
		if err := pingWait(lab, server.pod.NS, victim.pod.IP, "0.2"); err != nil {
			return err
		}
		return pingWait(lab, a3.pod.NS, victim.pod.IP, "0.2")
	}
	conflistRestored := func() error {
		b, err := os.ReadFile(conflist)
		if err != nil {
			return err
		}
		if string(b) != string(ours) {
			return fmt.Errorf("conflist is %q", b)
		}
		return nil
	}
	var report []string
	repair := func(what string, drift func() error, restored func() error) {
		t.Helper()
		if err := drift(); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		start := time.Now()
		var last error
		for time.Since(start) < driftRepairTimeout {
			if last = restored(); last == nil {
				took := time.Since(start)
				report = append(report, fmt.Sprintf("%-42s repaired in %6.3fs", what, took.Seconds()))
				t.Logf("%s: repaired in %v", what, took)
				return
			}
			if err := victim.proc.Err(); err != nil {
				t.Fatal(err)
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Fatalf("%s: not repaired within %v: %v", what, driftRepairTimeout, last)
	}
	exec := func(args ...string) func() error {
		return func() error { _, err := victim.Exec(args...); return err }
	}
	// Flushing the interface's addresses also makes the kernel drop
	// every IPv4 route through it (none is left with an address): first,
	// before the host is looked at for things Trellis must not touch.
	repair("ip addr flush dev "+wgIface, exec("ip", "addr", "flush", "dev", wgIface), func() error {
		out, err := victim.Exec("ip", "-o", "-4", "addr", "show", "dev", wgIface)
		if err != nil || !strings.Contains(out, " inet ") {
			return fmt.Errorf("%s has no IPv4 address: %q %v", wgIface, out, err)
		}
		return podTraffic()
	})
	// Things Trellis did not create, on the victim: an interface with an
	// address and a route through it, a route through trellis-wg that is
	// not Trellis's, another installer's CNI config.
	victim.MustExec("ip", "link", "add", "foreign0", "type", "veth", "peer", "name", "foreign1")
	victim.MustExec("ip", "addr", "add", "10.200.0.1/24", "dev", "foreign0")
	victim.MustExec("ip", "link", "set", "foreign0", "up")
	victim.MustExec("ip", "link", "set", "foreign1", "up")
	victim.MustExec("ip", "route", "add", "10.201.0.0/16", "via", "10.200.0.2")
	victim.MustExec("ip", "route", "add", "10.98.0.0/16", "dev", wgIface)
	otherConf := filepath.Join(victim.cniDir, "99-other.conflist")
	if err := os.WriteFile(otherConf, []byte(`{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge","bridge":"other0"}]}`+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ifaces := []string{"foreign0", wgIface, "cni0", "eth0"}
	before := hostState(t, victim, ifaces)

	repair("ip route del "+clusterCIDR+" dev "+wgIface, exec("ip", "route", "del", clusterCIDR, "dev", wgIface), podTraffic)
	repair("wg set "+wgIface+" peer <cloud1> remove", func() error {
		_, err := victim.proc.Nsenter("wg", "set", wgIface, "peer", key1, "remove")
		return err
	}, podTraffic)
	repair("rm "+conflistName, func() error { return os.Remove(conflist) }, conflistRestored)
	repair(conflistName+" overwritten by another plugin", func() error {
		return os.WriteFile(conflist, []byte(`{"cniVersion":"1.0.0","name":"flannel","plugins":[{"type":"flannel"}]}`+"\n"), 0o644)
	}, conflistRestored)
	// Deleting the bridge detaches the pods on it for good (their veths
	// stay, unattached); a new pod attaches to the bridge the agent made
	// again and reaches the others.
	repair("ip link del cni0 (then a new pod)", exec("ip", "link", "del", "cni0"), func() error {
		out, err := victim.Exec("ip", "-o", "-4", "addr", "show", "dev", "cni0")
		if err != nil || !strings.Contains(out, " inet ") {
			return fmt.Errorf("cni0 has no address: %q %v", out, err)
		}
		if victim.pod.NS != "" && !strings.HasSuffix(victim.pod.Name, "-new") {
			p, err := victim.AddPod(conflist)
			if err != nil {
				return err
			}
			p.Name += "-new"
			victim.pod = p
		}
		if err := pingWait(lab, victim.pod.NS, server.pod.IP, "0.2"); err != nil {
			return err
		}
		return pingWait(lab, server.pod.NS, victim.pod.IP, "0.2")
	})
	if got := victim.proc.Pid(); got != pid || !victim.proc.Running() {
		t.Fatalf("the agent was restarted (pid %d, now %d, running %v)", pid, got, victim.proc.Running())
	}

	// The host as before: Trellis's parts restored exactly, everything
	// else untouched (the new pod's veth is not among the interfaces
	// compared).
	after := hostState(t, victim, ifaces)
	if !slices.Equal(before, after) {
		t.Errorf("the host differs after the repairs:\nbefore:\n  %s\nafter:\n  %s", strings.Join(before, "\n  "), strings.Join(after, "\n  "))
	}
	for _, want := range []string{"route 10.201.0.0/16 via 10.200.0.2 dev foreign0", "route 10.98.0.0/16 dev " + wgIface, "addr foreign0 10.200.0.1/24", "file 99-other.conflist"} {
		if !slices.ContainsFunc(after, func(l string) bool { return strings.HasPrefix(l, want) }) {
			t.Errorf("%q is gone from the host", want)
		}
	}
	t.Logf("drift repairs on %s (no restart):\n%s", victim.Name, strings.Join(report, "\n"))
}
