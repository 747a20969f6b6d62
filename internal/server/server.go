// Package server is the Trellis supervisor: the HTTPS API that nodes join
// through, the node registry in the store, and the netmap streams.
package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/client"
	"github.com/trellis-mesh/trellis/internal/kube"
	"github.com/trellis-mesh/trellis/internal/netmap"
	"github.com/trellis-mesh/trellis/internal/pki"
	"github.com/trellis-mesh/trellis/internal/store"
	"github.com/trellis-mesh/trellis/internal/token"
	"github.com/trellis-mesh/trellis/internal/tunnel"
)

// Server is a running supervisor. Create it with Start; stop it with
// Close.
type Server struct {
	cfg        Config
	log        *slog.Logger
	ca         *pki.CA
	tokenMu    sync.RWMutex
	token      token.Token // guarded by tokenMu
	agentToken token.Token // guarded by tokenMu; zero if none
	store      *store.Store
	reg        *registry
	hub        *hub
	fullMaps   chan struct{} // bounds the whole netmaps built at once
	ln         net.Listener
	http       *http.Server
	url        string
	joins      *rateLimiter
	cancel     context.CancelFunc
	wg         sync.WaitGroup

	// tunnels holds the agents' supervisor tunnels (tunnel.go).
	tunnels *tunnel.Server
	// egress serves HTTP CONNECT on the egress unix socket (egress.go).
	egress *http.Server
	// metrics are the Prometheus metrics (metrics.go).
	metrics *serverMetrics
	// kube follows the Nodes of a Kubernetes cluster (Config.Kube); nil
	// outside Kubernetes mode and until it runs (it starts after the API
	// is served: handlers read it with Load).
	kube atomic.Pointer[kube.Controller]

	closeOnce sync.Once
	closeErr  error
}

