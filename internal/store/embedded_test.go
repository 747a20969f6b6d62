package store_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"net/url"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/trellis-mesh/trellis/internal/pki"
	"github.com/trellis-mesh/trellis/internal/store"
	"github.com/trellis-mesh/trellis/internal/store/storetest"
)

// freePort returns a loopback TCP port nobody listens on right now,
// below Linux's ephemeral range (32768-60999), so that no outgoing
// connection takes it before a member restarts on it.
func freePort(t testing.TB) uint16 {
	t.Helper()
	for range 1000 {
		p := 20000 + rand.IntN(12000)
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue
		}
		ln.Close()
		return uint16(p)
	}
	t.Fatal("no free port")
	return 0
}

var loopback = netip.MustParseAddr("127.0.0.1")

// etcdMember is one member of a test cluster: its fixed ports and files,
// so that a restart finds it where it was.
type etcdMember struct {
	cfg store.Embedded
}

// newTestCluster prepares n members on loopback with certificates of one
// CA in dir. Nothing runs until openCluster.
func newTestCluster(t testing.TB, dir string, n int) []etcdMember {
	t.Helper()
	ca, err := pki.LoadOrCreateCA(filepath.Join(dir, "ca"))
	if err != nil {
		t.Fatal(err)
	}
	var members []etcdMember
	var initial []string
	for i := range n {
		name := "m" + string(rune('0'+i))
		mdir := filepath.Join(dir, name)
		cert, key, err := ca.IssueEtcd(mdir, name, pki.SANs{IPs: []netip.Addr{loopback}})
		if err != nil {
			t.Fatal(err)
		}
		m := store.Embedded{
			Name:       name,
			Dir:        filepath.Join(mdir, "etcd"),
			PeerAddr:   netip.AddrPortFrom(loopback, freePort(t)),
			ClientAddr: netip.AddrPortFrom(loopback, freePort(t)),
			CertFile:   cert, KeyFile: key, CAFile: filepath.Join(dir, "ca", pki.CACertFile),
		}
		initial = append(initial, name+"="+m.PeerURL())
		members = append(members, etcdMember{cfg: m})
	}
	if n > 1 {
		// A cluster born with n members: each starts with the full list.
		// (Servers join one by one instead: see TestEmbeddedJoin.)
		for i := range members {
			members[i].cfg.InitialCluster = strings.Join(initial, ",")
			members[i].cfg.NewCluster = true
		}
	}
	return members
}

// openCluster starts every member at once (a member of a cluster of
// several is ready only once a quorum runs) and returns their stores,
// closed at the end of t.
func openCluster(t testing.TB, members []etcdMember) []*store.Store {
	t.Helper()
	stores := make([]*store.Store, len(members))
	errs := make([]error, len(members))
	var wg sync.WaitGroup
	for i, m := range members {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			emb := m.cfg
			stores[i], errs[i] = store.Open(ctx, store.Config{Embedded: &emb, Logger: testLogger()})
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			for _, s := range stores {
				if s != nil {
					s.Close()
				}
			}
			t.Fatalf("open member %d: %v", i, err)
		}
	}
	t.Cleanup(func() {
		for _, s := range stores {
			if err := s.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		}
	})
	return stores
}

// embeddedOpener returns an open function for storetest.Run: a cluster
// of n members per test (kept across reopens of one test), the store of
// the first member returned.
func embeddedOpener(base string, n int) func(t *testing.T) *store.Store {
	var mu sync.Mutex
	clusters := map[string][]etcdMember{}
	running := map[string][]*store.Store{}
	return func(t *testing.T) *store.Store {
		t.Helper()
		mu.Lock()
		defer mu.Unlock()
		c, ok := clusters[t.Name()]
		if !ok {
			c = newTestCluster(t, filepath.Join(base, strings.NewReplacer("/", "_", " ", "_").Replace(t.Name())), n)
			clusters[t.Name()] = c
		}
		// A reopen (the suite closed the store it had) restarts the whole
		// cluster: stop the members still running first.
		for _, s := range running[t.Name()] {
			_ = s.Close()
		}
		stores := openCluster(t, c)
		running[t.Name()] = stores
		return stores[0]
	}
}

func TestEmbeddedEtcd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd members; skipped with -short")
	}
	storetest.Run(t, embeddedOpener(t.TempDir(), 1))
}

func TestEmbeddedEtcdThreeMembers(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd members; skipped with -short")
	}
	storetest.Run(t, embeddedOpener(t.TempDir(), 3))
}

