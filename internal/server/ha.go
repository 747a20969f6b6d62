package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/client"
	"github.com/trellis-mesh/trellis/internal/pki"
	"github.com/trellis-mesh/trellis/internal/store"
	"github.com/trellis-mesh/trellis/internal/token"
)

// SeedRule is the rule of the deployment Trellis implements about servers
// that share an embedded etcd cluster.
const SeedRule = `"Embedded etcd is not supported in this type of deployment. If using embedded etcd, all server nodes must be reachable to each other via their private IPs. Agents may be distributed over multiple networks, but all servers should be in the same location."`

// Defaults of HAConfig.
const (
	// DefaultMaxPeerRTT is the round-trip time between servers above
	// which a server refuses to join an embedded etcd cluster: etcd's
	// heartbeat (100 ms) and election timeout (1 s) assume one location.
	DefaultMaxPeerRTT = 10 * time.Millisecond
	// readyTTL is the lease of a node's readiness key: a server that
	// dies stops renewing it, and the node is not ready after readyTTL
	// unless it reconnected to another server.
	readyTTL = 15 // seconds
	// readyRenew is how often the server holding a node's netmap stream
	// writes its readiness key again (with a new lease: kine has no
	// KeepAlive).
	readyRenew = 5 * time.Second
)

// Keys of the highly available servers.
const (
	// prefixServers holds one serverRecord per server: agents learn from
	// it where every server is.
	prefixServers = "/trellis/servers/"
	// prefixReady holds one key per node with an open netmap stream on
	// some server (value: that server's name), under a lease, so every
	// server knows every node's readiness.
	prefixReady = "/trellis/ready/"
)

// HAConfig holds the settings of highly available servers.
type HAConfig struct {
	// ClusterInit starts a new embedded etcd cluster (--cluster-init).
	ClusterInit bool
	// JoinURL is an existing server to join (--server): its embedded
	// etcd cluster, or, with DatastoreEndpoint set, only its CA.
	JoinURL string
	// EtcdPeerPort and EtcdClientPort are the embedded etcd member's
	// ports. Defaults 2380 and 2379.
	EtcdPeerPort, EtcdClientPort int
	// MaxPeerRTT is the round trip to the joined server above which the
	// join is refused (see SeedRule). Default DefaultMaxPeerRTT.
	MaxPeerRTT time.Duration
	// AllowRemotePeers turns the refusal into a warning.
	AllowRemotePeers bool
	// ElectionTimeout and HeartbeatInterval tune etcd (tests); 0 means
	// etcd's defaults.
	ElectionTimeout, HeartbeatInterval time.Duration
}

func (h *HAConfig) withDefaults() HAConfig {
	c := *h
	if c.EtcdPeerPort == 0 {
		c.EtcdPeerPort = store.DefaultEtcdPeerPort
	}
	if c.EtcdClientPort == 0 {
		c.EtcdClientPort = store.DefaultEtcdClientPort
	}
	if c.MaxPeerRTT == 0 {
		c.MaxPeerRTT = DefaultMaxPeerRTT
	}
	return c
}

// serverRecord is a server as stored under prefixServers.
type serverRecord struct {
	Name      string    `json:"name"`
	URL       string    `json:"url"`
	PeerURL   string    `json:"peerURL,omitempty"`
	UpdatedAt time.Time `json:"updatedAt"`
}

// etcdDir is where the embedded etcd member keeps its data.
func (c *Config) etcdDir() string { return c.dir("db", "etcd") }

// memberExists reports whether the embedded etcd member has data: it then
// restarts from it and never joins again.
func (c *Config) memberExists() bool {
	_, err := os.Stat(filepath.Join(c.etcdDir(), "member"))
	return err == nil
}

// wantsEmbedded reports whether this server runs an embedded etcd member.
func (c *Config) wantsEmbedded() bool {
	if c.DatastoreEndpoint != "" {
		return false
	}
	return c.HA.ClusterInit || c.HA.JoinURL != "" || c.memberExists()
}

