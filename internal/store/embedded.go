package store

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Default ports of an embedded etcd member.
const (
	DefaultEtcdClientPort = 2379
	DefaultEtcdPeerPort   = 2380
)

// embeddedStopTimeout bounds how long Close waits for the member to stop.
const embeddedStopTimeout = 10 * time.Second

// Embedded configures an etcd member that runs inside the process: the
// highly available datastore of servers in one location (--cluster-init,
// and the servers that join it). All traffic of the member uses TLS with
// certificates of the cluster CA: peers authenticate each other, and the
// client port, on loopback, takes only clients with a certificate.
type Embedded struct {
	// Name is the member name; Trellis uses the server's node name.
	// Required, unique in the cluster.
	Name string
	// Dir is the member's data directory (WAL and database). Required.
	Dir string
	// PeerAddr is the address other members reach this member at, and
	// listen on (port 0 means DefaultEtcdPeerPort). Required.
	PeerAddr netip.AddrPort
	// ClientAddr is where the member serves its clients; only this
	// process connects. Default 127.0.0.1:DefaultEtcdClientPort.
	ClientAddr netip.AddrPort
	// InitialCluster is "name=https://addr:port,…" of every member,
	// this one included, when it joins an existing cluster (the answer
	// of MemberAdd on a member of that cluster). Empty starts a new
	// cluster of one member, or restarts the member from Dir.
	InitialCluster string
	// NewCluster says that InitialCluster lists the members of a new
	// cluster that all start at once (tests), not an existing one.
	NewCluster bool
	// CertFile and KeyFile are the member's certificate (server and
	// client authentication, naming PeerAddr and the loopback
	// addresses) and key; CAFile is the cluster CA that signed every
	// member's certificate. Required.
	CertFile, KeyFile, CAFile string
	// ElectionTimeout and HeartbeatInterval tune raft; 0 means etcd's
	// defaults (1 s and 100 ms), right for one location.
	ElectionTimeout, HeartbeatInterval time.Duration
}

// PeerURL returns the URL other members reach this member at.
func (e *Embedded) PeerURL() string {
	return "https://" + e.PeerAddr.String()
}

func (e *Embedded) validate() error {
	switch {
	case e.Name == "":
		return errors.New("store: the embedded etcd member needs a name")
	case e.Dir == "":
		return errors.New("store: the embedded etcd member needs a data directory")
	case !e.PeerAddr.Addr().IsValid() || e.PeerAddr.Addr().IsUnspecified():
		return errors.New("store: the embedded etcd member needs the address its peers reach it at: set --node-ip")
	case e.CertFile == "" || e.KeyFile == "" || e.CAFile == "":
		return errors.New("store: the embedded etcd member needs its certificate, key and the cluster CA")
	}
	if e.InitialCluster != "" {
		for _, m := range strings.Split(e.InitialCluster, ",") {
			name, u, ok := strings.Cut(m, "=")
			if !ok || name == "" || !strings.HasPrefix(u, "https://") {
				return fmt.Errorf("store: initial cluster member %q is not of the form name=https://address:port", m)
			}
		}
	}
	return nil
}

func (e Embedded) withDefaults() Embedded {
	if e.PeerAddr.Port() == 0 {
		e.PeerAddr = netip.AddrPortFrom(e.PeerAddr.Addr(), DefaultEtcdPeerPort)
	}
	if !e.ClientAddr.IsValid() {
		e.ClientAddr = netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), DefaultEtcdClientPort)
	}
	return e
}

// embeddedEtcd is a running member.
type embeddedEtcd struct {
	etcd      *embed.Etcd
	endpoint  string
	clientTLS *tls.Config
	closeOnce sync.Once
}

