//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// tailscaleTools holds tailscaled, tailscale and tsctl, built once per run
// by scripts/build-tailscale.sh (cached between runs, keyed by version).
var tailscaleTools struct {
	once sync.Once
	dir  string
	err  error
}

// tailscaleDir returns the directory of the Tailscale binaries, building
// them if the cache has none. TRELLIS_E2E_TAILSCALE_BUILD=0 skips the test
// instead of building.
func tailscaleDir(t testing.TB) string {
	t.Helper()
	tt := &tailscaleTools
	tt.once.Do(func() {
		root, err := moduleRoot()
		if err != nil {
			tt.err = err
			return
		}
		script := filepath.Join(root, "scripts", "build-tailscale.sh")
		if os.Getenv("TRELLIS_E2E_TAILSCALE_BUILD") == "0" {
			out, err := exec.Command("sh", "-c", `d="${TRELLIS_TAILSCALE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/trellis-e2e/tailscale-$(awk '$1=="tailscale.com"{print $2} $2=="tailscale.com"{print $3}' "$1" | head -n1)}"; [ -x "$d/tsctl" ] && echo "$d"`, "sh", filepath.Join(root, "e2e/tailscale/tools/go.mod")).Output()
			if err != nil {
				tt.err = errSkip
				return
			}
			tt.dir = strings.TrimSpace(string(out))
			return
		}
		start := time.Now()
		cmd := exec.Command(script)
		cmd.Dir = root
		cmd.Stderr = os.Stderr
		out, err := cmd.Output()
		if err != nil {
			tt.err = fmt.Errorf("%s: %w", script, err)
			return
		}
		tt.dir = strings.TrimSpace(string(out))
		if d := time.Since(start); d > 5*time.Second {
			fmt.Fprintf(os.Stderr, "e2e: built the Tailscale binaries in %v\n", d.Round(time.Second))
		}
	})
	if tt.err == errSkip {
		t.Skip("no cached Tailscale binaries and TRELLIS_E2E_TAILSCALE_BUILD=0; run scripts/build-tailscale.sh")
	}
	if tt.err != nil {
		t.Fatal(tt.err)
	}
	return tt.dir
}

var errSkip = fmt.Errorf("skip")

// Tailnet is an offline Tailscale network in a lab: a control server
// (tsctl: testcontrol, DERP and STUN) on a machine of its own, and
// tailscaled on the machines that join it. Nothing in it can reach the
// real Tailscale services: the lab has no way out, and tailscaled runs with
// TS_PANIC_IF_HIT_MAIN_CONTROL.
type Tailnet struct {
	lab     *Lab
	bin     string // tailscaled, tailscale, tsctl
	Ctl     *Node
	ctlProc *Proc
	// URL is the control URL (HTTPS, as tailscaled wants for an IP that
	// is not private); Admin the plain-HTTP admin API of tsctl.
	URL, Admin string
	// AuthKey is the key nodes must present.
	AuthKey string
	ca      string

	mu     sync.Mutex
	byNode map[*Node]*TSNode // the tailscaled Start started on each machine
}

// NewTailnet starts a control server on a new machine named "tsctl" with
// public address ctlCIDR. Routes inside autoApprove (comma-separated
// prefixes; empty: none) are approved as soon as they are advertised.
func (l *Lab) NewTailnet(ctlCIDR, autoApprove string) *Tailnet {
	l.t.Helper()
	bin := tailscaleDir(l.t)
	ctl := l.Machine("tsctl", ctlCIDR, nil, "")
	dir := l.TempDir("tsctl")
	tn := &Tailnet{
		lab: l, bin: bin, Ctl: ctl,
		URL:     "https://" + ctl.PublicIP.String() + ":443",
		Admin:   "http://" + ctl.PublicIP.String() + ":8080",
		AuthKey: fmt.Sprintf("tskey-e2e-%d-%d", os.Getpid(), time.Now().UnixNano()),
		ca:      filepath.Join(dir, "ca.pem"),
		byNode:  map[*Node]*TSNode{},
	}
	tn.ctlProc = ctl.Start(filepath.Join(bin, "tsctl"), "-listen", ctl.PublicIP.String()+":8080",
		"-ca-out", tn.ca, "-authkey", tn.AuthKey, "-auto-approve", autoApprove)
	WaitFor(l.t, defaultTimeout, "tsctl to answer", func() error {
		if err := tn.ctlProc.Err(); err != nil {
			return err
		}
		_, err := tn.adminGet("/tsctl/healthz")
		return err
	})
	return tn
}