// haJoin is what joining another server gave: the initial cluster the
// member starts with ("" when not joining an embedded cluster).
type haJoin struct {
	initialCluster string
}

// prepareHA settles the peer address and, for a server joining another,
// fetches the cluster CA (installed into the TLS dir before the CA is
// loaded) and adds this server to the embedded etcd cluster after the
// location check. It runs before anything else of Start.
func (s *Server) prepareHA(ctx context.Context) (*haJoin, error) {
	ha := s.cfg.HA.withDefaults()
	if ha.ClusterInit && ha.JoinURL != "" {
		return nil, errors.New("--cluster-init starts a new cluster and --server joins an existing one: give only one")
	}
	if ha.ClusterInit && s.cfg.DatastoreEndpoint != "" {
		return nil, errors.New("--cluster-init starts an embedded etcd cluster; it cannot be combined with --datastore-endpoint")
	}
	if s.cfg.wantsEmbedded() || ha.JoinURL != "" {
		if err := s.settlePeerIP(ha.JoinURL); err != nil {
			return nil, err
		}
	}
	if ha.JoinURL == "" {
		return &haJoin{}, nil
	}
	if s.cfg.memberExists() {
		s.log.Info("restarting the embedded etcd member from its data; not joining again", "dir", s.cfg.etcdDir())
		return &haJoin{}, nil
	}
	_, caErr := os.Stat(s.cfg.dir("tls", pki.CACertFile))
	if s.cfg.DatastoreEndpoint != "" && caErr == nil {
		return &haJoin{}, nil // joined before: the CA is here
	}
	tok, err := token.Parse(s.cfg.Token)
	if err != nil {
		return nil, fmt.Errorf("joining the server at %s needs its server token (--token): %w", ha.JoinURL, err)
	}
	if tok.Kind != token.KindServer || !tok.HasCAHash {
		return nil, fmt.Errorf("joining the server at %s needs the full server token (K10<ca-hash>::server:<secret>) from its <data-dir>/server/token: the CA hash proves the server is genuine before the token is sent", ha.JoinURL)
	}
	c, err := joinClient(ctx, ha.JoinURL, tok, s.log)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	var req api.EtcdJoinRequest
	req.Name = s.cfg.NodeName
	if s.cfg.wantsEmbedded() {
		members, err := c.EtcdMembers(ctx, tok.String())
		if err != nil {
			return nil, joinRefused(c, err)
		}
		if !members.Embedded {
			return nil, fmt.Errorf("the server at %s does not run an embedded etcd cluster: start this server with the same --datastore-endpoint as it", ha.JoinURL)
		}
		if err := s.checkLocation(ctx, c, members.Members, ha); err != nil {
			return nil, err
		}
		req.PeerURL = s.peerURL()
	}
	var resp api.EtcdJoinResponse
	for n := 0; ; n++ {
		resp, err = c.JoinEtcd(ctx, tok.String(), req)
		if err == nil {
			break
		}
		if !client.IsTemporary(err) || n >= 60 {
			return nil, joinRefused(c, err)
		}
		// Another server is joining (etcd adds one member at a time,
		// and only while every member is healthy): try again.
		if n%5 == 0 {
			s.log.Info("the etcd cluster cannot take a member yet; retrying", "err", joinRefused(c, err))
		}
		select {
		case <-ctx.Done():
			return nil, joinRefused(c, err)
		case <-time.After(2 * time.Second):
		}
	}
	if !tok.CAMatches(resp.CACert) {
		return nil, fmt.Errorf("the server at %s handed out a CA that does not match the token's CA hash: refusing it", ha.JoinURL)
	}
	if err := pki.InstallCA(s.cfg.dir("tls"), resp.CACert, resp.CAKey); err != nil {
		return nil, err
	}
	s.log.Info("joined the cluster of another server", "server", ha.JoinURL, "embeddedEtcd", req.PeerURL != "")
	return &haJoin{initialCluster: resp.InitialCluster}, nil
}

