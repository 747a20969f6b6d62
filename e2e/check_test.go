//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/api"
)

// checkTimeout bounds the wait for `trellis check` to reach a verdict
// (handshakes, failing observations after 16 s, relay choice).
const checkTimeout = 90 * time.Second

// trellisIn runs the trellis binary with args in namespace ns and returns
// its standard output and exit code; err is set only if it could not run.
func (c *cluster) trellisIn(ns string, args ...string) (stdout string, code int, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, c.bin}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return out.String() + errb.String(), ee.ExitCode(), nil
	}
	if err != nil {
		return "", -1, fmt.Errorf("trellis %s: %w: %s", strings.Join(args, " "), err, errb.String())
	}
	return out.String(), 0, nil
}

// check runs `trellis check -o json` on the server's machine.
func (c *cluster) check() (*api.CheckReport, int, error) {
	out, code, err := c.trellisIn(c.server.NS, "check", "--admin-config", c.adminConfig(), "-o", "json")
	if err != nil {
		return nil, code, err
	}
	// A failing check also prints "trellis: ..." on stderr after the JSON.
	js := out
	if i := strings.LastIndex(out, "\ntrellis: "); i >= 0 {
		js = out[:i]
	}
	var rep api.CheckReport
	if err := json.Unmarshal([]byte(js), &rep); err != nil {
		return nil, code, fmt.Errorf("trellis check -o json: %w; output %q", err, out)
	}
	return &rep, code, nil
}

// waitCheck polls `trellis check` until verdict accepts its report.
func (c *cluster) waitCheck(what string, verdict func(*api.CheckReport, int) error) *api.CheckReport {
	c.t.Helper()
	var rep *api.CheckReport
	WaitFor(c.t, checkTimeout, what, func() error {
		var code int
		var err error
		if rep, code, err = c.check(); err != nil {
			return err
		}
		return verdict(rep, code)
	})
	return rep
}

func checkPair(rep *api.CheckReport, from, to string) api.CheckPair {
	for _, p := range rep.Pairs {
		if p.From == from && p.To == to {
			return p
		}
	}
	return api.CheckPair{From: from, To: to, Status: "missing from the report"}
}

// allOK accepts a report in which every pair works and the exit code is 0.
func allOK(rep *api.CheckReport, code int) error {
	var bad []string
	for _, p := range rep.Pairs {
		if !p.OK {
			bad = append(bad, fmt.Sprintf("%s→%s: %s (%s)", p.From, p.To, p.Status, p.Detail))
		}
	}
	if len(bad) > 0 || !rep.OK || code != 0 {
		return fmt.Errorf("exit %d, failing pairs %v", code, bad)
	}
	return nil
}

// scrape GETs a /metrics endpoint inside ns.
func scrape(ns, addr string) (string, error) {
	resp, err := httpClientIn(ns).Get("http://" + addr + "/metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return "", fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	return string(b), err
}

// metricValue returns the value of the sample whose name and labels are
// exactly series, e.g. `trellis_agent_peer_receive_bytes_total{peer="cloud2"}`.
func metricValue(text, series string) (float64, error) {
	for _, line := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			return strconv.ParseFloat(strings.TrimSpace(v), 64)
		}
	}
	return 0, fmt.Errorf("no sample %s", series)
}

// tunnelAddr is the address a node holds on its WireGuard interface.
func tunnelAddr(n api.Node) netip.Addr { return n.PodCIDRs[0].Masked().Addr() }

