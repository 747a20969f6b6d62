package agent

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/tunnel"
)

// validateTunnel fills in the default status port and checks the ports.
func (c *Config) validateTunnel() error {
	if c.StatusPort == 0 {
		c.StatusPort = api.DefaultStatusPort
	}
	if c.StatusPort > 65535 {
		return fmt.Errorf("--status-port %d is out of range 1-65535", c.StatusPort)
	}
	if c.KubeletPort == 0 {
		c.KubeletPort = api.DefaultKubeletPort
	}
	if c.KubeletPort < 0 || c.KubeletPort > 65535 {
		return fmt.Errorf("--kubelet-port %d is out of range 1-65535", c.KubeletPort)
	}
	for _, p := range c.TunnelAllowPorts {
		if p < 1 || p > 65535 {
			return fmt.Errorf("--tunnel-allow-port %d is out of range 1-65535", p)
		}
	}
	return nil
}

// startStatus starts the agent's status endpoint on 127.0.0.1 (the
// server reaches it through the tunnel). The returned function stops it
// and waits for it. A port in use fails the start at once.
func (a *Agent) startStatus() (stop func(), err error) {
	if a.cfg.StatusPort <= 0 {
		return func() {}, nil
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(a.cfg.StatusPort))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("agent status endpoint: listen on %s: %w (is another trellis agent running on this host? choose another --status-port)", addr, err)
	}
	srv := &http.Server{Handler: a.statusHandler(), ReadHeaderTimeout: 10 * time.Second}
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("agent status endpoint stopped", "err", err)
		}
	})
	return func() {
		_ = srv.Close()
		wg.Wait()
	}, nil
}

// newTunnel returns the tunnel client to one server.
func (a *Agent) newTunnel(serverURL string) (*tunnel.Client, error) {
	statusPort := 0
	if a.cfg.StatusPort > 0 {
		statusPort = a.cfg.StatusPort
	}
	return tunnel.NewClient(tunnel.ClientConfig{
		ServerURL:    serverURL,
		NodeName:     a.cfg.NodeName,
		TLSConfig:    a.tunnelTLS,
		StatusPort:   statusPort,
		AllowPorts:   a.cfg.TunnelAllowPorts,
		KubeletPort:  a.cfg.KubeletPort,
		Destinations: a.tunnelDestinations,
		Logger:       a.log,
	})
}

// tunnelDestinations are the addresses the tunnel may dial besides the
// loopback: the host's own (its kubelet) and its pods' (the pod CIDRs).
func (a *Agent) tunnelDestinations() ([]netip.Addr, []netip.Prefix) {
	s := a.loop.snapshot()
	return s.local, s.self.PodCIDRs
}

// tunnelTLS reads the CA and the node's current certificate from the data
// dir, where every join writes them, so the tunnel follows re-joins.
func (a *Agent) tunnelTLS() (*tls.Config, error) {
	ca, err := os.ReadFile(a.cfg.dir("ca.crt"))
	if err != nil {
		return nil, fmt.Errorf("read cluster CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("%s holds no PEM certificate", a.cfg.dir("ca.crt"))
	}
	cert, err := tls.LoadX509KeyPair(a.cfg.dir("node.crt"), a.cfg.dir("node.key"))
	if err != nil {
		return nil, fmt.Errorf("node certificate: %w", err)
	}
	return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}