// startEmbedded starts the member cfg.Embedded describes and waits until
// it has joined a quorum (bounded by ctx).
func startEmbedded(ctx context.Context, cfg Config, log *slog.Logger) (*embeddedEtcd, error) {
	m := cfg.Embedded.withDefaults()
	if err := os.MkdirAll(m.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("store: create etcd data directory: %w", err)
	}
	peerURL := url.URL{Scheme: "https", Host: m.PeerAddr.String()}
	clientURL := url.URL{Scheme: "https", Host: m.ClientAddr.String()}
	// The peer port listens on the peer address only, not on every
	// interface: other networks have no business with it.
	listenPeer := peerURL

	ec := embed.NewConfig()
	ec.Name = m.Name
	ec.Dir = m.Dir
	ec.ListenPeerUrls = []url.URL{listenPeer}
	ec.AdvertisePeerUrls = []url.URL{peerURL}
	ec.ListenClientUrls = []url.URL{clientURL}
	ec.AdvertiseClientUrls = []url.URL{clientURL}
	ec.ListenMetricsUrls = nil
	ec.EnableGRPCGateway = false
	ec.InitialClusterToken = "trellis"
	ec.AutoCompactionRetention = "0" // the store compacts (Config.CompactInterval)
	if m.ElectionTimeout > 0 {
		ec.ElectionMs = uint(m.ElectionTimeout / time.Millisecond)
	}
	if m.HeartbeatInterval > 0 {
		ec.TickMs = uint(m.HeartbeatInterval / time.Millisecond)
	}
	if m.InitialCluster == "" {
		ec.InitialCluster = m.Name + "=" + peerURL.String()
		ec.ClusterState = embed.ClusterStateFlagNew
	} else {
		ec.InitialCluster = m.InitialCluster
		ec.ClusterState = embed.ClusterStateFlagExisting
		if m.NewCluster {
			ec.ClusterState = embed.ClusterStateFlagNew
		}
	}
	tlsInfo := transport.TLSInfo{
		CertFile:       m.CertFile,
		KeyFile:        m.KeyFile,
		TrustedCAFile:  m.CAFile,
		ClientCertAuth: true,
	}
	ec.PeerTLSInfo = tlsInfo
	ec.ClientTLSInfo = tlsInfo
	ec.Logger = "zap"
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.New(newSlogCore(cfg.Logger.With("component", "etcd").Handler())))

	e, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, fmt.Errorf("store: start embedded etcd member %s (peer %s): %w", m.Name, peerURL.String(), err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("store: embedded etcd member %s failed: %w", m.Name, err)
	case <-ctx.Done():
		e.Close()
		return nil, fmt.Errorf("store: embedded etcd member %s did not reach a quorum of its cluster (are the other servers running, and is peer port %d open between them?): %w", m.Name, m.PeerAddr.Port(), ctx.Err())
	}
	ctls, err := tlsInfo.ClientConfig()
	if err != nil {
		e.Close()
		return nil, fmt.Errorf("store: etcd client TLS: %w", err)
	}
	log.Info("embedded etcd member ready", "member", m.Name, "peerURL", peerURL.String(), "dir", m.Dir)
	return &embeddedEtcd{etcd: e, endpoint: clientURL.String(), clientTLS: ctls}, nil
}

// close stops the member. It is idempotent.
func (e *embeddedEtcd) close() {
	e.closeOnce.Do(func() {
		done := make(chan struct{})
		go func() {
			e.etcd.Close()
			close(done)
		}()
		t := time.NewTimer(embeddedStopTimeout)
		defer t.Stop()
		select {
		case <-done:
		case <-t.C:
			// Close waits for in-flight requests; give up waiting
			// rather than hang the process exit.
		}
	})
}

// Member is one member of an embedded etcd cluster.
type Member struct {
	ID       uint64
	Name     string // empty while a member added is not started yet
	PeerURLs []string
	// Learner members do not vote.
	Learner bool
}

// ErrMemberPending is returned by AddMember while another member added
// has not started yet: try again a little later.
var ErrMemberPending = errors.New("another server is joining the etcd cluster; try again in a few seconds")

// ErrNotEmbedded is returned by the membership calls on a store that is
// not an embedded etcd cluster.
var ErrNotEmbedded = errors.New("the datastore is not an embedded etcd cluster (start the first server with --cluster-init)")

// IsEmbedded reports whether the store runs an embedded etcd member.
func (s *Store) IsEmbedded() bool { return s.embedded != nil }

