package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
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
	for _, p := range c.TunnelAllowPorts {
		if p < 1 || p > 65535 {
			return fmt.Errorf("--tunnel-allow-port %d is out of range 1-65535", p)
		}
	}
	return nil
}

// startSupervisor starts the agent's status endpoint and its tunnel to
// the server. The returned function stops both and waits for them.
func (a *Agent) startSupervisor(ctx context.Context) (stop func(), err error) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	statusPort := 0
	var srv *http.Server
	if a.cfg.StatusPort > 0 {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(a.cfg.StatusPort))
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			cancel()
			return nil, fmt.Errorf("agent status endpoint: listen on %s: %w (is another trellis agent running on this host? choose another --status-port)", addr, err)
		}
		statusPort = a.cfg.StatusPort
		srv = &http.Server{Handler: a.statusHandler(), ReadHeaderTimeout: 10 * time.Second}
		wg.Go(func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				a.log.Error("agent status endpoint stopped", "err", err)
			}
		})
	}
	// One tunnel per server (servers.go); the first is made here so that
	// a bad configuration fails the start.
	newClient := func(serverURL string) (*tunnel.Client, error) {
		return tunnel.NewClient(tunnel.ClientConfig{
			ServerURL:  serverURL,
			NodeName:   a.cfg.NodeName,
			TLSConfig:  a.tunnelTLS,
			StatusPort: statusPort,
			AllowPorts: a.cfg.TunnelAllowPorts,
			Logger:     a.log,
		})
	}
	if _, err := newClient(a.cfg.ServerURL); err != nil {
		cancel()
		if srv != nil {
			_ = srv.Close()
		}
		wg.Wait()
		return nil, err
	}
	wg.Go(func() { a.runTunnels(ctx, newClient) })
	return func() {
		cancel()
		if srv != nil {
			_ = srv.Close()
		}
		wg.Wait()
	}, nil
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