// settlePeerIP makes sure s.cfg.NodeIPs names the address other servers
// reach this one at: --node-ip, or the source address towards the joined
// server (or the default route).
func (s *Server) settlePeerIP(joinURL string) error {
	if len(s.cfg.NodeIPs) > 0 {
		return nil
	}
	target := "192.0.2.1:9" // any address off the host: the default route's source
	if joinURL != "" {
		if u, err := url.Parse(joinURL); err == nil && u.Hostname() != "" {
			target = net.JoinHostPort(u.Hostname(), "9")
		}
	}
	c, err := net.Dial("udp", target) // sends nothing
	if err != nil {
		return fmt.Errorf("cannot tell which address other servers reach this one at (%v): set --node-ip", err)
	}
	defer c.Close()
	ap, err := netip.ParseAddrPort(c.LocalAddr().String())
	if err != nil || !ap.Addr().IsValid() || ap.Addr().IsLoopback() {
		return errors.New("cannot tell which address other servers reach this one at: set --node-ip")
	}
	s.cfg.NodeIPs = []netip.Addr{ap.Addr().Unmap()}
	return nil
}

// peerIP is the address of this server's etcd member.
func (s *Server) peerIP() netip.Addr {
	if len(s.cfg.NodeIPs) == 0 {
		return netip.Addr{}
	}
	return s.cfg.NodeIPs[0]
}

func (s *Server) peerURL() string {
	ha := s.cfg.HA.withDefaults()
	return "https://" + netip.AddrPortFrom(s.peerIP(), uint16(ha.EtcdPeerPort)).String()
}

// embeddedConfig returns the embedded etcd member this server runs, or
// nil. It issues the member's certificate from the (now loaded) CA.
func (s *Server) embeddedConfig(join *haJoin) (*store.Embedded, error) {
	if !s.cfg.wantsEmbedded() {
		return nil, nil
	}
	ha := s.cfg.HA.withDefaults()
	sans := pki.SANs{IPs: slices.Clone(s.cfg.NodeIPs)}
	cert, key, err := s.ca.IssueEtcd(s.cfg.dir("tls"), s.cfg.NodeName, sans)
	if err != nil {
		return nil, err
	}
	e := &store.Embedded{
		Name:              s.cfg.NodeName,
		Dir:               s.cfg.etcdDir(),
		PeerAddr:          netip.AddrPortFrom(s.peerIP(), uint16(ha.EtcdPeerPort)),
		ClientAddr:        netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(ha.EtcdClientPort)),
		CertFile:          cert,
		KeyFile:           key,
		CAFile:            s.cfg.dir("tls", pki.CACertFile),
		ElectionTimeout:   ha.ElectionTimeout,
		HeartbeatInterval: ha.HeartbeatInterval,
	}
	if join != nil {
		e.InitialCluster = join.initialCluster
	}
	return e, nil
}

// checkLocation refuses (or, with AllowRemotePeers, warns about) a join
// that would stretch an embedded etcd cluster across locations: a round
// trip to the joined server above MaxPeerRTT. Members outside this
// server's subnet get a warning.
func (s *Server) checkLocation(ctx context.Context, c *client.Client, members []api.EtcdMember, ha HAConfig) error {
	rtt, err := pingRTT(ctx, c, 5)
	if err != nil {
		return fmt.Errorf("measure the round trip to %s: %w", c.Base(), err)
	}
	var outside []string
	if subnet, ok := subnetOf(s.peerIP()); ok {
		for _, m := range members {
			for _, pu := range m.PeerURLs {
				u, err := url.Parse(pu)
				if err != nil {
					continue
				}
				if a, err := netip.ParseAddr(u.Hostname()); err == nil && !subnet.Contains(a.Unmap()) {
					outside = append(outside, m.Name+" ("+a.String()+")")
				}
			}
		}
		if len(outside) > 0 {
			s.log.Warn("servers of this embedded etcd cluster are not in this server's subnet "+subnet.String()+": keep all servers in one location; the rule: "+SeedRule, "members", strings.Join(outside, ", "))
		}
	}
	s.log.Info("location check", "server", c.Base(), "rtt", rtt.Round(10*time.Microsecond), "max", ha.MaxPeerRTT)
	if rtt > ha.MaxPeerRTT {
		msg := fmt.Sprintf("the server at %s is %s away (round trip), over the %s an embedded etcd cluster allows: all servers must be in one location (%s). Use an external datastore (--datastore-endpoint) for servers in different locations, or pass --etcd-allow-remote-peers to join anyway",
			c.Base(), rtt.Round(100*time.Microsecond), ha.MaxPeerRTT, SeedRule)
		if !ha.AllowRemotePeers {
			return errors.New(msg)
		}
		s.log.Warn(msg)
	}
	return nil
}