// adminGet GETs path from tsctl's admin API (from the control server's
// namespace, with the test binary as client).
func (tn *Tailnet) adminGet(path string) (string, error) {
	return tn.adminCall(http.MethodGet, path)
}

func (tn *Tailnet) adminCall(method, path string) (string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	return tn.lab.Output(tn.Ctl.NS, "env", httpHelperEnv+"=1", self, method, tn.Admin+path)
}

// httpHelperEnv makes the test binary an HTTP client (see init): the
// admin API is reachable only inside the lab.
const httpHelperEnv = "TRELLIS_E2E_HTTP_HELPER"

func init() {
	if os.Getenv(httpHelperEnv) == "" {
		return
	}
	if err := httpHelper(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "http helper:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// httpHelper does one request (args: METHOD URL) and prints the body.
func httpHelper(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("want METHOD URL, got %q", args)
	}
	req, err := http.NewRequest(args[0], args[1], nil)
	if err != nil {
		return err
	}
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s: %s: %s", args[0], args[1], resp.Status, body)
	}
	_, err = os.Stdout.Write(body)
	return err
}

// TSNodeInfo is a node as tsctl lists it.
type TSNodeInfo struct {
	Name       string         `json:"name"`
	Addresses  []netip.Prefix `json:"addresses"`
	Advertised []netip.Prefix `json:"advertised"`
	Approved   []netip.Prefix `json:"approved"`
}

// Nodes lists the nodes the control server knows, by host name.
func (tn *Tailnet) Nodes() (map[string]TSNodeInfo, error) {
	out, err := tn.adminGet("/tsctl/nodes")
	if err != nil {
		return nil, err
	}
	var list []TSNodeInfo
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		return nil, fmt.Errorf("tsctl nodes: %w: %q", err, out)
	}
	m := map[string]TSNodeInfo{}
	for _, n := range list {
		m[n.Name] = n
	}
	return m, nil
}

// Approve approves routes of the node with host name name, by hand.
func (tn *Tailnet) Approve(name string, routes ...netip.Prefix) error {
	var s []string
	for _, r := range routes {
		s = append(s, r.String())
	}
	_, err := tn.adminCall(http.MethodPost, "/tsctl/approve?node="+url.QueryEscape(name)+"&routes="+url.QueryEscape(strings.Join(s, ",")))
	return err
}

// TSNode is tailscaled running on a lab machine.
type TSNode struct {
	*Node
	Proc *Proc
	dir  string
	sock string
	// PathDir holds a `tailscale` command bound to this node's tailscaled:
	// put it first on PATH of what should use it.
	PathDir string
	tn      *Tailnet
}