// Start brings up the store, the CA, the token and the HTTPS API. It
// returns once the API is listening.
func Start(ctx context.Context, cfg Config) (_ *Server, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: cfg.Logger, joins: newRateLimiter(20, time.Minute)}
	s.metrics = newServerMetrics(s)
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	if err := os.MkdirAll(cfg.dir(), 0o700); err != nil {
		return nil, fmt.Errorf("create server data dir: %w", err)
	}
	join, err := s.prepareHA(ctx)
	if err != nil {
		return nil, err
	}
	if s.ca, err = pki.LoadOrCreateCA(cfg.dir("tls")); err != nil {
		return nil, fmt.Errorf("cluster CA: %w", err)
	}
	if s.token, err = s.loadOrCreateToken(); err != nil {
		return nil, err
	}
	if cfg.AgentToken != "" {
		t, err := token.Parse(cfg.AgentToken)
		if err != nil {
			return nil, fmt.Errorf("--agent-token: %w", err)
		}
		s.agentToken = token.New(s.ca.CertPEM(), token.KindNode, t.Secret)
		if err := pki.WriteFileAtomic(cfg.dir("agent-token"), []byte(s.agentToken.String()+"\n"), 0o600); err != nil {
			return nil, fmt.Errorf("write agent token file: %w", err)
		}
	}
	serving, err := s.ca.LoadOrCreateServing(cfg.dir("tls"), s.sans())
	if err != nil {
		return nil, fmt.Errorf("serving certificate: %w", err)
	}

	runCtx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	emb, err := s.embeddedConfig(join)
	if err != nil {
		return nil, err
	}
	if s.store, err = store.Open(ctx, store.Config{DataDir: cfg.dir(), Endpoint: cfg.DatastoreEndpoint, Embedded: emb, Logger: s.log}); err != nil {
		return nil, fmt.Errorf("open datastore: %w", err)
	}
	s.reg = &registry{kv: s.metrics.timed(s.store), clusterCIDRs: cfg.ClusterCIDRs, now: time.Now, podCIDRsFromNodes: cfg.Kube != nil}
	if err := s.reg.ensureCluster(ctx); err != nil {
		return nil, err
	}
	if n, err := s.reg.reclaimOrphans(ctx, 5*time.Minute); err != nil {
		s.log.Warn("reclaiming orphaned pod CIDR claims failed", "err", err)
	} else if n > 0 {
		s.log.Info("released orphaned pod CIDR claims", "count", n)
	}
	s.fullMaps = make(chan struct{}, max(8, 2*runtime.GOMAXPROCS(0)))
	s.hub = newHub(netmap.Policy{ClusterCIDRs: cfg.ClusterCIDRs, ForceExternal: cfg.ForceExternal, Keepalive: netmap.DefaultKeepalive})
	recs, rev, err := s.reg.list(ctx)
	if err != nil {
		return nil, err
	}
	s.hub.reset(recs, rev)

	addr := ""
	if cfg.BindAddress.IsValid() {
		addr = cfg.BindAddress.String()
	}
	ln := cfg.Listener
	if ln == nil {
		if ln, err = net.Listen("tcp", net.JoinHostPort(addr, strconv.Itoa(cfg.Port))); err != nil {
			return nil, fmt.Errorf("listen on %s port %d: %w (is another trellis server running? choose another --https-listen-port)", addrOrAll(addr), cfg.Port, err)
		}
	}
	s.ln = ln
	host := "127.0.0.1"
	if cfg.BindAddress.IsValid() && !cfg.BindAddress.IsUnspecified() {
		host = cfg.BindAddress.String()
	}
	port := cfg.Port
	if ta, ok := ln.Addr().(*net.TCPAddr); ok {
		port = ta.Port
	}
	s.url = "https://" + net.JoinHostPort(host, strconv.Itoa(port))
	if err := s.writeAdminConfig(); err != nil {
		return nil, err
	}

	s.tunnels = s.newTunnels()
	s.http = &http.Server{
		Handler:           s.metrics.instrument(s.Handler()),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		BaseContext:       func(net.Listener) context.Context { return runCtx },
		TLSConfig: &tls.Config{
			MinVersion:   tls.VersionTLS12,
			Certificates: []tls.Certificate{serving},
			ClientAuth:   tls.VerifyClientCertIfGiven,
			ClientCAs:    s.ca.Pool(),
		},
	}
	if err := s.listenEgress(); err != nil {
		return nil, err
	}
	s.wg.Add(2)
	go func() {
		defer s.wg.Done()
		if err := s.http.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("https server stopped", "err", err)
		}
	}()
	go func() {
		defer s.wg.Done()
		s.watch(runCtx, rev)
	}()
	if err := s.startHA(runCtx); err != nil {
		return nil, err
	}
	if cfg.Kube != nil {
		k, err := kube.Start(ctx, *cfg.Kube, kubeMesh{s})
		if err != nil {
			return nil, err
		}
		s.kube.Store(k)
	}
	s.log.Info("server listening", "url", "https://"+ln.Addr().String(), "node", cfg.NodeName,
		"clusterCIDR", joinPrefixes(cfg.ClusterCIDRs), "token", cfg.dir("token"), "adminConfig", cfg.dir("admin.yaml"))
	return s, nil
}

func addrOrAll(a string) string {
	if a == "" {
		return "all addresses"
	}
	return a
}

// URL returns the URL the server's own node and admin tools use.
func (s *Server) URL() string { return s.url }

// Token returns the server join token (K10 form).
func (s *Server) Token() string {
	s.tokenMu.RLock()
	defer s.tokenMu.RUnlock()
	return s.token.String()
}

// Close stops the API and the store. It is idempotent.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		if k := s.kube.Load(); k != nil {
			k.Close() // it writes to the store: first
		}
		if s.cancel != nil {
			s.cancel() // ends netmap streams cleanly: their contexts derive from it
		}
		if s.http != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_ = s.http.Shutdown(ctx)
			cancel()
			_ = s.http.Close()
		} else if s.ln != nil {
			_ = s.ln.Close()
		}
		if s.egress != nil {
			_ = s.egress.Close()
		}
		s.closeTunnels() // hijacked: not ended by http.Server.Close
		s.wg.Wait()
		if s.store != nil {
			s.closeErr = s.store.Close()
		}
	})
	return s.closeErr
}

// watch keeps the hub in step with the store.
func (s *Server) watch(ctx context.Context, rev int64) {
	for ev := range s.store.Watch(ctx, prefixNodes, rev) {
		s.apply(ev)
	}
}