// subnetOf returns the subnet of the interface that holds a.
func subnetOf(a netip.Addr) (netip.Prefix, bool) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return netip.Prefix{}, false
	}
	for _, ia := range addrs {
		n, ok := ia.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(n.IP)
		if !ok || ip.Unmap() != a {
			continue
		}
		ones, _ := n.Mask.Size()
		return netip.PrefixFrom(ip.Unmap(), ones).Masked(), true
	}
	return netip.Prefix{}, false
}

// joinTimeout bounds each call to the server being joined: adding an
// etcd member can take a while.
const joinTimeout = 60 * time.Second

// joinClient returns a client for the server being joined, with its CA
// checked against the token's hash, waiting for the server to answer.
func joinClient(ctx context.Context, base string, tok token.Token, log *slog.Logger) (*client.Client, error) {
	base = strings.TrimSuffix(base, "/")
	for n := 0; ; n++ {
		ca, err := client.FetchCA(ctx, base, tok)
		if err == nil {
			return client.New(client.Config{URL: base, CA: ca, Timeout: joinTimeout})
		}
		var unreachable *client.UnreachableError
		if !errors.As(err, &unreachable) || ctx.Err() != nil {
			return nil, err
		}
		err = fmt.Errorf("reach the server at %s to join it (is it running, and port 6443 open?): %w", base, unreachable)
		if n%15 == 0 {
			log.Warn("waiting for the server to join", "server", base, "err", err)
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(2 * time.Second):
		}
	}
}

// joinRefused says which server refused the join and why; other errors
// of the client name the call and the server already.
func joinRefused(c *client.Client, err error) error {
	var refused *client.Error
	if errors.As(err, &refused) {
		return fmt.Errorf("the server at %s refused the join (%d): %s", c.Base(), refused.Status, refused.API.Message)
	}
	return err
}

// pingRTT returns the smallest of n round trips of /ping on one connection.
func pingRTT(ctx context.Context, c *client.Client, n int) (time.Duration, error) {
	best := time.Duration(-1)
	for range n + 1 { // the first one also sets the connection up
		start := time.Now()
		if err := c.Ping(ctx); err != nil {
			return 0, err
		}
		if d := time.Since(start); best < 0 || d < best {
			best = d
		}
	}
	return best, nil
}

// haRoutes adds the endpoints servers join each other through.
func (s *Server) haRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET "+api.PathEtcdMembers, s.serverToken(s.handleEtcdMembers))
	mux.HandleFunc("POST "+api.PathEtcdMembers, s.serverToken(s.handleEtcdJoin))
	mux.HandleFunc("POST "+api.PathServerLeave, s.admin(s.handleLeave))
}