// Start starts tailscaled on n, not logged in. It runs in TUN mode
// (tailscale0) with the nftables firewall, in a mount namespace with
// private /run/tailscale and /etc/resolv.conf, its socket and state in the
// lab's scratch directory.
func (tn *Tailnet) Start(n *Node) *TSNode {
	l := tn.lab
	l.t.Helper()
	dir := l.TempDir("tailscaled-" + n.Name)
	ts := &TSNode{Node: n, dir: dir, sock: filepath.Join(dir, "tailscaled.sock"), PathDir: filepath.Join(dir, "bin"), tn: tn}
	if err := os.MkdirAll(ts.PathDir, 0o755); err != nil {
		l.t.Fatal(err)
	}
	wrapper := fmt.Sprintf("#!/bin/sh\nexec %s --socket=%s \"$@\"\n", filepath.Join(tn.bin, "tailscale"), ts.sock)
	if err := os.WriteFile(filepath.Join(ts.PathDir, "tailscale"), []byte(wrapper), 0o755); err != nil {
		l.t.Fatal(err)
	}
	resolv := filepath.Join(dir, "resolv.conf")
	if err := os.WriteFile(resolv, nil, 0o644); err != nil {
		l.t.Fatal(err)
	}
	script := `mkdir -p /run/tailscale && mount -t tmpfs tmpfs /run/tailscale && mount --bind "$1" /etc/resolv.conf && shift && exec "$@"`
	ts.Proc = n.Start("sh", "-c", script, "sh", resolv, "env",
		"SSL_CERT_FILE="+tn.ca, "TS_LOGS_DIR="+dir, "TS_PANIC_IF_HIT_MAIN_CONTROL=1", "TS_DISABLE_PORTMAPPER=1",
		"TS_DEBUG_FIREWALL_MODE=nftables", "TS_NETCHECK_GENERATE_204_URL="+tn.URL+"/generate_204",
		filepath.Join(tn.bin, "tailscaled"), "--no-logs-no-support", "--tun=tailscale0",
		"--statedir="+filepath.Join(dir, "state"), "--socket="+ts.sock, "--port=41641")
	WaitFor(l.t, defaultTimeout, "tailscaled on "+n.Name+" to answer on its socket", func() error {
		if err := ts.Proc.Err(); err != nil {
			return err
		}
		_, err := ts.CLI("status", "--json")
		return err
	})
	tn.mu.Lock()
	tn.byNode[n] = ts
	tn.mu.Unlock()
	return ts
}

// node returns the tailscaled that Start started on n, or nil.
func (tn *Tailnet) node(n *Node) *TSNode {
	tn.mu.Lock()
	defer tn.mu.Unlock()
	return tn.byNode[n]
}

// CLI runs the tailscale command against this node's tailscaled.
func (ts *TSNode) CLI(args ...string) (string, error) {
	return ts.lab.Output(ts.NS, append([]string{filepath.Join(ts.PathDir, "tailscale")}, args...)...)
}

// Up logs the node in the way an operator would (key on the command line:
// this is the user, not Trellis).
func (ts *TSNode) Up(args ...string) error {
	_, err := ts.CLI(append([]string{"up", "--auth-key=" + ts.tn.AuthKey, "--login-server=" + ts.tn.URL,
		"--hostname=" + ts.Name, "--accept-dns=false", "--timeout=60s"}, args...)...)
	return err
}

// IPs returns the node's Tailscale addresses (IPv4 first).
func (ts *TSNode) IPs() ([]netip.Addr, error) {
	out, err := ts.CLI("ip")
	if err != nil {
		return nil, err
	}
	var ips []netip.Addr
	for _, f := range strings.Fields(out) {
		a, err := netip.ParseAddr(f)
		if err != nil {
			return nil, fmt.Errorf("tailscale ip printed %q", out)
		}
		ips = append(ips, a)
	}
	slices.SortFunc(ips, netip.Addr.Compare)
	return ips, nil
}

// AdvertisedRoutes returns what `tailscale get advertise-routes` prints.
func (ts *TSNode) AdvertisedRoutes() ([]netip.Prefix, error) {
	out, err := ts.CLI("get", "advertise-routes")
	if err != nil {
		return nil, err
	}
	var ps []netip.Prefix
	for _, f := range strings.FieldsFunc(out, func(r rune) bool { return r == ',' || r == '\n' || r == ' ' }) {
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return nil, fmt.Errorf("tailscale get advertise-routes printed %q", out)
		}
		ps = append(ps, p)
	}
	slices.SortFunc(ps, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return ps, nil
}