// Members lists the members of the embedded etcd cluster.
func (s *Store) Members(ctx context.Context) ([]Member, error) {
	if s.embedded == nil {
		return nil, ErrNotEmbedded
	}
	resp, err := s.client.MemberList(ctx)
	if err != nil {
		return nil, fmt.Errorf("store: list etcd members: %w", err)
	}
	out := make([]Member, 0, len(resp.Members))
	for _, m := range resp.Members {
		out = append(out, Member{ID: m.ID, Name: m.Name, PeerURLs: m.PeerURLs, Learner: m.IsLearner})
	}
	return out, nil
}

// AddMember adds a member named name reachable at peerURL to the embedded
// etcd cluster and returns the initial cluster string the new member must
// start with (Embedded.InitialCluster). Adding a member already there
// with the same peer URL (a retried join) returns the same answer;
// another member at that URL or of that name is replaced first, so a
// server that lost its data dir can join again.
func (s *Store) AddMember(ctx context.Context, name, peerURL string) (initialCluster string, err error) {
	if s.embedded == nil {
		return "", ErrNotEmbedded
	}
	members, err := s.Members(ctx)
	if err != nil {
		return "", err
	}
	for _, m := range members {
		if m.Name == "" && !slices.Contains(m.PeerURLs, peerURL) {
			// Another member was added and has not started: its name is
			// unknown, so no valid initial cluster can be given yet.
			return "", fmt.Errorf("store: add etcd member %s: %w", name, ErrMemberPending)
		}
	}
	for _, m := range members {
		sameURL := slices.Contains(m.PeerURLs, peerURL)
		switch {
		case sameURL && m.Name == "":
			// Added by an earlier try that did not start: same answer.
			return initialClusterOf(members, name, peerURL, m.ID), nil
		case sameURL || m.Name == name:
			// Started before under this name or at this URL: the server
			// asks to join again because its data dir is gone, so the
			// old member is stale.
			if _, err := s.client.MemberRemove(ctx, m.ID); err != nil {
				return "", fmt.Errorf("store: remove stale etcd member %s: %w", m.Name, err)
			}
		}
	}
	resp, err := s.client.MemberAdd(ctx, []string{peerURL})
	if err != nil {
		return "", fmt.Errorf("store: add etcd member %s at %s: %w", name, peerURL, err)
	}
	all := make([]Member, 0, len(resp.Members))
	for _, m := range resp.Members {
		all = append(all, Member{ID: m.ID, Name: m.Name, PeerURLs: m.PeerURLs})
	}
	return initialClusterOf(all, name, peerURL, resp.Member.ID), nil
}

// initialClusterOf formats the members as an initial cluster string,
// naming the member with id newID name.
func initialClusterOf(members []Member, name, peerURL string, newID uint64) string {
	var parts []string
	for _, m := range members {
		n := m.Name
		if m.ID == newID {
			n = name
		}
		if n == "" {
			continue // another member added but not started: leave it out
		}
		for _, u := range m.PeerURLs {
			parts = append(parts, n+"="+u)
		}
	}
	slices.Sort(parts)
	return strings.Join(parts, ",")
}

// RemoveMember removes the member named name from the embedded etcd
// cluster. It reports false, and no error, when there is no such member.
func (s *Store) RemoveMember(ctx context.Context, name string) (bool, error) {
	if s.embedded == nil {
		return false, ErrNotEmbedded
	}
	members, err := s.Members(ctx)
	if err != nil {
		return false, err
	}
	for _, m := range members {
		if m.Name != name {
			continue
		}
		for {
			_, err := s.client.MemberRemove(ctx, m.ID)
			if err == nil {
				return true, nil
			}
			// etcd refuses while a member joined less than 5 s ago or
			// one is down; that passes.
			if !errors.Is(err, rpctypes.ErrUnhealthy) && !errors.Is(err, rpctypes.ErrGRPCUnhealthy) {
				return false, fmt.Errorf("store: remove etcd member %s: %w", name, err)
			}
			t := time.NewTimer(time.Second)
			select {
			case <-ctx.Done():
				t.Stop()
				return false, fmt.Errorf("store: remove etcd member %s: %w (%w)", name, err, ctx.Err())
			case <-t.C:
			}
		}
	}
	return false, nil
}