// sans lists the serving certificate's names: node IPs, external IPs,
// --tls-san values and the host name.
func (s *Server) sans() pki.SANs {
	var sans pki.SANs
	sans.IPs = append(sans.IPs, s.cfg.NodeIPs...)
	sans.IPs = append(sans.IPs, s.cfg.ExternalIPs...)
	if s.cfg.BindAddress.IsValid() && !s.cfg.BindAddress.IsUnspecified() {
		sans.IPs = append(sans.IPs, s.cfg.BindAddress)
	}
	for _, san := range s.cfg.TLSSANs {
		if a, err := netip.ParseAddr(san); err == nil {
			sans.IPs = append(sans.IPs, a)
		} else {
			sans.DNSNames = append(sans.DNSNames, san)
		}
	}
	if h, err := os.Hostname(); err == nil && h != "" {
		sans.DNSNames = append(sans.DNSNames, h)
	}
	sans.DNSNames = append(sans.DNSNames, s.cfg.NodeName)
	return sans
}

// loadOrCreateToken settles the server token: --token if given (a full
// token must carry this cluster's CA hash), else the one stored in the
// data dir, else a new secret. The full token is written to
// DataDir/server/token (0600).
func (s *Server) loadOrCreateToken() (token.Token, error) {
	path := s.cfg.dir("token")
	var secret string
	switch {
	case s.cfg.Token != "":
		t, err := token.Parse(s.cfg.Token)
		if err != nil {
			return token.Token{}, fmt.Errorf("--token: %w", err)
		}
		if t.HasCAHash && !t.CAMatches(s.ca.CertPEM()) {
			return token.Token{}, fmt.Errorf("--token carries the CA hash of another cluster; pass only the secret part, or the token from %s", path)
		}
		secret = t.Secret
	default:
		if b, err := os.ReadFile(path); err == nil {
			t, err := token.Parse(string(b))
			if err != nil {
				return token.Token{}, fmt.Errorf("token file %s: %w", path, err)
			}
			secret = t.Secret
		} else if !errors.Is(err, os.ErrNotExist) {
			return token.Token{}, fmt.Errorf("read token file: %w", err)
		} else if secret, err = token.GenerateSecret(); err != nil {
			return token.Token{}, err
		}
	}
	t := token.New(s.ca.CertPEM(), token.KindServer, secret)
	if err := pki.WriteFileAtomic(path, []byte(t.String()+"\n"), 0o600); err != nil {
		return token.Token{}, fmt.Errorf("write token file: %w", err)
	}
	return t, nil
}

// writeAdminConfig writes DataDir/server/admin.yaml with an admin client
// certificate, keeping an existing credential.
func (s *Server) writeAdminConfig() error {
	path := s.cfg.dir("admin.yaml")
	var ac client.AdminConfig
	if b, err := os.ReadFile(path); err == nil && yaml.Unmarshal(b, &ac) == nil && ac.ClientCertificateData != "" && s.adminCertValid(ac) {
		if ac.Server == s.url && pki.CheckPrivate(path) == nil {
			return nil
		}
	} else {
		certPEM, keyPEM, err := s.ca.IssueClient("admin", pki.OrgAdmins, 10*365*24*time.Hour)
		if err != nil {
			return fmt.Errorf("issue admin credential: %w", err)
		}
		ac.ClientCertificateData = base64.StdEncoding.EncodeToString(certPEM)
		ac.ClientKeyData = base64.StdEncoding.EncodeToString(keyPEM)
	}
	ac.Server = s.url
	ac.CertificateAuthorityData = base64.StdEncoding.EncodeToString(s.ca.CertPEM())
	b, err := yaml.Marshal(ac)
	if err != nil {
		return err
	}
	if err := pki.WriteFileAtomic(path, b, 0o600); err != nil {
		return fmt.Errorf("write admin config: %w", err)
	}
	return nil
}

func (s *Server) adminCertValid(ac client.AdminConfig) bool {
	b, err := base64.StdEncoding.DecodeString(ac.ClientCertificateData)
	if err != nil {
		return false
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return false
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return false
	}
	_, err = c.Verify(x509.VerifyOptions{Roots: s.ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	return err == nil
}
