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
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
)

// TestHAServers: three servers with embedded etcd in one location (one
// LAN, public addresses in one subnet), agents in two clouds. The server
// the agents use is killed: pods keep reaching each other, the agents
// move to another server, a new agent joins through a survivor, and no
// node record is lost; the killed server restarts and catches up.
func TestHAServers(t *testing.T) {
	lab := NewLab(t)
	c := newCluster(t, lab)

	s1 := lab.Cloud("srv1", "198.51.100.11/24", "10.10.0.11/24")
	s2 := lab.Machine("srv2", "198.51.100.12/24", s1.LAN, "10.10.0.12/24")
	s3 := lab.Machine("srv3", "198.51.100.13/24", s1.LAN, "10.10.0.13/24")
	a1 := lab.Cloud("a1", "192.0.2.21/24", "10.20.0.21/24")
	b1 := lab.Cloud("b1", "203.0.113.31/24", "10.30.0.31/24")
	a2 := lab.Machine("a2", "192.0.2.22/24", a1.LAN, "10.20.0.22/24")
	b2 := lab.Machine("b2", "203.0.113.32/24", b1.LAN, "10.30.0.32/24")

	start := time.Now()
	srv1 := c.startServer(s1, withClusterInit())
	srv2 := c.startServer(s2, via(srv1))
	srv3 := c.startServer(s3, via(srv1))
	t.Logf("measured: three servers with embedded etcd up in %v", time.Since(start).Round(time.Millisecond))
	ag1 := c.startAgent(a1, via(srv1))
	ag2 := c.startAgent(b1, via(srv1))
	doomed := c.startAgent(b2, via(srv1)) // deleted while a server is down
	all := []*member{srv1, srv2, srv3, ag1, ag2}
	nodes := c.waitListed(joinTimeout, append(all, doomed), append(all, doomed))
	for _, s := range []*member{srv1, srv2, srv3} {
		if n := nodes[s.Name]; !n.HasRole(api.RoleServer) {
			t.Errorf("%s has roles %v, want server", s.Name, nodes[s.Name].Roles)
		}
	}
	for _, m := range all {
		c.attachPod(m)
	}
	c.checkPods("before the kill", all, all, meshTimeout)

	// The egress of every server reaches every node: agents hold a
	// tunnel to each server (a stand-in kubelet on ag1's node IP).
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	lab.Start(a1.NS, "env", helperEnv+"=echo-server", self, netip.AddrPortFrom(a1.LANIP, 10250).String())
	for _, s := range []*member{srv1, srv2, srv3} {
		sock := filepath.Join(s.dataDir, "server", "egress.sock")
		WaitFor(t, joinTimeout, "CONNECT a1:10250 on "+s.Name+"'s egress", func() error {
			status, conn := egressConnect(t, sock, "a1:10250")
			if conn == nil {
				return fmt.Errorf("%s", status)
			}
			defer conn.Close()
			return echoRoundTrip(conn)
		})
	}

	// Every agent learns every server, and remembers them.
	for _, m := range []*member{ag1, ag2} {
		path := filepath.Join(m.dataDir, "agent", "servers.json")
		WaitFor(t, 30*time.Second, m.Name+" to remember three servers in "+path, func() error {
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			var saved struct {
				Servers []api.Server `json:"servers"`
			}
			if err := json.Unmarshal(b, &saved); err != nil {
				return err
			}
			if len(saved.Servers) != 3 {
				return fmt.Errorf("servers %v", saved.Servers)
			}
			return nil
		})
	}
	before, err := c.nodes()
	if err != nil {
		t.Fatal(err)
	}

	// Kill the server the agents use.
	offsets := map[*member]int64{ag1: ag1.proc.LogSize(), ag2: ag2.proc.LogSize()}
	killed := time.Now()
	srv1.proc.Kill()
	c.server = srv2 // trellis nodes through a survivor from now on
	for _, m := range []*member{ag1, ag2} {
		at, err := waitLogLine(m.proc, offsets[m], 60*time.Second, "netmap stream connected")
		if err != nil {
			t.Fatalf("%s did not move to another server: %v", m.Name, err)
		}
		lines, _ := m.proc.LogLinesSince(offsets[m], "netmap stream connected")
		t.Logf("measured: %s moved to another server %v after the kill (%s)", m.Name, at.Sub(killed).Round(time.Millisecond), lastField(lines, "server="))
	}
	survivors := []*member{srv2, srv3, ag1, ag2}
	c.checkPods("after the kill", survivors, survivors, meshTimeout)

	// Deletes work with a server down.
	if out, err := c.cli("node", "delete", doomed.Name); err != nil {
		t.Fatalf("trellis node delete with a server down: %v: %s", err, out)
	}

	// A new agent joins through a surviving server.
	ag3 := c.startAgent(a2, via(srv2))
	joinStart := time.Now()
	all = append(all, ag3)
	after := c.waitListed(joinTimeout, all, append(survivors, ag3))
	t.Logf("measured: a new agent joined through a survivor and was ready in %v", time.Since(joinStart).Round(time.Millisecond))
	c.attachPod(ag3)
	c.checkPods("new agent", append(survivors, ag3), append(survivors, ag3), meshTimeout)

	// Nothing written before the kill is lost.
	for name, n := range before {
		if name == doomed.Name {
			continue
		}
		got, ok := after[name]
		switch {
		case !ok:
			t.Errorf("node %s was lost", name)
		case got.PublicKey != n.PublicKey || !slices.Equal(got.PodCIDRs, n.PodCIDRs) || !got.CreatedAt.Equal(n.CreatedAt) || !slices.Equal(got.Roles, n.Roles):
			t.Errorf("node %s changed: before %+v, after %+v", name, n, got)
		}
	}

	// The killed server restarts and catches up.
	offset := srv1.proc.LogSize()
	restart := time.Now()
	if err := srv1.proc.Start(); err != nil {
		t.Fatal(err)
	}
	if _, err := waitLogLine(srv1.proc, offset, joinTimeout, "server listening"); err != nil {
		t.Fatal(err)
	}
	c.server = srv1
	c.waitListed(joinTimeout, all, all)
	t.Logf("measured: the killed server restarted, caught up and listed every node ready in %v", time.Since(restart).Round(time.Millisecond))
	c.checkPods("after the restart", all, all, meshTimeout)
}

// lastField returns the value of key=… in the last line.
func lastField(lines []string, key string) string {
	if len(lines) == 0 {
		return ""
	}
	l := lines[len(lines)-1]
	i := strings.Index(l, key)
	if i < 0 {
		return ""
	}
	v := l[i+len(key):]
	if j := strings.IndexByte(v, ' '); j >= 0 {
		v = v[:j]
	}
	return key + v
}
