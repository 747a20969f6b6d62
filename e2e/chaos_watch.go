//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/client"
)

// The chaos suite's watchers: a helper in each server's namespace lists
// the nodes through that server's API twice a second and logs what it
// saw, so that the test can check every listing for overlapping pod
// CIDRs and for nodes that should not be there.

// watchInterval is how often a watcher lists the nodes.
const watchInterval = 500 * time.Millisecond

func init() { extraHelpers["chaos-watch"] = chaosWatchHelper }

// chaosWatchHelper lists the nodes through the server of the admin config
// at path every watchInterval and prints, per listing, "<unixnano of the
// request> nodes <name>|<key>|<cidr>[,<cidr>]..." (one field per node), or
// "<unixnano> err <message>". It runs until killed.
func chaosWatchHelper(path string) error {
	cfg, err := client.ReadAdminConfig(path)
	if err != nil {
		return err
	}
	c, err := client.New(cfg)
	if err != nil {
		return err
	}
	out := bufio.NewWriter(os.Stdout)
	for {
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		nodes, err := c.Nodes(ctx)
		cancel()
		if err != nil {
			fmt.Fprintf(out, "%d err %s\n", start.UnixNano(), strings.ReplaceAll(err.Error(), "\n", " "))
		} else {
			fmt.Fprintf(out, "%d nodes", start.UnixNano())
			for _, n := range nodes {
				var cidrs []string
				for _, p := range n.PodCIDRs {
					cidrs = append(cidrs, p.String())
				}
				fmt.Fprintf(out, " %s|%s|%s", n.Name, n.PublicKey, strings.Join(cidrs, ","))
			}
			fmt.Fprintln(out)
		}
		out.Flush()
		if d := watchInterval - time.Since(start); d > 0 {
			time.Sleep(d)
		}
	}
}

// listing is one node listing a watcher logged.
type listing struct {
	at     time.Time // when the request started
	server string
	nodes  []listedNode
}

type listedNode struct {
	name  string
	key   string
	cidrs []netip.Prefix
}

// parseWatchLog returns the listings of a watcher's log and the number of
// failed requests.
func parseWatchLog(server, log string) ([]listing, int) {
	var ls []listing
	failed := 0
	for _, line := range strings.Split(log, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			continue
		}
		if f[1] == "err" {
			failed++
			continue
		}
		if f[1] != "nodes" {
			continue
		}
		l := listing{at: time.Unix(0, ns), server: server}
		for _, field := range f[2:] {
			parts := strings.SplitN(field, "|", 3)
			if len(parts) != 3 {
				continue
			}
			n := listedNode{name: parts[0], key: parts[1]}
			for _, c := range strings.Split(parts[2], ",") {
				if p, err := netip.ParsePrefix(c); err == nil {
					n.cidrs = append(n.cidrs, p)
				}
			}
			l.nodes = append(l.nodes, n)
		}
		ls = append(ls, l)
	}
	return ls, failed
}

// overlaps returns a sentence for each pair of nodes of one listing whose
// pod CIDRs are the same or overlap, and for each node without one.
func overlaps(nodes []listedNode) []string {
	var bad []string
	for i, a := range nodes {
		if len(a.cidrs) == 0 {
			bad = append(bad, fmt.Sprintf("%s has no pod CIDR", a.name))
		}
		for _, b := range nodes[i+1:] {
			for _, pa := range a.cidrs {
				for _, pb := range b.cidrs {
					if pa.Overlaps(pb) {
						bad = append(bad, fmt.Sprintf("%s (%s) and %s (%s) overlap", a.name, pa, b.name, pb))
					}
				}
			}
		}
	}
	return bad
}

// apiNodesAsListed turns an API listing into the watcher's form.
func apiNodesAsListed(nodes map[string]api.Node) []listedNode {
	var out []listedNode
	for _, n := range nodes {
		out = append(out, listedNode{name: n.Name, key: n.PublicKey.String(), cidrs: slices.Clone(n.PodCIDRs)})
	}
	return out
}

// usage is one sample of a process's resources.
type usage struct {
	at         time.Time
	pid        int
	rssKB      int
	goroutines int
}

// sampleUsage reads the resident set size of p's current run from
// /proc and its goroutine count from its metrics endpoint (127.0.0.1:port
// in its namespace). A stopped or paused process gives an error.
func sampleUsage(p *Proc, port int) (usage, error) {
	if !p.Running() {
		return usage{}, fmt.Errorf("%s is not running", p.Name)
	}
	u := usage{at: time.Now(), pid: p.Pid()}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", u.pid))
	if err != nil {
		return usage{}, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			u.rssKB, _ = strconv.Atoi(f[1])
		}
	}
	out, err := p.lab.Output(p.NS, "curl", "-s", "-m", "3", fmt.Sprintf("http://127.0.0.1:%d/metrics", port))
	if err != nil {
		return usage{}, err
	}
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[0] == "go_goroutines" {
			u.goroutines, _ = strconv.Atoi(f[1])
		}
	}
	if u.goroutines == 0 {
		return usage{}, fmt.Errorf("%s: no go_goroutines in its metrics", p.Name)
	}
	return u, nil
}
