package server

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/pki"
	"github.com/trellis-mesh/trellis/internal/tunnel"
)

// The egress: kube-apiserver's EgressSelectorConfiguration (egress name
// "cluster", proxyProtocol HTTPConnect) sends every connection to a kubelet
// (logs, exec, attach, port-forward, nodes/proxy), to a pod or service
// (the API server's proxy) and to aggregated API servers as one HTTP
// CONNECT to a Trellis server. The server resolves the target to a node
// and dials it through that node's tunnel: a node behind NAT, with no
// inbound port, is reached as well as any. TLS stays end to end between
// the API server and the kubelet; Trellis carries bytes.
//
// Two doors: a unix socket in the data dir (EgressSocketName, mode 0600:
// whoever may open it is trusted, as root on the server's machine is) and
// the HTTPS port with a client certificate of kind egress (pki.OrgEgress),
// which can do nothing but CONNECT. No other identity may CONNECT: the
// server is not an open proxy, and a node cannot use it to reach another
// node's ports.

// EgressSocketName is the egress unix socket in the server's data dir.
const EgressSocketName = "egress.sock"

// egressDialTimeout bounds setting up a CONNECT through a tunnel.
const egressDialTimeout = 15 * time.Second

// egressTarget is where a CONNECT goes: a node and an address on it.
type egressTarget struct {
	node string
	dst  netip.AddrPort
	pod  bool // dst is a pod's address
}

// egressRefusal is a CONNECT that is not served, with its HTTP status and
// a sentence for the caller (it reaches kubectl's error text).
type egressRefusal struct {
	status int
	reason string
}

func (e *egressRefusal) Error() string { return e.reason }

// resolveEgress maps a CONNECT target (host:port) to a node of nodes and an
// address on it: a node name or one of a node's internal or external IPs
// at its kubelet port (kubeletPort says which; the kubelet listens on the
// node IP, so the connection goes to the node's internal IP of the
// target's family), or an address inside a node's pod CIDR at any port.
// Everything else is refused. It is pure.
func resolveEgress(nodes []api.Node, target string, kubeletPort func(node string) int) (egressTarget, error) {
	host, portStr, err := net.SplitHostPort(target)
	if err != nil {
		return egressTarget{}, &egressRefusal{http.StatusBadRequest, fmt.Sprintf("CONNECT target %q is not host:port", target)}
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 1 || port > 65535 {
		return egressTarget{}, &egressRefusal{http.StatusBadRequest, fmt.Sprintf("CONNECT target %q has no valid port", target)}
	}
	toNode := func(n *api.Node, want netip.Addr) (egressTarget, error) {
		if kp := kubeletPort(n.Name); port != kp {
			return egressTarget{}, &egressRefusal{http.StatusForbidden, fmt.Sprintf("port %d of node %s is not its kubelet's (%d); Trellis reaches only the kubelet on a node's addresses, and any port of its pods", port, n.Name, kp)}
		}
		addr := want
		if !slices.Contains(n.InternalIPs, addr) {
			// A name, or an external IP (maybe a NAT's): the kubelet
			// listens on the node IP, of the target's family if it has
			// one.
			addr = netip.Addr{}
			for _, a := range n.InternalIPs {
				if !addr.IsValid() || want.IsValid() && a.Is4() == want.Is4() && addr.Is4() != want.Is4() {
					addr = a
				}
			}
		}
		if !addr.IsValid() {
			return egressTarget{}, &egressRefusal{http.StatusBadGateway, fmt.Sprintf("node %s has no internal IP to reach its kubelet at; its agent reports none (set --node-ip)", n.Name)}
		}
		return egressTarget{node: n.Name, dst: netip.AddrPortFrom(addr, uint16(port))}, nil
	}
	ip, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(host, "["), "]"))
	if err != nil {
		for i := range nodes {
			if nodes[i].Name == host {
				return toNode(&nodes[i], netip.Addr{})
			}
		}
		return egressTarget{}, &egressRefusal{http.StatusForbidden, fmt.Sprintf("%q is not a node of this Trellis cluster; the egress reaches only kubelets and pods", host)}
	}
	ip = ip.Unmap()
	for i := range nodes {
		n := &nodes[i]
		if slices.Contains(n.InternalIPs, ip) || slices.Contains(n.ExternalIPs, ip) {
			return toNode(n, ip)
		}
	}
	for i := range nodes {
		n := &nodes[i]
		for _, p := range n.PodCIDRs {
			if p.Contains(ip) {
				if ip == p.Masked().Addr() {
					break // the node's tunnel address, not a pod's
				}
				return egressTarget{node: n.Name, dst: netip.AddrPortFrom(ip, uint16(port)), pod: true}, nil
			}
		}
	}
	return egressTarget{}, &egressRefusal{http.StatusForbidden, fmt.Sprintf("%s is neither an address of a node of this Trellis cluster nor of a pod; the egress reaches only kubelets and pods", ip)}
}

// egressHandler serves HTTP CONNECT; trusted says the caller came through
// the unix socket (no certificate to check).
func (s *Server) egressHandler(trusted bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodConnect {
			writeError(w, http.StatusMethodNotAllowed, api.ErrCodeBadRequest, "the egress takes HTTP CONNECT host:port only")
			return
		}
		if !trusted {
			id, ok := identity(r)
			switch {
			case !ok:
				writeError(w, http.StatusUnauthorized, api.ErrCodeUnauthorized, "CONNECT needs an egress credential; write one with 'trellis egress-config --transport tcp'")
				return
			case id.Kind != pki.KindEgress:
				writeError(w, http.StatusForbidden, api.ErrCodeForbidden, fmt.Sprintf("a %s credential may not CONNECT; only an egress credential ('trellis egress-config') may", id.Kind))
				return
			}
		}
		s.serveConnect(w, r)
	}
}