// handleLeave removes this server from the cluster: its registration, its
// node, and last its etcd member (after which its datastore stops
// answering). Refused for the last server.
func (s *Server) handleLeave(w http.ResponseWriter, r *http.Request) {
	name := s.cfg.NodeName
	if !s.sharedStore() {
		writeError(w, http.StatusConflict, api.ErrCodeBadRequest, "this server is the cluster's only server (its datastore is SQLite): there is nothing to leave")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	kvs, _, err := s.store.List(ctx, prefixServers)
	if err != nil {
		writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, err.Error())
		return
	}
	others := 0
	for _, kv := range kvs {
		if strings.TrimPrefix(kv.Key, prefixServers) != name {
			others++
		}
	}
	if others == 0 {
		writeError(w, http.StatusConflict, api.ErrCodeBadRequest, "this is the last server of the cluster: it cannot leave (stop it instead)")
		return
	}
	if _, rev, err := s.store.Get(ctx, prefixServers+name); err == nil {
		if err := s.store.Delete(ctx, prefixServers+name, rev); err != nil && !errors.Is(err, store.ErrNotFound) {
			writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, err.Error())
			return
		}
	}
	if _, err := s.reg.remove(ctx, name); err != nil && !errors.Is(err, store.ErrNotFound) {
		writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, err.Error())
		return
	}
	resp := api.ServerLeaveResponse{Server: name}
	if s.store.IsEmbedded() {
		removed, err := s.store.RemoveMember(ctx, name)
		if err != nil {
			writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, "removing this server's etcd member failed: "+err.Error()+"; run 'trellis node delete "+name+"' on another server")
			return
		}
		resp.EtcdMemberRemoved = removed
	}
	s.log.Warn("this server left the cluster; stop it now (its data dir can then be removed)", "server", name, "etcdMemberRemoved", resp.EtcdMemberRemoved)
	writeJSON(w, http.StatusOK, resp)
}

// serverToken lets through only calls bearing the server token: agent
// tokens, created tokens and node credentials are refused.
func (s *Server) serverToken(h http.HandlerFunc) http.HandlerFunc {
	const wrong = "this call needs the server token (K10…::server:…) from <data-dir>/server/token of a server; agent tokens cannot join servers"
	return func(w http.ResponseWriter, r *http.Request) {
		kind, ok := s.bearerToken(w, r, "this call needs the server token: pass --token with the content of <data-dir>/server/token of a server", wrong)
		if !ok {
			return
		}
		if kind != token.KindServer {
			s.log.Warn("server join refused: not the server token", "source", remoteIP(r))
			writeError(w, http.StatusUnauthorized, api.ErrCodeUnauthorized, wrong)
			return
		}
		h(w, r)
	}
}

func (s *Server) handleEtcdMembers(w http.ResponseWriter, r *http.Request) {
	resp := api.EtcdMembersResponse{Embedded: s.store.IsEmbedded(), Members: []api.EtcdMember{}}
	if resp.Embedded {
		ms, err := s.store.Members(r.Context())
		if err != nil {
			writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, err.Error())
			return
		}
		for _, m := range ms {
			resp.Members = append(resp.Members, api.EtcdMember{Name: m.Name, PeerURLs: m.PeerURLs})
		}
	}
	writeJSON(w, http.StatusOK, resp)
}

func (s *Server) handleEtcdJoin(w http.ResponseWriter, r *http.Request) {
	var req api.EtcdJoinRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, api.ErrCodeBadRequest, "malformed request: "+err.Error())
		return
	}
	if err := ValidateNodeName(req.Name); err != nil {
		writeError(w, http.StatusBadRequest, api.ErrCodeBadRequest, err.Error())
		return
	}
	var resp api.EtcdJoinResponse
	if req.PeerURL != "" {
		u, err := url.Parse(req.PeerURL)
		if err != nil || u.Scheme != "https" || u.Port() == "" || u.Path != "" {
			writeError(w, http.StatusBadRequest, api.ErrCodeBadRequest, "peerURL must be https://address:port")
			return
		}
		// Loopback only among servers on one host (tests).
		if a, err := netip.ParseAddr(u.Hostname()); err != nil || !a.IsValid() || a.IsUnspecified() || (a.IsLoopback() && !s.peerIP().IsLoopback()) {
			writeError(w, http.StatusBadRequest, api.ErrCodeBadRequest, "peerURL must name an IP address other servers reach the new server at (set --node-ip on it)")
			return
		}
		if !s.store.IsEmbedded() {
			writeError(w, http.StatusConflict, api.ErrCodeBadRequest, "this server does not run an embedded etcd cluster: start the new server with the same --datastore-endpoint")
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
		defer cancel()
		ic, err := s.store.AddMember(ctx, req.Name, req.PeerURL)
		if err != nil {
			writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, "adding the etcd member failed: "+err.Error()+"; check that a majority of the servers runs (the joining server retries)")
			return
		}
		resp.InitialCluster = ic
		s.log.Info("server added to the embedded etcd cluster", "server", req.Name, "peerURL", req.PeerURL, "source", remoteIP(r))
	}
	key, err := s.ca.KeyPEM()
	if err != nil {
		writeError(w, http.StatusInternalServerError, api.ErrCodeInternal, err.Error())
		return
	}
	resp.CACert, resp.CAKey = s.ca.CertPEM(), key
	writeJSON(w, http.StatusOK, resp)
}