// TestCheckHealthyMetricsAndMTUBlackHole: a healthy three-cloud cluster
// passes `trellis check` (table, JSON, YAML); `trellis nodes -o wide|yaml`
// show the mesh; the metrics of server and agent are there and move with
// traffic; then a link with a smaller MTU that drops what does not fit
// (no "fragmentation needed" comes back) is named by `trellis check` as an
// MTU black hole, while small packets still pass.
func TestCheckHealthyMetricsAndMTUBlackHole(t *testing.T) {
	lab := NewLab(t)
	c := newCluster(t, lab)
	c1 := lab.Cloud("cloud1", "198.51.100.10/24", "10.1.0.10/24")
	c2 := lab.Cloud("cloud2", "203.0.113.20/24", "10.2.0.20/24")
	c3 := lab.Cloud("cloud3", "192.0.2.30/24", "10.3.0.30/24")

	// The server's metrics (its own node's too) on its loopback.
	srv := c.startServer(c1, withMetrics("127.0.0.1:10252"))
	a2 := c.startAgent(c2, withMetrics("127.0.0.1:10252"))
	a3 := c.startAgent(c3)
	nodes := c.waitNodes(srv, a2, a3)

	t.Run("check-healthy", func(t *testing.T) {
		start := time.Now()
		rep := c.waitCheck("trellis check to pass on a healthy cluster", allOK)
		t.Logf("measured: trellis check passed %v after the nodes were ready; 6 pairs", time.Since(start).Round(100*time.Millisecond))
		if len(rep.Pairs) != 6 || len(rep.Nodes) != 3 {
			t.Fatalf("want 6 pairs of 3 nodes, got %+v", rep)
		}
		for _, p := range rep.Pairs {
			if p.RTT <= 0 || p.Path != api.PathDirect {
				t.Errorf("%s→%s: want a direct path with an RTT, got %+v", p.From, p.To, p)
			}
		}
		out, code, err := c.trellisIn(c1.NS, "check", "--admin-config", c.adminConfig())
		if err != nil || code != 0 {
			t.Fatalf("trellis check (table): exit %d, %v\n%s", code, err, out)
		}
		if !strings.Contains(out, "all 6 pairs of 3 nodes work") || !regexp.MustCompile(`cloud2\s+[0-9.]+ms\s+-\s+[0-9.]+ms`).MatchString(out) {
			t.Errorf("table output lacks the matrix:\n%s", out)
		}
		if strings.Contains(out, "\x1b[") {
			t.Errorf("colour in output that is not a terminal:\n%q", out)
		}
		t.Logf("trellis check:\n%s", out)
		out, code, err = c.trellisIn(c1.NS, "check", "--admin-config", c.adminConfig(), "-o", "yaml")
		var back api.CheckReport
		if err != nil || code != 0 || yaml.UnmarshalStrict([]byte(out), &back) != nil || !back.OK || len(back.Pairs) != 6 {
			t.Errorf("trellis check -o yaml: exit %d, %v, parsed %+v\n%s", code, err, back, out)
		}
	})

	t.Run("nodes-wide-yaml", func(t *testing.T) {
		out, code, err := c.trellisIn(c1.NS, "nodes", "--admin-config", c.adminConfig(), "-o", "wide")
		if err != nil || code != 0 {
			t.Fatalf("trellis nodes -o wide: exit %d, %v\n%s", code, err, out)
		}
		t.Logf("trellis nodes -o wide:\n%s", out)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if len(lines) != 4 || !strings.Contains(lines[0], "HANDSHAKE") || !strings.Contains(lines[0], "RTT") {
			t.Fatalf("want a wide header and 3 rows:\n%s", out)
		}
		for _, l := range lines[1:] {
			switch {
			case strings.HasPrefix(l, "cloud1 "):
				if !strings.Contains(l, "self") {
					t.Errorf("the server's row %q: want self", l)
				}
			default:
				if !strings.Contains(l, "direct") || !strings.Contains(l, "ago") || !regexp.MustCompile(`[0-9.]+ms`).MatchString(l) || !strings.Contains(l, ":51820") {
					t.Errorf("row %q: want endpoint, direct, a handshake age and an RTT", l)
				}
			}
		}
		out, code, err = c.trellisIn(c1.NS, "nodes", "--admin-config", c.adminConfig(), "-o", "yaml")
		var back []api.Node
		if err != nil || code != 0 || yaml.UnmarshalStrict([]byte(out), &back) != nil || len(back) != 3 {
			t.Fatalf("trellis nodes -o yaml: exit %d, %v, parsed %d nodes\n%s", code, err, len(back), out)
		}
		for _, n := range back {
			if n.PublicKey != nodes[n.Name].PublicKey || !n.Ready || len(n.PodCIDRs) != 1 {
				t.Errorf("yaml node %s does not match the JSON listing: %+v", n.Name, n)
			}
		}
	})

	t.Run("nodes-watch", func(t *testing.T) {
		// Unchanged nodes print once; Ctrl-C (SIGINT) ends the watch
		// with exit 0.
		cmd := exec.Command("ip", "netns", "exec", c1.NS, c.bin, "nodes", "--admin-config", c.adminConfig(), "--watch")
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Second) // two more polls
		_ = cmd.Process.Signal(os.Interrupt)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("trellis nodes --watch after Ctrl-C: %v\n%s", err, out.String())
			}
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
			t.Fatalf("trellis nodes --watch did not stop on Ctrl-C:\n%s", out.String())
		}
		if n := strings.Count(out.String(), "NAME "); n != 1 {
			t.Errorf("an unchanged listing printed %d times, want once:\n%s", n, out.String())
		}
	})

	t.Run("local-status", func(t *testing.T) {
		out, code, err := c.trellisIn(c3.NS, "status")
		if err != nil || code != 0 {
			t.Fatalf("trellis status on cloud3: exit %d, %v\n%s", code, err, out)
		}
		for _, want := range []string{"NODE:", "cloud3", "SERVER:", "https://198.51.100.10:6443", "TUNNEL:", "up", "DATA PLANE:", "mtu 1420", "cloud1", "cloud2"} {
			if !strings.Contains(out, want) {
				t.Errorf("trellis status lacks %q:\n%s", want, out)
			}
		}
	})

	t.Run("metrics", func(t *testing.T) {
		var m string
		WaitFor(t, defaultTimeout, "the server's metrics", func() (err error) { m, err = scrape(c1.NS, "127.0.0.1:10252"); return err })
		for _, want := range []string{
			`trellis_server_nodes{ready="true"} 3`, `trellis_server_paths{kind="direct"} 6`, `trellis_server_tunnels_connected 3`,
			"trellis_server_join_duration_seconds_count", `trellis_server_store_duration_seconds_count{op="get",result="ok"}`,
			"trellis_server_netmap_version ", `trellis_server_netmap_version_lag{node="cloud2"} 0`,
			"trellis_agent_peers 2", `trellis_agent_peer_handshake_age_seconds{peer="cloud2"}`, "trellis_agent_tunnel_up 1",
			"trellis_agent_tunnel_reconnects_total 0", "trellis_agent_join_duration_seconds_count 1", "trellis_agent_relayed_peers 0",
		} {
			if !strings.Contains(m, want) {
				t.Errorf("server metrics lack %q", want)
			}
		}
		series := `trellis_agent_peer_receive_bytes_total{peer="cloud2"}`
		before, err := metricValue(m, series)
		if err != nil {
			t.Fatal(err)
		}
		// 20 pings of 1000 bytes from cloud2 to the server's tunnel address.
		if out, err := c2.Exec("ping", "-n", "-q", "-c", "20", "-i", "0.05", "-s", "1000", "-W", "1", tunnelAddr(nodes["cloud1"]).String()); err != nil {
			t.Fatalf("ping across the mesh: %v\n%s", err, out)
		}
		// The agent's metrics are what its status tick last read from the
		// device (at most a second old): wait for the tick.
		var after float64
		if err := Poll(defaultTimeout, func() error {
			m, err := scrape(c1.NS, "127.0.0.1:10252")
			if err != nil {
				return err
			}
			if after, err = metricValue(m, series); err != nil {
				return err
			}
			if after-before < 20*1000 {
				return fmt.Errorf("%s grew by %.0f bytes, want at least 20000", series, after-before)
			}
			return nil
		}); err != nil {
			t.Error(err)
		}
		t.Logf("measured: %s %.0f → %.0f after 20 pings of 1000 bytes", series, before, after)
		am, err := scrape(c2.NS, "127.0.0.1:10252")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(am, "trellis_agent_peers 2") || strings.Contains(am, "trellis_server_") {
			t.Errorf("an agent's metrics: want its peers and no server metrics:\n%s", am)
		}
		if tx, err := metricValue(am, `trellis_agent_peer_transmit_bytes_total{peer="cloud1"}`); err != nil || tx < 20*1000 {
			t.Errorf("cloud2's transmit bytes to cloud1: %v, %v", tx, err)
		}
	})

	t.Run("mtu-black-hole", func(t *testing.T) {
		inet := lab.Internet()
		// cloud3's link to the internet carries 1200 bytes; what does not
		// fit is dropped and nobody says so: the router sends no
		// "fragmentation needed" and drops fragments. TCP still works
		// (MSS clamping, as real networks do): the supervisor tunnel stays.
		lab.MustExec(inet.NS, "ip", "link", "set", "cloud3", "mtu", "1200")
		inet.nft(`add table inet e2e_mtu
add chain inet e2e_mtu mtufwd { type filter hook forward priority -10; policy accept; }
add rule inet e2e_mtu mtufwd ip frag-off & 0x3fff != 0 drop
add rule inet e2e_mtu mtufwd tcp flags syn tcp option maxseg size set 1100
add chain inet e2e_mtu mtuout { type filter hook output priority 0; policy accept; }
add rule inet e2e_mtu mtuout icmp type destination-unreachable icmp code frag-needed drop`)
		target := tunnelAddr(nodes["cloud3"]).String()
		if _, err := c1.Exec("ping", "-n", "-q", "-c", "2", "-W", "1", target); err != nil {
			t.Fatalf("small pings cloud1 → cloud3 must still pass: %v", err)
		}
		if _, err := c1.Exec("ping", "-n", "-q", "-c", "2", "-W", "1", "-M", "do", "-s", strconv.Itoa(1420-28), target); err == nil {
			t.Fatal("a ping with DF at the tunnel MTU (1420) passed the 1200-byte link: no black hole to detect")
		}
		rep := c.waitCheck("trellis check to name the pairs through cloud3's link as an MTU black hole", func(rep *api.CheckReport, code int) error {
			if code == 0 || rep.OK {
				return fmt.Errorf("check passes (exit %d)", code)
			}
			for _, from := range []string{"cloud1", "cloud2"} {
				if p := checkPair(rep, from, "cloud3"); p.Status != api.CheckMTUBlackHole {
					return fmt.Errorf("%s→cloud3: %s (%s)", from, p.Status, p.Detail)
				}
			}
			if p := checkPair(rep, "cloud1", "cloud2"); !p.OK {
				return fmt.Errorf("cloud1→cloud2 does not cross the link but fails: %s (%s)", p.Status, p.Detail)
			}
			return nil
		})
		t.Logf("cloud1→cloud3: %s", checkPair(rep, "cloud1", "cloud3").Detail)
		out, code, err := c.trellisIn(c1.NS, "check", "--admin-config", c.adminConfig())
		if err != nil || code == 0 || !strings.Contains(out, "cloud1 → cloud3: MTU black hole") {
			t.Errorf("trellis check (table): want exit non-zero naming cloud1 → cloud3: MTU black hole; exit %d, %v\n%s", code, err, out)
		}
		t.Logf("trellis check:\n%s", out)
	})
}