// TestEmbeddedJoin grows a cluster the way servers do: one member
// (--cluster-init), then AddMember on it for each server that joins and a
// start with the initial cluster it answered; then a member is removed,
// and the data written before is on every member.
func TestEmbeddedJoin(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd members; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	members := newTestCluster(t, t.TempDir(), 3)
	for i := range members {
		members[i].cfg.InitialCluster, members[i].cfg.NewCluster = "", false
	}
	first := openCluster(t, members[:1])[0]
	if _, err := first.Create(ctx, "/trellis/test/before", []byte("1")); err != nil {
		t.Fatal(err)
	}
	all := []*store.Store{first}
	for _, m := range members[1:] {
		var ic string
		var err error
		for {
			ic, err = first.AddMember(ctx, m.cfg.Name, m.cfg.PeerURL())
			if !errors.Is(err, store.ErrMemberPending) && !errors.Is(err, rpctypes.ErrUnhealthy) {
				break
			}
			time.Sleep(500 * time.Millisecond) // the member before is still starting
		}
		if err != nil {
			t.Fatalf("AddMember %s: %v", m.cfg.Name, err)
		}
		if !strings.Contains(ic, m.cfg.Name+"="+m.cfg.PeerURL()) || !strings.Contains(ic, "m0=") {
			t.Fatalf("initial cluster %q lacks the new or the first member", ic)
		}
		m.cfg.InitialCluster = ic
		all = append(all, openCluster(t, []etcdMember{m})[0])
	}
	got, err := first.Members(ctx)
	if err != nil || len(got) != 3 {
		t.Fatalf("Members = %v, %v; want 3", got, err)
	}
	for i, s := range all {
		if v, _, err := s.Get(ctx, "/trellis/test/before"); err != nil || string(v) != "1" {
			t.Errorf("member %d: Get = %q, %v", i, v, err)
		}
	}
	// Removing the third member leaves two that still write.
	if ok, err := first.RemoveMember(ctx, "m2"); err != nil || !ok {
		t.Fatalf("RemoveMember = %v, %v", ok, err)
	}
	if _, err := all[1].Create(ctx, "/trellis/test/after", []byte("2")); err != nil {
		t.Fatalf("write after removing a member: %v", err)
	}
	if ok, err := first.RemoveMember(ctx, "m2"); err != nil || ok {
		t.Fatalf("second RemoveMember = %v, %v; want false, nil", ok, err)
	}
}

// TestExternalEtcd runs the suite against an etcd reached over the
// network with the external-etcd code path (Endpoint http://…): a member
// started here with etcd's embed package, as an etcd binary would run it.
// TestEtcd runs the same suite against a real external etcd when
// TRELLIS_TEST_ETCD_ENDPOINT is set.
func TestExternalEtcd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts an etcd member; skipped with -short")
	}
	ep := startPlainEtcd(t)
	storetest.Run(t, opener(t.TempDir(), store.Config{Endpoint: ep}))
}

// startPlainEtcd runs a one-member etcd with plain HTTP on loopback for
// the duration of t and returns its client URL.
func startPlainEtcd(t testing.TB) string {
	t.Helper()
	cfg := embed.NewConfig()
	cfg.Name = "external"
	cfg.Dir = t.TempDir()
	peer := url.URL{Scheme: "http", Host: netip.AddrPortFrom(loopback, freePort(t)).String()}
	client := url.URL{Scheme: "http", Host: netip.AddrPortFrom(loopback, freePort(t)).String()}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{peer}, []url.URL{peer}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{client}, []url.URL{client}
	cfg.InitialCluster = cfg.Name + "=" + peer.String()
	cfg.ListenMetricsUrls = nil
	cfg.EnableGRPCGateway = false
	cfg.Logger = "zap"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(e.Close)
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(time.Minute):
		t.Fatal("etcd did not become ready")
	}
	return client.String()
}

// tlsFor returns the client TLS of a test member (its own certificate).
func tlsFor(m store.Embedded) (*tls.Config, error) {
	return transport.TLSInfo{CertFile: m.CertFile, KeyFile: m.KeyFile, TrustedCAFile: m.CAFile}.ClientConfig()
}

// waitPeerConnsClosed waits (up to 15 s) until the connections between
// etcd members of closed test clusters are gone: they end some seconds
// after the members closed (cmux connections ignore the read deadline
// net/http sets on close), and the leak check must not count them.
func waitPeerConnsClosed() {
	deadline := time.Now().Add(15 * time.Second)
	buf := make([]byte, 1<<20)
	for time.Now().Before(deadline) {
		n := runtime.Stack(buf, true)
		s := string(buf[:n])
		if !strings.Contains(s, "net/http.(*connReader).abortPendingRead") && !strings.Contains(s, "net/http.(*persistConn).readLoop") {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}