// sharedStore reports whether other servers may use this server's
// datastore (embedded etcd, external etcd, PostgreSQL): only then are
// readiness keys written.
func (s *Server) sharedStore() bool {
	return s.cfg.DatastoreEndpoint != "" || s.store.IsEmbedded()
}

// advertiseURL is the URL agents reach this server at: its first external
// IP, else its node IP.
func (s *Server) advertiseURL() string {
	port := s.cfg.Port
	if ta, ok := s.ln.Addr().(*net.TCPAddr); ok {
		port = ta.Port
	}
	var a netip.Addr
	switch {
	case len(s.cfg.ExternalIPs) > 0:
		a = s.cfg.ExternalIPs[0]
	case len(s.cfg.NodeIPs) > 0:
		a = s.cfg.NodeIPs[0]
	default:
		return s.url
	}
	return "https://" + net.JoinHostPort(a.String(), strconv.Itoa(port))
}

// startHA registers this server and follows the other servers and the
// readiness keys. The goroutines stop with ctx and are waited for by
// Close.
func (s *Server) startHA(ctx context.Context) error {
	rec := serverRecord{Name: s.cfg.NodeName, URL: s.advertiseURL(), UpdatedAt: time.Now().UTC()}
	if s.store.IsEmbedded() {
		rec.PeerURL = s.peerURL()
	}
	if _, err := s.store.Mutate(ctx, prefixServers+rec.Name, func(old []byte, exists bool) ([]byte, error) {
		var o serverRecord
		if exists && json.Unmarshal(old, &o) == nil && o.URL == rec.URL && o.PeerURL == rec.PeerURL {
			return old, nil
		}
		return json.Marshal(rec)
	}); err != nil {
		return fmt.Errorf("register this server in the datastore: %w", err)
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		servers := map[string]string{}
		for ev := range s.store.Watch(ctx, prefixServers, 0) {
			applyEvent(servers, prefixServers, ev, func(b []byte) (string, bool) {
				var r serverRecord
				return r.URL, json.Unmarshal(b, &r) == nil && r.URL != ""
			})
			list := make([]api.Server, 0, len(servers))
			for _, name := range slices.Sorted(maps.Keys(servers)) {
				list = append(list, api.Server{Name: name, URL: servers[name]})
			}
			s.hub.setServers(list)
		}
	}()
	if s.sharedStore() {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			ready := map[string]string{}
			for ev := range s.store.Watch(ctx, prefixReady, 0) {
				applyEvent(ready, prefixReady, ev, func(b []byte) (string, bool) { return string(b), true })
				s.hub.setRemoteReady(ready)
			}
		}()
	}
	return nil
}

// applyEvent folds a watch event into m (name → decoded value).
func applyEvent(m map[string]string, prefix string, ev store.Event, decode func([]byte) (string, bool)) {
	switch ev.Type {
	case store.EventReset:
		clear(m)
		for _, kv := range ev.State {
			if v, ok := decode(kv.Value); ok {
				m[strings.TrimPrefix(kv.Key, prefix)] = v
			}
		}
	case store.EventPut:
		if v, ok := decode(ev.KV.Value); ok {
			m[strings.TrimPrefix(ev.KV.Key, prefix)] = v
		}
	case store.EventDelete:
		delete(m, strings.TrimPrefix(ev.KV.Key, prefix))
	}
}

