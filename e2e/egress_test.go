//go:build e2e

package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// egressConnect opens a CONNECT to target on the server's egress unix
// socket (a file: reachable from the test whatever the namespace) and
// returns the status line and, on 200, the connection.
func egressConnect(t *testing.T, sock, target string) (string, net.Conn) {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", target); err != nil {
		t.Fatal(err)
	}
	// Byte by byte up to the end of the header: nothing after it may be
	// read here (it belongs to the connection).
	var hdr strings.Builder
	b := make([]byte, 1)
	for !strings.HasSuffix(hdr.String(), "\r\n\r\n") {
		if _, err := c.Read(b); err != nil {
			c.Close()
			t.Fatalf("CONNECT %s: %v (read %q)", target, err, hdr.String())
		}
		hdr.WriteByte(b[0])
	}
	status, _, _ := strings.Cut(hdr.String(), "\r\n")
	if !strings.HasPrefix(status, "HTTP/1.1 200") {
		c.Close()
		return status, nil
	}
	return status, c
}

// echoRoundTrip sends a line through c and checks it comes back.
func echoRoundTrip(c net.Conn) error {
	want := fmt.Sprintf("through the egress %d\n", time.Now().UnixNano())
	if _, err := io.WriteString(c, want); err != nil {
		return err
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if got != want {
		return fmt.Errorf("sent %q, got %q", want, got)
	}
	return nil
}

// TestEgressReachesNATNode is the path kube-apiserver's egress selector
// takes to a kubelet in a home behind NAT (no inbound port): a CONNECT on
// the server's egress socket goes through the node's tunnel to the
// node's address at the kubelet's port (a stand-in TCP server here; the
// real kubelet is TestKubeletThroughEgress's), and to a pod at any port.
// Everything else is refused with a reason, and a node whose agent is
// down gets a 502 naming it.
func TestEgressReachesNATNode(t *testing.T) {
	lab := NewLab(t)
	c := newCluster(t, lab)
	cloud1 := lab.Cloud("cloud1", "198.51.100.10/24", "10.1.0.10/24")
	home1 := lab.Home("home1", "198.18.0.50/24", "192.168.1.10/24")
	server := c.startServer(cloud1)
	agent := c.startAgent(home1)
	c.waitNodes(server, agent)
	c.attachPod(agent)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	kubelet := netip.AddrPortFrom(home1.LANIP, 10250)
	lab.Start(home1.NS, "env", helperEnv+"=echo-server", self, kubelet.String())
	sock := filepath.Join(server.dataDir, "server", "egress.sock")

	for _, target := range []string{"home1:10250", kubelet.String(), netip.AddrPortFrom(agent.pod.IP, EchoPort).String()} {
		var status string
		took := WaitFor(t, joinTimeout, "CONNECT "+target, func() error {
			s, conn := egressConnect(t, sock, target)
			status = s
			if conn == nil {
				return fmt.Errorf("%s", s)
			}
			defer conn.Close()
			return echoRoundTrip(conn)
		})
		t.Logf("CONNECT %s: %s, bytes through in %v", target, status, took)
	}
	for target, want := range map[string]string{
		"home1:22":                     "HTTP/1.1 403 port 22 of node home1 is not its kubelet's",
		"8.8.8.8:53":                   "HTTP/1.1 403 8.8.8.8 is neither an address of a node",
		"cloud1-lan:10250":             "HTTP/1.1 403 \"cloud1-lan\" is not a node",
		home1.LANIP.String() + ":7777": "HTTP/1.1 403 port 7777 of node home1",
	} {
		if got, _ := egressConnect(t, sock, target); !strings.HasPrefix(got, want) {
			t.Errorf("CONNECT %s: %q, want %q…", target, got, want)
		}
	}
	if err := agent.proc.Stop(); err != nil {
		t.Fatal(err)
	}
	WaitFor(t, 30*time.Second, "a 502 naming home1 once its agent is down", func() error {
		got, conn := egressConnect(t, sock, "home1:10250")
		if conn != nil {
			conn.Close()
			return fmt.Errorf("CONNECT succeeded")
		}
		if !strings.HasPrefix(got, "HTTP/1.1 502 node home1 is not reachable through Trellis") || !strings.Contains(got, "tunnel") {
			return fmt.Errorf("%q", got)
		}
		t.Logf("home1 down: %s", got)
		return nil
	})
}
