//go:build e2e

package e2e

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/vishvananda/netns"

	"github.com/trellis-mesh/trellis/internal/api"
)

// Ports of TestSupervisorTunnel.
const (
	tunnelAppPort    = 8080  // the HTTP service on the home node's loopback
	tunnelHiddenPort = 9090  // a port the home node does not allow
	tunnelProxyPort  = 18080 // trellis proxy's listener on the server's machine
	// tunnelDetect is the keepalive promise (15 s) plus the time to see it
	// in `trellis nodes`.
	tunnelDetect = 20 * time.Second
	// tunnelRecover bounds the time from the end of an outage to a working
	// tunnel: the agent's backoff is at most 10 s (±20 %) plus a dial.
	tunnelRecover = 30 * time.Second
	// linkCut is how long the home's underlay is cut.
	linkCut = 60 * time.Second
)

// inNetns runs fn on a thread in network namespace ns. Sockets fn creates
// stay in ns. fn must not start goroutines that need ns.
func inNetns(ns string, fn func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("current netns: %w", err)
	}
	defer orig.Close()
	target, err := netns.GetFromName(ns)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netns %s: %w", ns, err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns %s: %w", ns, err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// The thread stays locked and dies with this goroutine.
		return errors.Join(ferr, fmt.Errorf("leave netns %s: %w", ns, err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// serveHTTPIn serves an HTTP service on addr inside namespace ns until the
// test ends. It answers "hello from NS PATH".
func serveHTTPIn(t *testing.T, ns, addr, hello string) {
	t.Helper()
	var ln net.Listener
	if err := inNetns(ns, func() (err error) { ln, err = net.Listen("tcp", addr); return err }); err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s %s", hello, r.URL.Path)
	})}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close(); <-done })
}

// httpClientIn returns an HTTP client whose connections start in ns.
func httpClientIn(ns string) *http.Client {
	return &http.Client{
		Timeout: 20 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (c net.Conn, err error) {
				err = inNetns(ns, func() (err error) {
					c, err = (&net.Dialer{Timeout: 10 * time.Second}).DialContext(ctx, network, addr)
					return err
				})
				return c, err
			},
		},
	}
}

// fetch GETs url with c and checks the body.
func fetch(c *http.Client, url, want string) error {
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != 200 || string(b) != want {
		return fmt.Errorf("GET %s: %s %q, want %q", url, resp.Status, b, want)
	}
	return nil
}

// tunnelState returns node's tunnel as `trellis nodes -o json` lists it.
func (c *cluster) tunnelState(node string) (api.TunnelStatus, error) {
	nodes, err := c.nodes()
	if err != nil {
		return api.TunnelStatus{}, err
	}
	n, ok := nodes[node]
	if !ok {
		return api.TunnelStatus{}, fmt.Errorf("trellis nodes does not list %s", node)
	}
	if n.Tunnel == nil {
		return api.TunnelStatus{}, fmt.Errorf("trellis nodes -o json has no tunnel field for %s", node)
	}
	return *n.Tunnel, nil
}

func (c *cluster) waitTunnel(node string, up bool, timeout time.Duration) time.Duration {
	c.t.Helper()
	return WaitFor(c.t, timeout, fmt.Sprintf("trellis nodes to show %s's tunnel connected=%v", node, up), func() error {
		st, err := c.tunnelState(node)
		if err != nil {
			return err
		}
		if st.Connected != up {
			return fmt.Errorf("tunnel %+v", st)
		}
		return nil
	})
}