// serveConnect resolves and dials the target, then answers the CONNECT and
// splices the connection, or answers why not. The answer is written on
// the hijacked connection so that its reason phrase carries the why (the
// API server puts it in the error the user sees).
func (s *Server) serveConnect(w http.ResponseWriter, r *http.Request) {
	target := r.URL.Host
	if target == "" {
		target = r.RequestURI
	}
	if s.tunnels == nil {
		writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, "the Trellis server is starting; try again")
		return
	}
	// Held for the whole connection: Close ends it with the tunnels.
	release, ok := s.tunnels.Hold()
	if !ok {
		writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, "the Trellis server is shutting down")
		return
	}
	defer release()
	start := time.Now()
	conn, err := s.dialEgress(r.Context(), target)
	hj, ok := w.(http.Hijacker)
	if !ok {
		if conn != nil {
			_ = conn.Close()
		}
		writeError(w, http.StatusInternalServerError, api.ErrCodeInternal, "this connection cannot carry a CONNECT (HTTP/2?); use HTTP/1.1")
		return
	}
	client, buf, herr := hj.Hijack()
	if herr != nil {
		if conn != nil {
			_ = conn.Close()
		}
		return
	}
	_ = client.SetDeadline(time.Time{})
	if err != nil {
		status := http.StatusBadGateway
		var ref *egressRefusal
		if errors.As(err, &ref) {
			status = ref.status
		}
		s.metrics.egress(status)
		s.log.Info("egress refused", "target", target, "status", status, "reason", err, "remote", r.RemoteAddr)
		writeRawStatus(client, status, err.Error())
		_ = client.Close()
		return
	}
	s.metrics.egress(http.StatusOK)
	if _, err := client.Write([]byte("HTTP/1.1 200 Connection established\r\n\r\n")); err != nil {
		_ = client.Close()
		_ = conn.Close()
		return
	}
	s.log.Debug("egress connection opened", "target", target, "took", time.Since(start).Round(time.Millisecond), "remote", r.RemoteAddr)
	tunnel.Splice(bufferedConn{client, buf.Reader}, conn)
	s.log.Debug("egress connection closed", "target", target)
}

// dialEgress resolves target and dials it through its node's tunnel.
func (s *Server) dialEgress(ctx context.Context, target string) (net.Conn, error) {
	t, err := resolveEgress(s.hub.snapshot().nodes, target, s.kubeletPort)
	if err != nil {
		return nil, err
	}
	dctx, cancel := context.WithTimeout(ctx, egressDialTimeout)
	defer cancel()
	conn, err := s.tunnels.DialAddr(dctx, t.node, t.dst)
	if err == nil {
		return conn, nil
	}
	what := "kubelet"
	if t.pod {
		what = "pod"
	}
	var de *tunnel.DialError
	switch {
	case errors.Is(err, tunnel.ErrNoSession):
		st := s.tunnels.State(t.node)
		why := "its agent has never connected its tunnel to this Trellis server"
		if !st.Since.IsZero() {
			why = fmt.Sprintf("its tunnel to this Trellis server is down since %s", st.Since.UTC().Format(time.RFC3339))
		}
		return nil, fmt.Errorf("node %s is not reachable through Trellis (%s %s): %s; check that its trellis agent runs ('trellis nodes' shows the TUNNEL column)", t.node, what, t.dst, why)
	case errors.As(err, &de):
		return nil, fmt.Errorf("node %s (%s %s): %s", t.node, what, t.dst, de.Message)
	}
	return nil, fmt.Errorf("node %s (%s %s) through its Trellis tunnel: %v", t.node, what, t.dst, err)
}

// kubeletPort is the kubelet's port of node: Config.KubeletPort's answer,
// else what its Kubernetes Node reports (daemonEndpoints) in Kubernetes
// mode, else api.DefaultKubeletPort.
func (s *Server) kubeletPort(node string) int {
	if s.cfg.KubeletPort != nil {
		if p := s.cfg.KubeletPort(node); p > 0 {
			return p
		}
	}
	if k := s.kube.Load(); k != nil {
		if p := k.KubeletPort(node); p > 0 {
			return p
		}
	}
	return api.DefaultKubeletPort
}

// writeRawStatus answers a hijacked request with status and reason as
// both the reason phrase (one line, printable) and the body.
func writeRawStatus(c net.Conn, status int, reason string) {
	phrase := strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, reason)
	if len(phrase) > 512 {
		phrase = phrase[:512]
	}
	body := reason + "\n"
	_ = c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, _ = fmt.Fprintf(c, "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s",
		status, phrase, len(body), body)
}

// bufferedConn is a hijacked connection whose reader may hold bytes the
// HTTP server read ahead.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// CloseWrite half-closes the connection when it can (a TCP or unix
// connection; a TLS one sends close_notify).
func (c bufferedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// listenEgress opens the egress unix socket (mode 0600) in the data dir,
// replacing a stale one, and serves it until the server closes.
func (s *Server) listenEgress() error {
	path := s.cfg.dir(EgressSocketName)
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("egress socket %s: another trellis server serves it; stop it first", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("egress socket %s: remove the stale one: %w", path, err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("egress socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("egress socket %s: %w", path, err)
	}
	srv := &http.Server{
		Handler:           s.egressHandler(true),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          s.http.ErrorLog,
	}
	s.egress = srv
	s.wg.Go(func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("egress socket stopped", "err", err)
		}
	})
	return nil
}