// TestCheckBlockedPairAndCleanup: with no relay in the cluster (the server
// runs without a node), a firewall that drops WireGuard between two clouds
// makes `trellis check` name that pair, both ways, with "no handshake" and
// exit non-zero, while the other pairs work. An agent that ran from a
// config file alone is then removed with `trellis agent --cleanup`, which
// leaves its machine's addresses, routes, links and nftables rules as they
// were before the agent started.
func TestCheckBlockedPairAndCleanup(t *testing.T) {
	lab := NewLab(t)
	c := newCluster(t, lab)
	inet := lab.Internet()
	c1 := lab.Cloud("cloud1", "198.51.100.10/24", "10.1.0.10/24")
	c2 := lab.Cloud("cloud2", "203.0.113.20/24", "10.2.0.20/24")
	c3 := lab.Cloud("cloud3", "192.0.2.30/24", "10.3.0.30/24")
	c4 := lab.Cloud("cloud4", "198.51.100.40/24", "10.4.0.40/24")
	// A security group that forgot UDP 51820 between cloud2 and cloud3.
	inet.nft(`add rule inet e2e forward ip saddr 203.0.113.20 ip daddr 192.0.2.30 udp dport 51820 drop
add rule inet e2e forward ip saddr 192.0.2.30 ip daddr 203.0.113.20 udp dport 51820 drop`)

	c.startServer(c1, withServerFlags("--disable-agent"))
	a2 := c.startAgent(c2)
	a3 := c.startAgent(c3)

	// cloud4 runs from a config file alone, with a drop-in.
	snap := func() string {
		var b strings.Builder
		for _, cmd := range [][]string{{"ip", "addr"}, {"ip", "route"}, {"ip", "-6", "route"}, {"ip", "link"}, {"nft", "list", "ruleset"}} {
			out, err := c4.Exec(cmd...)
			if err != nil {
				t.Fatalf("%v: %v", cmd, err)
			}
			// IPv6 duplicate address detection may still run at the
			// first look: its flag is not a change.
			out = strings.ReplaceAll(out, " tentative", "")
			fmt.Fprintf(&b, "$ %s\n%s", strings.Join(cmd, " "), out)
		}
		return b.String()
	}
	before := snap()
	a4 := c.newMember(c4, api.RoleAgent)
	cfgDir := lab.TempDir("cloud4-etc")
	cfg := filepath.Join(cfgDir, "config.yaml")
	writeFile(t, cfg, fmt.Sprintf("server: https://%s\ntoken: %s\ndata-dir: %s\nnode-name: cloud4\ncni-conf-dir: %s\n",
		netip.AddrPortFrom(c1.PublicIP, serverPort), c.token, a4.dataDir, a4.cniDir))
	writeFile(t, cfg+".d/10-addresses.yaml", fmt.Sprintf("node-ip: %s\nnode-external-ip:\n  - %s\n", c4.LANIP, c4.PublicIP))
	c.start(a4, flagsOnly("--config", cfg))
	c.waitNodes(a2, a3, a4)

	start := time.Now()
	rep := c.waitCheck("trellis check to name cloud2↔cloud3 with no handshake", func(rep *api.CheckReport, code int) error {
		if code == 0 || rep.OK {
			return fmt.Errorf("check passes (exit %d)", code)
		}
		for _, p := range rep.Pairs {
			blocked := (p.From == "cloud2" && p.To == "cloud3") || (p.From == "cloud3" && p.To == "cloud2")
			switch {
			case blocked && p.Status != api.CheckNoHandshake:
				return fmt.Errorf("%s→%s: %s (%s)", p.From, p.To, p.Status, p.Detail)
			case !blocked && !p.OK:
				return fmt.Errorf("%s→%s should work: %s (%s)", p.From, p.To, p.Status, p.Detail)
			}
		}
		return nil
	})
	t.Logf("measured: verdict %v after all nodes were ready (one check takes up to 5 s)", time.Since(start).Round(100*time.Millisecond))
	if len(rep.Pairs) != 6 {
		t.Errorf("want 6 pairs of 3 nodes (the server has no node), got %d", len(rep.Pairs))
	}
	out, code, err := c.trellisIn(c1.NS, "check", "--admin-config", c.adminConfig())
	if err != nil || code == 0 || !strings.Contains(out, "cloud2 → cloud3: no handshake") || !strings.Contains(out, "cloud3 → cloud2: no handshake") || !strings.Contains(out, "2 of 6 pairs fail") {
		t.Errorf("trellis check (table): want exit non-zero naming both directions; exit %d, %v\n%s", code, err, out)
	}
	t.Logf("trellis check:\n%s", out)

	t.Run("cleanup", func(t *testing.T) {
		if _, err := os.Stat(filepath.Join(a4.cniDir, conflistName)); err != nil {
			t.Fatalf("the agent wrote no CNI config: %v", err)
		}
		out, code, err := c.trellisIn(c4.NS, "agent", "--config", cfg, "--cleanup")
		if err != nil || code == 0 || !strings.Contains(out, "stop it first") {
			t.Errorf("cleanup while the agent runs: want a refusal that says to stop it; exit %d, %v\n%s", code, err, out)
		}
		if err := a4.proc.Stop(); err != nil {
			t.Fatal(err)
		}
		out, code, err = c.trellisIn(c4.NS, "agent", "--config", cfg, "--cleanup")
		if err != nil || code != 0 {
			t.Fatalf("trellis agent --cleanup: exit %d, %v\n%s", code, err, out)
		}
		after := snap()
		if after != before {
			t.Errorf("cleanup left the machine changed.\nbefore:\n%s\nafter:\n%s", before, after)
		}
		if _, err := os.Stat(filepath.Join(a4.cniDir, conflistName)); !os.IsNotExist(err) {
			t.Errorf("the CNI config is still there: %v", err)
		}
		if _, err := os.Stat(filepath.Join(a4.dataDir, "agent", "node.key")); err != nil {
			t.Errorf("cleanup must keep the data dir (the node's identity): %v", err)
		}
		// A second run finds nothing to do and succeeds.
		if out, code, err := c.trellisIn(c4.NS, "cleanup", "--data-dir", a4.dataDir, "--cni-conf-dir", a4.cniDir); err != nil || code != 0 {
			t.Errorf("second clean-up: exit %d, %v\n%s", code, err, out)
		}
	})
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}
