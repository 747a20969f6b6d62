package mesh_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/mesh"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/trellis-mesh/trellis/internal/mesh/meshtest"
)

// node is a test binary running runNode inside a network namespace.
type node struct {
	t     testing.TB
	ns    string
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Scanner
}

// syncBuffer collects a node's stderr for the test log.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startNode(t testing.TB, ns string) *node {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	cmd := meshtest.NodeCommand(ctx, ns, os.Args[0])
	cmd.Env = append(os.Environ(), nodeEnv+"=1")
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("start node in %s: %v", ns, err)
	}
	t.Cleanup(func() {
		stdin.Close()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill() // only the node process this test started
			<-done
		}
		cancel()
		if t.Failed() {
			t.Logf("node %s log:\n%s", ns, stderr.String())
		}
	})
	out := bufio.NewScanner(stdout)
	out.Buffer(make([]byte, 1<<20), 1<<20)
	return &node{t: t, ns: ns, cmd: cmd, stdin: stdin, out: out}
}

func (n *node) do(req nodeRequest) nodeResponse {
	n.t.Helper()
	b, err := json.Marshal(req)
	if err != nil {
		n.t.Fatal(err)
	}
	if _, err := n.stdin.Write(append(b, '\n')); err != nil {
		n.t.Fatalf("node %s: send %s: %v", n.ns, req.Op, err)
	}
	if !n.out.Scan() {
		n.t.Fatalf("node %s: no answer to %s (process died?): %v", n.ns, req.Op, n.out.Err())
	}
	var resp nodeResponse
	if err := json.Unmarshal(n.out.Bytes(), &resp); err != nil {
		n.t.Fatalf("node %s: bad answer %q: %v", n.ns, n.out.Text(), err)
	}
	return resp
}

// must runs req and fails the test on error.
func (n *node) must(req nodeRequest) nodeResponse {
	n.t.Helper()
	resp := n.do(req)
	if resp.Error != "" {
		n.t.Fatalf("node %s: %s: %s", n.ns, req.Op, resp.Error)
	}
	return resp
}

func (n *node) status(pub [32]byte) mesh.PeerStatus {
	n.t.Helper()
	for _, s := range n.must(nodeRequest{Op: "status"}).Status {
		if s.PublicKey == pub {
			return s
		}
	}
	n.t.Fatalf("node %s: peer %s not in status", n.ns, wgtypes.Key(pub))
	return mesh.PeerStatus{}
}

