package server

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
)

func TestResolveEgress(t *testing.T) {
	pfx := netip.MustParsePrefix
	ip := netip.MustParseAddr
	nodes := []api.Node{
		{Name: "cloud1", InternalIPs: []netip.Addr{ip("10.1.0.10")}, ExternalIPs: []netip.Addr{ip("198.51.100.10")}, PodCIDRs: []netip.Prefix{pfx("10.42.0.0/24")}},
		{Name: "home1", InternalIPs: []netip.Addr{ip("192.168.1.5"), ip("fd00:1::5")}, ExternalIPs: []netip.Addr{ip("203.0.113.7")}, PodCIDRs: []netip.Prefix{pfx("10.42.1.0/24"), pfx("fd00:42:0:1::/64")}},
		{Name: "noip", PodCIDRs: []netip.Prefix{pfx("10.42.2.0/24")}},
	}
	ports := func(node string) int {
		if node == "cloud1" {
			return 10250
		}
		return 11250 // a kubelet on another port, as its Node says
	}
	for _, tc := range []struct {
		target string
		node   string
		dst    string
		status int // refusal
	}{
		{"cloud1:10250", "cloud1", "10.1.0.10:10250", 0},
		{"home1:11250", "home1", "192.168.1.5:11250", 0},
		{"10.1.0.10:10250", "cloud1", "10.1.0.10:10250", 0},
		{"198.51.100.10:10250", "cloud1", "10.1.0.10:10250", 0},      // external → node IP
		{"[fd00:1::5]:11250", "home1", "[fd00:1::5]:11250", 0},       // IPv6 node IP
		{"203.0.113.7:11250", "home1", "192.168.1.5:11250", 0},       // NAT address → node IP
		{"10.42.1.17:8080", "home1", "10.42.1.17:8080", 0},           // a pod, any port
		{"[fd00:42:0:1::17]:80", "home1", "[fd00:42:0:1::17]:80", 0}, // an IPv6 pod
		{"cloud1:22", "", "", http.StatusForbidden},                  // not the kubelet's port
		{"10.1.0.10:6443", "", "", http.StatusForbidden},             // not the kubelet's port
		{"10.42.1.0:80", "", "", http.StatusForbidden},               // the node's tunnel address, not a pod
		{"8.8.8.8:53", "", "", http.StatusForbidden},                 // not in the cluster
		{"kubernetes.default:443", "", "", http.StatusForbidden},     // not a node
		{"noip:11250", "", "", http.StatusBadGateway},                // a node with no IP
		{"cloud1", "", "", http.StatusBadRequest},                    // no port
		{"cloud1:0", "", "", http.StatusBadRequest},                  // port 0
		{"cloud1:99999", "", "", http.StatusBadRequest},              // port out of range
		{"[::ffff:10.1.0.10]:10250", "cloud1", "10.1.0.10:10250", 0}, // IPv4-mapped
	} {
		got, err := resolveEgress(nodes, tc.target, ports)
		if tc.status != 0 {
			ref, ok := err.(*egressRefusal)
			if !ok || ref.status != tc.status {
				t.Errorf("%s: got %+v, %v; want a %d refusal", tc.target, got, err, tc.status)
			}
			continue
		}
		if err != nil || got.node != tc.node || got.dst.String() != tc.dst {
			t.Errorf("%s: got %s %s, %v; want %s %s", tc.target, got.node, got.dst, err, tc.node, tc.dst)
		}
	}
}

// connect sends a CONNECT over conn and returns the status line.
func connect(t *testing.T, conn net.Conn, target string) string {
	t.Helper()
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := fmt.Fprintf(conn, "CONNECT %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", target); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		t.Fatalf("CONNECT %s: %v", target, err)
	}
	return strings.TrimSpace(line)
}

// TestEgressDoors checks who may CONNECT and what the refusals say: the
// unix socket (0600) for anyone who can open it, the HTTPS port only for
// an egress certificate; a node without a tunnel gets a 502 naming it.
func TestEgressDoors(t *testing.T) {
	ts := startServer(t, t.TempDir(), nil)
	mustJoin(t, ts, joinReq("a", 1, pwA))
	for deadline := time.Now().Add(10 * time.Second); len(ts.hub.snapshot().nodes) == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the joined node never reached the hub")
		}
	}
	sock := filepath.Join(ts.dir, "server", EgressSocketName)
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o600 || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("egress socket %s: %v, mode %v; want a 0600 socket", sock, err, fi.Mode())
	}
	uds := func(target string) string {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return connect(t, c, target)
	}
	for target, want := range map[string]string{
		"a:10250":          "HTTP/1.1 502 node a is not reachable through Trellis (kubelet 10.1.0.1:10250): its agent has never connected its tunnel",
		"a:22":             "HTTP/1.1 403 port 22 of node a is not its kubelet's (10250)",
		"192.0.2.99:443":   "HTTP/1.1 403 192.0.2.99 is neither an address of a node",
		"10.42.0.5:80":     "HTTP/1.1 502 node a is not reachable through Trellis (pod 10.42.0.5:80)",
		"not-a-node:10250": "HTTP/1.1 403 \"not-a-node\" is not a node of this Trellis cluster",
	} {
		if got := uds(target); !strings.HasPrefix(got, want) {
			t.Errorf("CONNECT %s on the socket: %q, want %q…", target, got, want)
		}
	}

	// The HTTPS port: only an egress credential.
	tlsConnect := func(cert *tls.Certificate, target string) string {
		cfg := &tls.Config{RootCAs: ts.ca.Pool(), NextProtos: []string{"http/1.1"}}
		if cert != nil {
			cfg.Certificates = []tls.Certificate{*cert}
		}
		c, err := tls.Dial("tcp", strings.TrimPrefix(ts.URL(), "https://"), cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return connect(t, c, target)
	}
	admin := ts.adminCert(t)
	nodeA := mustJoin(t, ts, joinReq("a", 1, pwA)).cert
	files, err := WriteEgressConfig(EgressConfig{DataDir: ts.dir, Transport: EgressTCP, ServerURL: ts.URL(), Output: filepath.Join(t.TempDir(), "egress.yaml")})
	if err != nil {
		t.Fatal(err)
	}
	egress, err := tls.LoadX509KeyPair(files[1], files[2])
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		who  string
		cert *tls.Certificate
		want string
	}{
		{"nobody", nil, "HTTP/1.1 401"},
		{"admin", &admin, "HTTP/1.1 403"},
		{"node", &nodeA, "HTTP/1.1 403"},
		{"egress", &egress, "HTTP/1.1 502 node a is not reachable through Trellis"},
	} {
		if got := tlsConnect(tc.cert, "a:10250"); !strings.HasPrefix(got, tc.want) {
			t.Errorf("CONNECT as %s: %q, want %q…", tc.who, got, tc.want)
		}
	}
	// The egress credential can do nothing else.
	resp, err := ts.client(t, &egress).Get(ts.URL() + api.PathNodes)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("GET %s with the egress credential: %d, want 403", api.PathNodes, resp.StatusCode)
	}
	cfg, err := os.ReadFile(files[3])
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"kind: EgressSelectorConfiguration", "name: cluster", "proxyProtocol: HTTPConnect", "url: " + ts.URL(), "clientCert: " + files[1]} {
		if !strings.Contains(string(cfg), want) {
			t.Errorf("egress config lacks %q:\n%s", want, cfg)
		}
	}
}