// announceReady writes node's readiness key while its netmap stream is
// open on this server, renewing it under a new lease every readyRenew.
// The returned function stops it, removes the key if this server wrote it
// last, and waits. It does nothing on a store no other server shares.
func (s *Server) announceReady(ctx context.Context, node string) (stop func()) {
	if !s.sharedStore() {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	key := prefixReady + node
	go func() {
		defer close(done)
		t := time.NewTicker(readyRenew)
		defer t.Stop()
		for {
			// Grant + Put(WithLease) each time: the heartbeat kine
			// supports. Another server writing the key at once (the node
			// moved) is harmless: both name a live stream.
			if err := s.putReady(ctx, key); err != nil && ctx.Err() == nil {
				s.log.Debug("writing readiness failed", "node", node, "err", err)
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return func() {
		cancel()
		<-done
		dctx, dcancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer dcancel()
		if v, rev, err := s.store.Get(dctx, key); err == nil && string(v) == s.cfg.NodeName {
			_ = s.store.Delete(dctx, key, rev)
		}
	}
}

func (s *Server) putReady(ctx context.Context, key string) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c := s.store.Client()
	lease, err := c.Grant(ctx, readyTTL)
	if err != nil {
		return err
	}
	_, err = c.Put(ctx, key, s.cfg.NodeName, clientv3.WithLease(lease.ID))
	return err
}

// isServerName reports whether name is a registered server.
func (s *Server) isServerName(ctx context.Context, name string) bool {
	_, _, err := s.store.Get(ctx, prefixServers+name)
	return err == nil
}

// forgetServer removes a deleted node's server registration and its
// embedded etcd membership, if it had them.
func (s *Server) forgetServer(ctx context.Context, name string) {
	if _, rev, err := s.store.Get(ctx, prefixServers+name); err == nil {
		if err := s.store.Delete(ctx, prefixServers+name, rev); err != nil {
			s.log.Warn("removing the server registration failed", "server", name, "err", err)
		}
	}
	if !s.store.IsEmbedded() || name == s.cfg.NodeName {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	removed, err := s.store.RemoveMember(ctx, name)
	switch {
	case err != nil:
		s.log.Warn("removing the etcd member of a deleted server failed; remove it again with 'trellis node delete'", "server", name, "err", err)
	case removed:
		s.log.Info("etcd member removed", "server", name)
	}
}

// setServers replaces the list of servers sent to agents.
func (h *hub) setServers(servers []api.Server) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if slices.Equal(h.servers, servers) {
		return
	}
	h.servers = servers
	h.publishLocked([]string{}) // no netmap entry changes; streams send the list
}

// serverList returns every server, or nil while there is only one: an
// agent then has nothing to fail over to, and needs no list.
func (h *hub) serverList() []api.Server {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.servers) < 2 {
		return nil
	}
	return slices.Clone(h.servers)
}

// setRemoteReady replaces the set of nodes with a netmap stream open on
// some server (node → server).
func (h *hub) setRemoteReady(ready map[string]string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if maps.Equal(h.remote, ready) {
		return
	}
	var flipped []string
	for name := range h.records {
		if (h.remote[name] != "") != (ready[name] != "") && h.streams[name] == nil && h.relayCapableLocked(name) {
			flipped = append(flipped, name)
		}
	}
	h.remote = maps.Clone(ready)
	if len(flipped) > 0 {
		// As for local streams: only a relay's readiness changes netmaps.
		h.publishLocked(flipped)
	} else {
		h.statusChangedLocked()
	}
}

// AdvertiseURL returns the URL agents in other networks reach this server
// at (announced to every agent).
func (s *Server) AdvertiseURL() string { return s.advertiseURL() }
