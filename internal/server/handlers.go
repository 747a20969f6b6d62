package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/netmap"
	"github.com/trellis-mesh/trellis/internal/pki"
	"github.com/trellis-mesh/trellis/internal/store"
	"github.com/trellis-mesh/trellis/internal/token"
)

const (
	maxJoinBody     = 64 << 10
	streamKeepalive = 15 * time.Second
	nodeCertTTL     = 365 * 24 * time.Hour
)

// Handler returns the server's HTTP API.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+api.PathCACerts, s.handleCACerts)
	mux.HandleFunc("GET "+api.PathPing, func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "pong") })
	mux.HandleFunc("POST "+api.PathJoin, s.handleJoin)
	mux.HandleFunc("GET "+api.PathNetmap, s.handleNetmap)
	mux.HandleFunc("GET "+api.PathNodes, s.admin(s.handleListNodes))
	mux.HandleFunc("GET "+api.PathPaths, s.admin(s.handlePaths))
	mux.HandleFunc("PUT "+api.PathReport, s.handleReport)
	s.tokenRoutes(mux)
	mux.HandleFunc("DELETE "+api.PathNodes+"/{name}", s.admin(s.handleDeleteNode))
	s.tunnelRoutes(mux)
	s.haRoutes(mux)
	egress := s.egressHandler(false)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodConnect { // egress.go
			egress(w, r)
			return
		}
		mux.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, api.Error{Code: code, Message: msg})
}

// identity returns who the client certificate of r names, if anyone.
func identity(r *http.Request) (pki.Identity, bool) {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.VerifiedChains[0]) == 0 {
		return pki.Identity{}, false
	}
	return pki.IdentityFromCert(r.TLS.VerifiedChains[0][0])
}

// admin wraps h so that only admin credentials reach it.
func (s *Server) admin(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id, ok := identity(r)
		if !ok {
			writeError(w, http.StatusUnauthorized, api.ErrCodeUnauthorized, "this call needs the admin credential; use the admin config the server wrote (--admin-config)")
			return
		}
		if id.Kind != pki.KindAdmin {
			writeError(w, http.StatusForbidden, api.ErrCodeForbidden, "this call needs the admin credential, not a node credential")
			return
		}
		h(w, r)
	}
}

func (s *Server) handleCACerts(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/x-pem-file")
	_, _ = w.Write(s.ca.CertPEM())
}