func newKey(t testing.TB) wgtypes.Key {
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestNamespaceMesh runs two nodes, each a process in its own network
// and mount namespace with interface trellis-wg, joined by a veth:
//
//	nsA: va 192.0.2.1/24, trellis-wg 10.42.0.0/32  <->  nsB: vb 192.0.2.2/24, trellis-wg 10.42.1.0/32
func TestNamespaceMesh(t *testing.T) {
	meshtest.RequireRoot(t)
	if _, err := exec.LookPath("wg"); err != nil {
		t.Skip("skipping: wireguard-tools (wg) is not installed")
	}
	nsA := meshtest.NetNS(t, meshtest.Name("trm-a"))
	nsB := meshtest.NetNS(t, meshtest.Name("trm-b"))
	meshtest.Veth(t, nsA, "va", "192.0.2.1/24", nsB, "vb", "192.0.2.2/24")
	// A derives its MTU from the default route's interface (1400 - 80).
	meshtest.IP(t, "-n", nsA, "link", "set", "va", "mtu", "1400")
	meshtest.IP(t, "-n", nsA, "route", "add", "default", "via", "192.0.2.2")
	// B finds a stale interface left by a crashed run and replaces it.
	meshtest.IP(t, "-n", nsB, "tuntap", "add", "dev", mesh.DefaultInterface, "mode", "tun")

	keyA, keyB, keyC := newKey(t), newKey(t), newKey(t)
	pubA, pubB, pubC := [32]byte(keyA.PublicKey()), [32]byte(keyB.PublicKey()), [32]byte(keyC.PublicKey())

	a, b := startNode(t, nsA), startNode(t, nsB)
	ra := a.must(nodeRequest{Op: "open", Config: mesh.Config{PrivateKey: keyA}}) // mesh.ModeAuto
	rb := b.must(nodeRequest{Op: "open", Config: mesh.Config{PrivateKey: keyB, Mode: mesh.ModeUserspace, MTU: 1320}})
	if rb.Kind != mesh.KindUserspace {
		t.Errorf("B kind = %q, want %q", rb.Kind, mesh.KindUserspace)
	}
	if ra.MTU != 1320 {
		t.Errorf("A derived MTU %d, want 1400-80 = 1320", ra.MTU)
	}
	t.Logf("A is %s WireGuard", ra.Kind)

	cluster := pfx("10.42.0.0/16")
	a.must(nodeRequest{Op: "addrs", Prefixes: pfx("10.42.0.0/32")})
	b.must(nodeRequest{Op: "addrs", Prefixes: pfx("10.42.1.0/32")})
	a.must(nodeRequest{Op: "routes", Prefixes: cluster})
	b.must(nodeRequest{Op: "routes", Prefixes: cluster})

	peerB := mesh.Peer{PublicKey: pubB, Endpoint: netip.MustParseAddrPort("192.0.2.2:51820"), AllowedIPs: pfx("10.42.1.0/24")}
	peerC := mesh.Peer{PublicKey: pubC, AllowedIPs: pfx("10.42.2.0/24")} // never answers; no endpoint, no traffic
	a.must(nodeRequest{Op: "peers", Peers: []mesh.Peer{peerB, peerC}})
	b.must(nodeRequest{Op: "peers", Peers: []mesh.Peer{{PublicKey: pubA, Endpoint: netip.MustParseAddrPort("192.0.2.1:51820"), AllowedIPs: pfx("10.42.0.0/24")}}})

	if err := meshtest.Ping(nsA, "10.42.1.0", 3); err != nil {
		t.Fatalf("ping across the tunnel: %v", err)
	}
	if err := meshtest.Ping(nsB, "10.42.0.0", 1); err != nil {
		t.Fatalf("ping back across the tunnel: %v", err)
	}
	before := a.status(pubB)
	if before.LastHandshake.IsZero() || before.ReceiveBytes == 0 {
		t.Fatalf("A's status of B after ping: %+v, want a handshake and received bytes", before)
	}
	if got := b.status(pubA).Endpoint; got != netip.MustParseAddrPort("192.0.2.1:51820") {
		t.Errorf("B's endpoint for A = %s", got)
	}

	// `wg show` reaches the device through the node's UAPI socket.
	dump := a.must(nodeRequest{Op: "wg"}).Out
	if !strings.Contains(dump, wgtypes.Key(pubB).String()) || !strings.Contains(dump, wgtypes.Key(pubC).String()) {
		t.Fatalf("wg show lacks peers B and C:\n%s", dump)
	}

	// Same desired state again, then C's allowed IPs change: B's session
	// must survive untouched (same handshake, counters not reset).
	a.must(nodeRequest{Op: "peers", Peers: []mesh.Peer{peerB, peerC}})
	peerC.AllowedIPs = pfx("10.42.2.0/24", "10.42.3.0/24")
	a.must(nodeRequest{Op: "peers", Peers: []mesh.Peer{peerB, peerC}})
	after := a.status(pubB)
	if !after.LastHandshake.Equal(before.LastHandshake) || after.ReceiveBytes < before.ReceiveBytes {
		t.Errorf("B's session was disturbed by a change to C: before %+v, after %+v", before, after)
	}
	if got := a.status(pubC).AllowedIPs; !equalPrefixes(got, peerC.AllowedIPs) {
		t.Errorf("C's allowed IPs = %v, want %v", got, peerC.AllowedIPs)
	}
	if err := meshtest.Ping(nsA, "10.42.1.0", 1); err != nil {
		t.Fatalf("ping after changing another peer: %v", err)
	}

	// Removing C removes it from `wg show`.
	a.must(nodeRequest{Op: "peers", Peers: []mesh.Peer{peerB}})
	dump = a.must(nodeRequest{Op: "wg"}).Out
	if strings.Contains(dump, wgtypes.Key(pubC).String()) || !strings.Contains(dump, wgtypes.Key(pubB).String()) {
		t.Errorf("after removing C, wg show is:\n%s", dump)
	}

	// Routes: only tagged ones are owned.
	meshtest.IP(t, "-n", nsA, "route", "add", "10.99.0.0/16", "dev", mesh.DefaultInterface) // not ours
	a.must(nodeRequest{Op: "routes", Prefixes: pfx("10.42.0.0/16", "10.43.0.0/16", "fd00:42::/56")})
	routes := meshtest.IP(t, "-n", nsA, "route", "show", "dev", mesh.DefaultInterface) +
		meshtest.IP(t, "-n", nsA, "-6", "route", "show", "dev", mesh.DefaultInterface)
	for _, want := range []string{"10.42.0.0/16 proto 116", "10.43.0.0/16 proto 116", "fd00:42::/56 proto 116", "10.99.0.0/16"} {
		if !strings.Contains(routes, want) {
			t.Errorf("routes lack %q:\n%s", want, routes)
		}
	}
	a.must(nodeRequest{Op: "routes", Prefixes: cluster})
	routes = meshtest.IP(t, "-n", nsA, "route", "show", "dev", mesh.DefaultInterface) +
		meshtest.IP(t, "-n", nsA, "-6", "route", "show", "dev", mesh.DefaultInterface)
	if strings.Contains(routes, "10.43.0.0/16") || strings.Contains(routes, "fd00:42::/56") ||
		!strings.Contains(routes, "10.99.0.0/16") || !strings.Contains(routes, "10.42.0.0/16") {
		t.Errorf("after SetRoutes(%v) routes are:\n%s", cluster, routes)
	}

	// Addresses become exactly the desired ones.
	a.must(nodeRequest{Op: "addrs", Prefixes: pfx("10.42.0.0/32", "10.42.0.5/32", "fd00:42::/128")})
	a.must(nodeRequest{Op: "addrs", Prefixes: pfx("10.42.0.0/32", "fd00:42::/128")})
	addrs := meshtest.IP(t, "-n", nsA, "-br", "addr", "show", "dev", mesh.DefaultInterface)
	if !strings.Contains(addrs, "10.42.0.0/32") || !strings.Contains(addrs, "fd00:42::/128") || strings.Contains(addrs, "10.42.0.5") {
		t.Errorf("addresses after SetAddresses: %s", addrs)
	}

	// Close: a userspace device disappears, nothing leaks, Close twice is fine.
	for _, n := range []*node{a, b} {
		kind := ra.Kind
		if n == b {
			kind = rb.Kind
		}
		if kind == mesh.KindKernel {
			n.must(nodeRequest{Op: "remove"})
		}
		n.must(nodeRequest{Op: "close"})
		n.must(nodeRequest{Op: "close"})
		if resp := n.do(nodeRequest{Op: "peers"}); resp.Error == "" {
			t.Errorf("node %s: SetPeers after Close succeeded", n.ns)
		}
		if _, err := meshtest.Run("ip", "-n", n.ns, "link", "show", mesh.DefaultInterface); err == nil {
			t.Errorf("node %s: %s still exists after Close", n.ns, mesh.DefaultInterface)
		}
		n.must(nodeRequest{Op: "leaks"})
	}
}

func equalPrefixes(a, b []netip.Prefix) bool {
	canonical := func(ps []netip.Prefix) []netip.Prefix {
		out := make([]netip.Prefix, 0, len(ps))
		for _, p := range ps {
			out = append(out, p.Masked())
		}
		slices.SortFunc(out, func(x, y netip.Prefix) int {
			if c := x.Addr().Compare(y.Addr()); c != 0 {
				return c
			}
			return x.Bits() - y.Bits()
		})
		return slices.Compact(out)
	}
	a, b = canonical(a), canonical(b)
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestUnderlayMTU(t *testing.T) {
	meshtest.RequireRoot(t)
	nsA := meshtest.NetNS(t, meshtest.Name("trm-a"))
	nsB := meshtest.NetNS(t, meshtest.Name("trm-b"))
	meshtest.Veth(t, nsA, "va", "192.0.2.1/24", nsB, "vb", "192.0.2.2/24")
	meshtest.IP(t, "-n", nsA, "link", "set", "va", "mtu", "1450")
	var noDefault error
	var direct, viaRouteMTU, viaDefault int
	err := meshtest.InNetNS(nsA, func() error {
		_, noDefault = mesh.UnderlayMTU(netip.Addr{})
		var err error
		if direct, err = mesh.UnderlayMTU(netip.MustParseAddr("192.0.2.2")); err != nil {
			return err
		}
		if out, err := meshtest.Run("ip", "-n", nsA, "route", "add", "198.51.100.0/24", "via", "192.0.2.2", "mtu", "1300"); err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		if viaRouteMTU, err = mesh.UnderlayMTU(netip.MustParseAddr("198.51.100.7")); err != nil {
			return err
		}
		if out, err := meshtest.Run("ip", "-n", nsA, "route", "add", "default", "via", "192.0.2.2"); err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		viaDefault, err = mesh.UnderlayMTU(netip.Addr{})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if noDefault == nil || !strings.Contains(noDefault.Error(), "no default route") {
		t.Errorf("mesh.UnderlayMTU without a default route: %v, want an error", noDefault)
	}
	if direct != 1450 || viaRouteMTU != 1300 || viaDefault != 1450 {
		t.Errorf("UnderlayMTU: direct %d (want 1450), route with mtu %d (want 1300), default %d (want 1450)", direct, viaRouteMTU, viaDefault)
	}
}