// connectStatus dials the server's tunnel endpoint from namespace ns with
// cert (nil: none) and returns the HTTP status of the handshake, or the
// error if there was none.
func connectStatus(ns, url string, cert *tls.Certificate) (int, error) {
	cfg := &tls.Config{InsecureSkipVerify: true} //nolint:gosec // the test checks the server's answer, not its name
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	d := websocket.Dialer{
		TLSClientConfig:  cfg,
		HandshakeTimeout: 10 * time.Second,
		NetDialContext: func(ctx context.Context, network, addr string) (c net.Conn, err error) {
			err = inNetns(ns, func() (err error) {
				c, err = (&net.Dialer{Timeout: 10 * time.Second}).DialContext(ctx, network, addr)
				return err
			})
			return c, err
		},
	}
	ws, resp, err := d.Dial(url, nil)
	if err == nil {
		ws.Close()
		return http.StatusSwitchingProtocols, nil
	}
	if resp == nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// nftIn feeds an nftables script to nft in namespace ns.
func nftIn(ns, script string) error {
	cmd := exec.Command("ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft in %s: %w: %s", ns, err, out)
	}
	return nil
}

// TestSupervisorTunnel: an agent behind NAT with no open port is reached
// from the server through its tunnel: `trellis proxy` to a service on its
// loopback, `trellis status`, refusals, and recovery from a server restart
// and a 60 s cut of its underlay.
func TestSupervisorTunnel(t *testing.T) {
	lab := NewLab(t)
	c := newCluster(t, lab)
	c1 := lab.Cloud("cloud1", "198.51.100.10/24", "10.1.0.10/24")
	home := lab.Home("home1", "203.0.113.20/24", "192.168.1.10/24")
	server := c.startServer(c1)

	serveHTTPIn(t, home.NS, fmt.Sprintf("127.0.0.1:%d", tunnelAppPort), "home1")
	serveHTTPIn(t, home.NS, fmt.Sprintf("127.0.0.1:%d", tunnelHiddenPort), "hidden")

	m := c.startAgent(home, withFlags("--tunnel-allow-port", fmt.Sprint(tunnelAppPort)))
	c.waitTunnel(home.Name, true, joinTimeout)
	t.Logf("tunnel of %s (behind NAT) up %.2fs after its agent started", home.Name, time.Since(m.proc.StartedAt()).Seconds())
	c.waitNodes(server, m)

	serverHTTP := httpClientIn(server.NS)
	proxyURL := fmt.Sprintf("http://127.0.0.1:%d", tunnelProxyPort)
	want := func(path string) string { return "hello from home1 " + path }

	t.Run("proxy", func(t *testing.T) {
		p := lab.Start(server.NS, c.bin, "proxy", home.Name, fmt.Sprint(tunnelAppPort),
			"--listen", fmt.Sprintf("127.0.0.1:%d", tunnelProxyPort), "--admin-config", c.adminConfig())
		WaitFor(t, defaultTimeout, "trellis proxy to serve "+proxyURL, func() error {
			if err := p.Err(); err != nil {
				return err
			}
			return fetch(serverHTTP, proxyURL+"/first", want("/first"))
		})
		const n = 50
		var wg sync.WaitGroup
		errs := make(chan error, n)
		start := time.Now()
		for i := range n {
			wg.Go(func() {
				path := fmt.Sprintf("/c%d", i)
				if err := fetch(serverHTTP, proxyURL+path, want(path)); err != nil {
					errs <- err
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		t.Logf("%d concurrent HTTP requests through trellis proxy and the NATed tunnel in %v", n, time.Since(start))
	})

	t.Run("port-not-allowed", func(t *testing.T) {
		out, err := c.cli("proxy", home.Name, fmt.Sprint(tunnelHiddenPort), "--listen", "127.0.0.1:19090")
		if err == nil {
			t.Fatalf("trellis proxy to a port that is not allowed started: %q", out)
		}
		if flag := fmt.Sprintf("--tunnel-allow-port=%d", tunnelHiddenPort); !strings.Contains(err.Error(), flag) {
			t.Errorf("trellis proxy to a port that is not allowed: %v; want the error to name %s", err, flag)
		} else {
			t.Logf("refused as documented: %s", strings.TrimSpace(err.Error()[strings.LastIndex(err.Error(), "trellis:"):]))
		}
	})

	t.Run("unauthenticated-connect", func(t *testing.T) {
		url := "wss://" + netip.AddrPortFrom(c1.PublicIP, serverPort).String() + api.PathConnect
		code, err := connectStatus(home.NS, url, nil)
		if err != nil || code != http.StatusUnauthorized {
			t.Errorf("websocket to %s without a credential: %d %v, want 401", url, code, err)
		}
		// A certificate from another CA does not get through the TLS
		// handshake, or is refused.
		other, err := tls.X509KeyPair(otherCert, otherKey)
		if err != nil {
			t.Fatal(err)
		}
		code, err = connectStatus(home.NS, url, &other)
		if code == http.StatusSwitchingProtocols {
			t.Errorf("websocket to %s with a certificate of another CA was accepted", url)
		} else {
			t.Logf("foreign certificate refused: status %d, %v", code, err)
		}
	})

	t.Run("status", func(t *testing.T) {
		out, err := c.cli("status", home.Name, "-o", "json")
		if err != nil {
			t.Fatal(err)
		}
		var st api.NodeStatus
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			t.Fatalf("trellis status -o json: %v: %q", err, out)
		}
		if st.Name != home.Name || !st.Tunnel.Connected || st.DataPlane == "" {
			t.Errorf("status of %s through its tunnel: %+v", home.Name, st)
		}
		table, err := c.cli("status", home.Name)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("trellis status %s:\n%s", home.Name, table)
		nodes, _ := c.cli("nodes")
		t.Logf("trellis nodes:\n%s", nodes)
	})

	t.Run("server-restart", func(t *testing.T) {
		if err := server.proc.Restart(); err != nil {
			t.Errorf("restart server: %v", err)
		}
		restarted := server.proc.StartedAt()
		d := WaitFor(t, tunnelRecover, "a request through trellis proxy (still running) after the server restart", func() error {
			return fetch(serverHTTP, proxyURL+"/after-restart", want("/after-restart"))
		})
		t.Logf("server restart: requests through the tunnel work again %.2fs after the new server process started (%.2fs of polling)", time.Since(restarted).Seconds(), d.Seconds())
		c.waitTunnel(home.Name, true, defaultTimeout)
	})

	t.Run("link-cut", func(t *testing.T) {
		nat := lab.Prefix() + "home1-nat"
		if err := nftIn(nat, "add table inet tunnelcut\nadd chain inet tunnelcut forward { type filter hook forward priority -50; policy drop; }\n"); err != nil {
			t.Fatal(err)
		}
		cut := time.Now()
		restored := false
		restore := func() {
			if !restored {
				restored = true
				if err := nftIn(nat, "delete table inet tunnelcut\n"); err != nil {
					t.Error(err)
				}
			}
		}
		defer restore()
		c.waitTunnel(home.Name, false, tunnelDetect)
		t.Logf("link cut: the server shows %s's tunnel down %.2fs after the cut", home.Name, time.Since(cut).Seconds())
		if err := fetch(serverHTTP, proxyURL+"/during-cut", want("/during-cut")); err == nil {
			t.Error("a request through the tunnel succeeded while the link was cut")
		}
		time.Sleep(time.Until(cut.Add(linkCut)))
		restore()
		back := time.Now()
		WaitFor(t, tunnelRecover, "a request through trellis proxy after the link came back", func() error {
			return fetch(serverHTTP, proxyURL+"/after-cut", want("/after-cut"))
		})
		t.Logf("link cut of %v: requests through the tunnel work again %.2fs after the link came back", linkCut, time.Since(back).Seconds())
		c.waitTunnel(home.Name, true, defaultTimeout)
		if log := m.proc.Log(); strings.Count(log, "tunnel down") > 3 {
			t.Errorf("the agent logged 'tunnel down' %d times; want once per outage", strings.Count(log, "tunnel down"))
		}
	})
}

// otherCert and otherKey are a client certificate and key of a CA that is
// not the cluster's (CN=node:home1, O=trellis:nodes), made once with
// crypto/x509 for this test.
var otherCert, otherKey = func() ([]byte, []byte) {
	c, k, err := selfSignedNodeCert("home1")
	if err != nil {
		panic(err)
	}
	return c, k
}()