func remoteIP(r *http.Request) netip.Addr {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

// nodeNameRE is a DNS label-like name, as Kubernetes node names are.
var nodeNameRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$`)

// ValidateNodeName returns an error that says what a valid name is.
func ValidateNodeName(name string) error {
	if !nodeNameRE.MatchString(name) {
		return fmt.Errorf("node name %q is invalid: use 1-63 lower-case letters, digits, '-' or '.', starting and ending with a letter or digit", name)
	}
	return nil
}

// validateJoin checks a join request field by field.
func validateJoin(req *api.JoinRequest) error {
	if err := ValidateNodeName(req.NodeName); err != nil {
		return err
	}
	if len(req.NodePassword) < 16 || len(req.NodePassword) > 256 {
		return errors.New("node password must be 16-256 characters")
	}
	if len(req.CSR) == 0 {
		return errors.New("certificate request (csr) is missing")
	}
	if req.ListenPort != 0 && req.PublicKey.IsZero() {
		return errors.New("a node with a WireGuard listen port must send its public key")
	}
	for _, a := range req.ExternalIPs {
		if !netmap.ValidEndpoint(a) {
			return fmt.Errorf("external IP %s cannot be reached from other hosts (loopback, link-local, multicast or unspecified)", a)
		}
	}
	for _, a := range req.InternalIPs {
		if !netmap.ValidEndpoint(a) {
			return fmt.Errorf("node IP %s cannot be reached from other hosts (loopback, link-local, multicast or unspecified)", a)
		}
	}
	for _, p := range req.Networks {
		if !p.IsValid() || p.Bits() == 0 {
			return fmt.Errorf("network %s is not a valid subnet", p)
		}
	}
	if len(req.InternalIPs)+len(req.ExternalIPs)+len(req.Networks) > 64 {
		return errors.New("too many addresses")
	}
	return nil
}

// bearerToken checks the join token r bears, rate-limited per source
// address, and returns what it may join. When it returns false it has
// answered r: missing is the message for no token, wrong for a refused one.
func (s *Server) bearerToken(w http.ResponseWriter, r *http.Request, missing, wrong string) (token.Kind, bool) {
	src := remoteIP(r)
	if !s.joins.allow(src) {
		writeError(w, http.StatusTooManyRequests, api.ErrCodeUnauthorized, "too many join attempts from this address; wait a minute and try again")
		return 0, false
	}
	bearer, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		writeError(w, http.StatusUnauthorized, api.ErrCodeUnauthorized, missing)
		return 0, false
	}
	t, err := token.Parse(strings.TrimSpace(bearer))
	var kind token.Kind
	if err == nil {
		kind, ok = s.authorizeJoin(r.Context(), t)
	}
	if err != nil || !ok {
		s.log.Warn("join refused: wrong, expired or revoked token", "source", src, "path", r.URL.Path)
		writeError(w, http.StatusUnauthorized, api.ErrCodeUnauthorized, wrong)
		return 0, false
	}
	return kind, true
}

func (s *Server) handleJoin(w http.ResponseWriter, r *http.Request) {
	src := remoteIP(r)
	kind, ok := s.bearerToken(w, r,
		"join needs a token: pass --token with the content of the server's token file",
		"the join token is wrong, expired or revoked: copy it again from the server's token file (<data-dir>/server/token) or make a new one with 'trellis token create'")
	if !ok {
		return
	}
	var req api.JoinRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxJoinBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, api.ErrCodeBadRequest, "malformed join request: "+err.Error())
		return
	}
	if err := validateJoin(&req); err != nil {
		writeError(w, http.StatusBadRequest, api.ErrCodeBadRequest, err.Error())
		return
	}
	certPEM, err := s.ca.SignCSR(req.CSR, pki.NodeCommonName(req.NodeName), pki.OrgNodes, nodeCertTTL)
	if err != nil {
		writeError(w, http.StatusBadRequest, api.ErrCodeBadRequest, "certificate request rejected: "+err.Error())
		return
	}
	serial, err := certSerial(certPEM)
	if err != nil {
		writeError(w, http.StatusInternalServerError, api.ErrCodeInternal, err.Error())
		return
	}
	roles := []string{api.RoleAgent}
	if req.NodeName == s.cfg.NodeName || (kind == token.KindServer && s.isServerName(r.Context(), req.NodeName)) {
		if kind != token.KindServer {
			writeError(w, http.StatusForbidden, api.ErrCodeForbidden, fmt.Sprintf("%q is a server's node name; joining as a server needs the server token", req.NodeName))
			return
		}
		roles = []string{api.RoleServer}
	}
	start := time.Now()
	rec, err := s.reg.upsert(r.Context(), req.NodeName, req.NodePassword, func(rec *record) {
		rec.Roles = roles
		rec.PublicKey = req.PublicKey
		rec.InternalIPs = req.InternalIPs
		rec.Networks = maskAll(req.Networks)
		rec.ExternalIPs = req.ExternalIPs
		rec.ListenPort = req.ListenPort
		rec.Relay = req.Relay
		rec.ObservedIP = src
		rec.CertSerial = serial
	})
	var je *joinError
	switch {
	case errors.As(err, &je):
		s.log.Warn("join refused", "node", req.NodeName, "source", src, "reason", je.code)
		writeError(w, je.status, je.code, je.msg)
		return
	case err != nil:
		s.log.Error("join failed", "node", req.NodeName, "err", err)
		writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, "the server could not store the node: "+err.Error())
		return
	}
	if len(rec.PodCIDRs) == 0 && s.cfg.Kube != nil {
		s.log.Info("node joined; it waits for the pod CIDR of its Kubernetes Node", "node", rec.Name, "source", src, "took", time.Since(start).Round(time.Millisecond))
	} else {
		s.log.Info("node joined", "node", rec.Name, "source", src, "podCIDRs", joinPrefixes(rec.PodCIDRs), "took", time.Since(start).Round(time.Millisecond))
	}
	var members []api.Member
	if req.Members {
		members = s.hub.members(rec.Node)
	}
	writeJSON(w, http.StatusOK, api.JoinResponse{Node: rec.Node, Certificate: certPEM, ClusterCIDRs: s.cfg.ClusterCIDRs, Members: members, Servers: s.hub.serverList(), ServerName: s.cfg.NodeName})
}

func maskAll(ps []netip.Prefix) []netip.Prefix {
	out := make([]netip.Prefix, len(ps))
	for i, p := range ps {
		out[i] = p.Masked()
	}
	return out
}

func certSerial(certPEM []byte) (string, error) {
	blk, _ := pem.Decode(certPEM)
	if blk == nil {
		return "", errors.New("issued certificate is not PEM")
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return "", fmt.Errorf("parse issued certificate: %w", err)
	}
	return c.SerialNumber.Text(16), nil
}

// nodeAuth checks that r carries the current certificate of an existing
// node and returns its name.
func (s *Server) nodeAuth(w http.ResponseWriter, r *http.Request) (string, bool) {
	id, ok := identity(r)
	if !ok || id.Kind != pki.KindNode {
		writeError(w, http.StatusUnauthorized, api.ErrCodeUnauthorized, "this call needs a node credential; join the cluster first")
		return "", false
	}
	serial := r.TLS.VerifiedChains[0][0].SerialNumber.Text(16)
	// Ask the store, not the hub: the hub may lag a re-join or a delete
	// by a moment, and a retired or deleted credential must never pass.
	rr, _, err := s.reg.get(r.Context(), id.Name)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, "the server cannot read its datastore: "+err.Error())
		return "", false
	}
	if err != nil {
		writeError(w, http.StatusForbidden, api.ErrCodeNodeDeleted, fmt.Sprintf("node %q was deleted from the cluster; restart the agent with a valid join token to join again", id.Name))
		return "", false
	}
	if rr.CertSerial != serial {
		writeError(w, http.StatusForbidden, api.ErrCodeForbidden, fmt.Sprintf("this credential of node %q was replaced by a newer join; restart the agent to join again", id.Name))
		return "", false
	}
	return id.Name, true
}

// handleNetmap streams the node's netmap: one JSON object per line, a new
// one whenever it changes, and an empty line every streamKeepalive. A
// stream that asks for deltas (api.NetmapDeltasParam) gets the whole
// netmap first and then only what changed.
func (s *Server) handleNetmap(w http.ResponseWriter, r *http.Request) {
	name, ok := s.nodeAuth(w, r)
	if !ok {
		return
	}
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Time{})
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	done := s.hub.connected(name, time.Now())
	defer done()
	defer s.announceReady(r.Context(), name)()
	s.log.Debug("netmap stream opened", "node", name)
	defer s.log.Debug("netmap stream closed", "node", name)

	st := &netmapStream{
		s: s, name: name, w: w, rc: rc, enc: json.NewEncoder(w),
		deltas: r.URL.Query().Get(api.NetmapDeltasParam) == "1",
	}
	if have := r.URL.Query().Get(api.NetmapHaveParam); have != "" && st.deltas {
		v, d, err := api.ParseHave(have)
		if err != nil {
			// The header is written: say it in the stream's terms, a
			// whole netmap, and log what was wrong.
			s.log.Warn("ignoring a malformed netmap resume; sending the whole netmap", "node", name, "err", err)
		} else {
			st.have, st.haveVersion, st.haveDigest = true, v, d
		}
	}
	ka := time.NewTicker(streamKeepalive)
	defer ka.Stop()
	// The hub may not have seen a node that just joined: wait for it a
	// while before giving up.
	notYet := time.NewTimer(10 * time.Second)
	defer notYet.Stop()
	for {
		p := s.hub.snapshot()
		if _, found := slices.BinarySearchFunc(p.nodes, name, byName); !found {
			if st.sent {
				return // the node was deleted: the agent will learn why on reconnect
			}
			select {
			case <-r.Context().Done():
				return
			case <-notYet.C:
				return
			case <-p.changed:
				continue
			}
		}
		if err := st.send(r.Context(), p); err != nil {
			s.log.Debug("netmap stream ends", "node", name, "err", err)
			return
		}
	wait:
		for {
			select {
			case <-r.Context().Done():
				return
			case <-p.changed:
				break wait
			case <-ka.C:
				// Nothing changed: send the keepalive without computing
				// the netmap again (that is O(nodes) per stream).
				if err := st.write(func() error { _, err := io.WriteString(w, "\n"); return err }); err != nil {
					return
				}
			}
		}
	}
}

// netmapStream is what a netmap stream remembers of what it sent: for a
// stream of whole netmaps, a digest; for a stream of deltas, the view it
// last compared with, the relays its netmap uses and the server list.
// Both are O(1) or O(relays), not O(nodes), per stream.
type netmapStream struct {
	s      *Server
	name   string
	w      http.ResponseWriter
	rc     *http.ResponseController
	enc    *json.Encoder
	deltas bool

	// have: the agent said it has the netmap of haveVersion whose
	// content has haveDigest (api.NetmapHaveParam).
	have        bool
	haveVersion int64
	haveDigest  [sha256.Size]byte

	sent    bool
	digest  [sha256.Size]byte // whole netmaps: of the last one sent (netmapDigests.whole)
	view    *netmap.View      // deltas: the view of the last line sent
	seq     int64             // deltas: its publication
	version int64             // deltas: its version
	vias    map[string]bool   // deltas: relays the netmap sent uses
	servers []api.Server      // deltas: the server list sent
}

// send brings the agent's netmap up to publication p.
func (st *netmapStream) send(ctx context.Context, p snap) error {
	s := st.s
	servers := s.hub.serverList()
	if !st.deltas || !st.sent {
		nm, line, ds, err := st.whole(ctx, p, servers)
		if err != nil {
			return err
		}
		if st.sent && ds.whole == st.digest {
			return nil
		}
		if !st.sent {
			first := "whole"
			if st.deltas && st.have && ds.content == st.haveDigest && p.version >= st.haveVersion {
				// The agent has this netmap already: move it to this
				// version with an empty delta. (A server behind the
				// agent's version sends it whole: deltas go forward.)
				d := api.NetMapDelta{Version: p.version, Base: st.haveVersion, Servers: servers, ServerName: s.cfg.NodeName}
				if line, err = json.Marshal(api.NetMapLine{Delta: &d}); err != nil {
					return err
				}
				line, first = append(line, '\n'), "resumed"
			}
			s.metrics.streams.WithLabelValues(first).Inc()
		}
		if err := st.write(func() error { _, err := st.w.Write(line); return err }); err != nil {
			return err
		}
		st.sent, st.digest = true, ds.whole
		st.view, st.seq, st.version, st.vias, st.servers = p.view, p.seq, p.version, netmap.Vias(nm.Peers), servers
		return nil
	}
	changes := s.hub.changesSince(st.seq)
	s.hub.markSeen(st.name, p.version)
	changed, removed, _, vias := netmap.Delta(st.view, p.view, changes, st.name, st.vias)
	d := api.NetMapDelta{
		Version: p.version, Base: st.version,
		PeersChanged: changed, PeersRemoved: removed,
		Servers: servers, ServerName: s.cfg.NodeName,
	}
	if changes.All || changes.Maps[st.name] {
		if before, after := st.view.Node(st.name), p.view.Node(st.name); after != nil {
			self := asSelf(after)
			if before == nil {
				d.Self = &self
			} else if was := asSelf(before); !sameNode(&was, &self) {
				d.Self = &self
			}
		}
	}
	st.view, st.seq, st.vias = p.view, p.seq, vias
	if d.Self == nil && len(changed) == 0 && len(removed) == 0 && slices.Equal(servers, st.servers) {
		return nil // nothing this node sees changed
	}
	if err := st.write(func() error { return st.enc.Encode(api.NetMapLine{Delta: &d}) }); err != nil {
		return err
	}
	st.version, st.servers = p.version, servers
	return nil
}

// whole computes and encodes the whole netmap of publication p. Whole
// netmaps cost O(nodes) of CPU and memory each: only a few are built at
// once, so N agents connecting together (a server restart) do not hold N
// of them in memory. The line is written after, so a slow reader does not
// hold up the others.
func (st *netmapStream) whole(ctx context.Context, p snap, servers []api.Server) (api.NetMap, []byte, netmapDigests, error) {
	s := st.s
	select {
	case s.fullMaps <- struct{}{}:
	case <-ctx.Done():
		return api.NetMap{}, nil, netmapDigests{}, ctx.Err()
	}
	defer func() { <-s.fullMaps }()
	nm, _ := s.hub.netmapFor(st.name, p)
	nm.Servers, nm.ServerName = servers, s.cfg.NodeName
	var want digestKinds
	if !st.deltas {
		want |= digestWhole // to skip an unchanged netmap
	}
	if st.have && !st.sent {
		want |= digestContent // to resume
	}
	line, ds, err := encodeNetMap(nm, want)
	return nm, line, ds, err
}

// write writes one line with a deadline and flushes it.
func (st *netmapStream) write(line func() error) error {
	_ = st.rc.SetWriteDeadline(time.Now().Add(30 * time.Second))
	if err := line(); err != nil {
		return err
	}
	return st.rc.Flush()
}

// sameNode reports whether two records of a node read the same.
func sameNode(a, b *api.Node) bool {
	if a == nil || b == nil {
		return a == b
	}
	ja, errA := json.Marshal(a)
	jb, errB := json.Marshal(b)
	return errA == nil && errB == nil && bytes.Equal(ja, jb)
}

func (s *Server) handleListNodes(w http.ResponseWriter, _ *http.Request) {
	nodes := s.withTunnels(s.hub.nodesWithStatus())
	approvedByPeers(nodes)
	writeJSON(w, http.StatusOK, nodes)
}

func (s *Server) handleDeleteNode(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	rec, err := s.reg.remove(r.Context(), name)
	switch {
	case errors.Is(err, store.ErrNotFound) && s.isServerName(r.Context(), name):
		// A server without a node (--disable-agent): its registration
		// and etcd membership still go.
		s.forgetServer(r.Context(), name)
		writeJSON(w, http.StatusOK, api.Node{Name: name, Roles: []string{api.RoleServer}})
		return
	case errors.Is(err, store.ErrNotFound):
		writeError(w, http.StatusNotFound, api.ErrCodeNotFound, fmt.Sprintf("there is no node %q; 'trellis nodes' lists them", name))
		return
	case err != nil:
		writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, err.Error())
		return
	}
	s.log.Info("node deleted", "node", name, "podCIDRs", joinPrefixes(rec.PodCIDRs))
	s.forgetTunnel(name)
	s.forgetServer(r.Context(), name)
	writeJSON(w, http.StatusOK, rec.Node)
}

// apply folds one store event into the hub.
func (s *Server) apply(ev store.Event) {
	switch ev.Type {
	case store.EventReset:
		var recs []record
		for _, kv := range ev.State {
			var rec record
			if json.Unmarshal(kv.Value, &rec) == nil {
				recs = append(recs, rec)
			}
		}
		s.hub.reset(recs, ev.Rev)
	case store.EventPut:
		var rec record
		if err := json.Unmarshal(ev.KV.Value, &rec); err != nil {
			s.log.Warn("ignoring unreadable node record", "key", ev.KV.Key, "err", err)
			return
		}
		s.hub.put(rec, ev.Rev)
	case store.EventDelete:
		s.hub.del(strings.TrimPrefix(ev.KV.Key, prefixNodes), ev.Rev)
	}
}

// rateLimiter allows a burst of n requests per source per window.
type rateLimiter struct {
	mu      sync.Mutex
	n       int
	window  time.Duration
	sources map[netip.Addr]*rate.Limiter
}

func newRateLimiter(n int, window time.Duration) *rateLimiter {
	return &rateLimiter{n: n, window: window, sources: map[netip.Addr]*rate.Limiter{}}
}

func (l *rateLimiter) allow(src netip.Addr) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.sources) > 10000 {
		l.sources = map[netip.Addr]*rate.Limiter{} // bound memory under a spray of sources
	}
	lim := l.sources[src]
	if lim == nil {
		lim = rate.NewLimiter(rate.Every(l.window/time.Duration(l.n)), l.n)
		l.sources[src] = lim
	}
	return lim.Allow()
}
