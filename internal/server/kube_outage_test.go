package server

import (
	"context"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/kube"
	"github.com/trellis-mesh/trellis/internal/kube/kubetest"
)

// kubeDown is how long TestKubeAPIServerDown keeps the API server
// stopped: TRELLIS_KUBE_DOWN (a duration, e.g. 3m), else 15 s.
func kubeDown(t *testing.T) time.Duration {
	if s := os.Getenv("TRELLIS_KUBE_DOWN"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("TRELLIS_KUBE_DOWN=%s: %v", s, err)
		}
		return d
	}
	return 15 * time.Second
}

// podCIDRsOf returns every record's pod CIDRs.
func podCIDRsOf(t *testing.T, ts *testServer) map[string]string {
	t.Helper()
	recs, _, err := ts.reg.list(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, r := range recs {
		out[r.Name] = prefixList(r.PodCIDRs)
	}
	return out
}

// TestKubeAPIServerDown: with kube-apiserver stopped, the Trellis server
// keeps serving what it knows (no peer removed, no record changed, joins
// and reports go on); when it comes back, a Node deleted right away leaves
// the netmaps and a new Node joins the mesh.
func TestKubeAPIServerDown(t *testing.T) {
	env := kubetest.Start(t, kubetest.Options{})
	admin := env.Admin(t)
	ts := startKubeServer(t, env, "", nil)
	a := mustJoin(t, ts, joinReq("a", 1, pwA))
	aCh := ts.follow(t, a)
	for i, name := range []string{"b", "c"} {
		j := mustJoin(t, ts, joinReq(name, byte(2+i), pwA))
		ts.follow(t, j)
	}
	for _, name := range []string{"a", "b", "c"} {
		env.RegisterNode(t, name, nil)
	}
	aCh.wait(t, "b and c in a's netmap", func(nm api.NetMap) bool { return peerNames(nm) == "b,c" && len(nm.Self.PodCIDRs) == 1 })
	before := podCIDRsOf(t, ts)

	if v := gauge(t, ts, "trellis_server_kube_api_reachable"); v != 1 {
		t.Fatalf("trellis_server_kube_api_reachable = %v with the API server up", v)
	}
	down := kubeDown(t)
	env.StopAPIServer()
	stopped := time.Now()
	eventually(t, "trellis_server_kube_api_reachable 0", func() bool { return gauge(t, ts, "trellis_server_kube_api_reachable") == 0 })
	d := mustJoin(t, ts, joinReq("d", 4, pwA)) // joins go on; d waits for its Node
	dCh := ts.follow(t, d)
	for time.Since(stopped) < down {
		ts.report(t, a, api.Report{InternalIPs: []netip.Addr{netip.MustParseAddr("10.1.0.1")}, ExternalIPs: []netip.Addr{netip.MustParseAddr("203.0.113.1")},
			Observations: []api.Observation{{Peer: "b", Handshake: api.HandshakeOK}}})
		if nm := aCh.now(t); peerNames(nm) != "b,c" || len(nm.Self.PodCIDRs) != 1 {
			t.Fatalf("%v into the outage a's netmap has pod CIDRs %v and peers %q; want it untouched", time.Since(stopped).Round(time.Second), nm.Self.PodCIDRs, peerNames(nm))
		}
		time.Sleep(time.Second)
	}
	after := podCIDRsOf(t, ts)
	for name, cidrs := range before {
		if after[name] != cidrs {
			t.Fatalf("%s's pod CIDRs went from %s to %s while the API server was down", name, cidrs, after[name])
		}
	}
	if nm := dCh.now(t); len(nm.Self.PodCIDRs) != 0 {
		t.Fatalf("d got pod CIDRs %v without a Node", nm.Self.PodCIDRs)
	}
	t.Logf("API server down for %v: netmaps and records untouched", time.Since(stopped).Round(time.Second))

	env.StartAPIServer()
	restarted := time.Now()
	if err := admin.CoreV1().Nodes().Delete(context.Background(), "c", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	env.RegisterNode(t, "d", nil)
	aCh.wait(t, "c gone and d in a's netmap", func(nm api.NetMap) bool { return peerNames(nm) == "b,d" })
	t.Logf("measured: API server back after %v down → a Node deleted then is gone from the netmaps %v later", down, time.Since(restarted).Round(time.Millisecond))
}

// cutProxy is a TCP proxy to the API server that a test can cut and
// restore: the Trellis server loses the API server while the test keeps
// using it.
type cutProxy struct {
	target string
	addr   string
	mu     sync.Mutex
	ln     net.Listener
	conns  map[net.Conn]bool
	wg     sync.WaitGroup
}

func newCutProxy(t *testing.T, target string) *cutProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{target: target, addr: ln.Addr().String(), conns: map[net.Conn]bool{}}
	p.serve(ln)
	t.Cleanup(func() { p.cut(); p.wg.Wait() })
	return p
}

func (p *cutProxy) serve(ln net.Listener) {
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", p.target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns[c], p.conns[up] = true, true
			p.mu.Unlock()
			for _, pair := range [][2]net.Conn{{c, up}, {up, c}} {
				p.wg.Add(1)
				go func() {
					defer p.wg.Done()
					_, _ = io.Copy(pair[0], pair[1])
					pair[0].Close()
					pair[1].Close()
				}()
			}
		}
	}()
}

// cut closes the listener and every connection.
func (p *cutProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for c := range p.conns {
		c.Close()
	}
	clear(p.conns)
}

// restore listens again on the same address.
func (p *cutProxy) restore(t *testing.T) {
	var ln net.Listener
	var err error
	for range 50 {
		if ln, err = net.Listen("tcp", p.addr); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	p.serve(ln)
}

// TestKubeCatchUp: while the Trellis server cannot reach the API server,
// Nodes are deleted, registered again, added and annotated. Nothing of it
// touches the mesh until the API server is reachable again; then all of
// it is applied: none is lost.
func TestKubeCatchUp(t *testing.T) {
	env := kubetest.Start(t, kubetest.Options{})
	admin := env.Admin(t)
	ctx := context.Background()
	proxy := newCutProxy(t, env.Server[len("https://"):])
	ts := startKubeServer(t, env, env.AdminKubeconfigVia("via-proxy", "https://"+proxy.addr), nil)
	a := mustJoin(t, ts, joinReq("a", 1, pwA))
	aCh := ts.follow(t, a)
	for i, name := range []string{"b", "c", "e"} {
		req := joinReq(name, byte(2+i), pwA)
		if name == "e" {
			req.ExternalIPs = nil // its external IP comes from K3s's annotation
		}
		ts.follow(t, mustJoin(t, ts, req))
	}
	for _, name := range []string{"a", "b", "c", "e"} {
		env.RegisterNode(t, name, nil)
	}
	nm := aCh.wait(t, "b, c and e in a's netmap", func(nm api.NetMap) bool { return peerNames(nm) == "b,c,e" })
	oldC, _ := peer(nm, "c")

	proxy.cut()
	cut := time.Now()
	if err := admin.CoreV1().Nodes().Delete(ctx, "b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := admin.CoreV1().Nodes().Delete(ctx, "c", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	// c registers again with a pod CIDR of its own choosing (another
	// allocator), d is new, e gets K3s's external IP annotation.
	env.RegisterNode(t, "c", nil)
	if _, err := admin.CoreV1().Nodes().Patch(ctx, "c", types.MergePatchType, []byte(`{"spec":{"podCIDR":"10.42.200.0/24","podCIDRs":["10.42.200.0/24"]}}`), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	d := mustJoin(t, ts, joinReq("d", 5, pwA))
	ts.follow(t, d)
	env.RegisterNode(t, "d", nil)
	if _, err := admin.CoreV1().Nodes().Patch(ctx, "e", types.MergePatchType, []byte(`{"metadata":{"annotations":{"k3s.io/external-ip":"198.51.100.50"}}}`), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	if nm := aCh.now(t); peerNames(nm) != "b,c,e" {
		t.Fatalf("cut off from the API server, a's netmap changed to %q", peerNames(nm))
	}

	proxy.restore(t)
	restored := time.Now()
	nm = aCh.wait(t, "every change made meanwhile", func(nm api.NetMap) bool {
		c, _ := peer(nm, "c")
		e, _ := peer(nm, "e")
		return peerNames(nm) == "c,d,e" && prefixList(c.AllowedIPs) == "10.42.200.0/24" && e.Endpoint.String() == "198.51.100.50:51820"
	})
	t.Logf("measured: cut off from the API server for %v; after it was reachable again every change was applied in %v (c: %v → %v)",
		restored.Sub(cut).Round(time.Second), time.Since(restored).Round(time.Millisecond), oldC.AllowedIPs, mustPeer(nm, "c").AllowedIPs)
	if rec, _, err := ts.reg.get(ctx, "b"); err != nil || len(rec.PodCIDRs) != 0 {
		t.Fatalf("b after its Node was deleted: %+v %v", rec, err)
	}
	eventually(t, "d's Node with Trellis's pod CIDR", func() bool {
		return nodeCIDRs(getNode(t, admin, "d")) == prefixList(mustPeer(aCh.now(t), "d").AllowedIPs)
	})
}

func mustPeer(nm api.NetMap, name string) api.Peer {
	p, _ := peer(nm, name)
	return p
}

// TestKubeHA: two servers on one store (embedded etcd), each with its
// informer. They agree instead of fighting: one pod CIDR per Node, the
// annotations and condition written about once per Node, no writes once
// settled, and a deleted Node leaves the netmaps of both servers.
func TestKubeHA(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd members; skipped with -short")
	}
	t.Cleanup(waitPeerConnsClosed)
	env := kubetest.Start(t, kubetest.Options{})
	admin := env.Admin(t)
	writes := watchNodeWrites(t, admin)
	withKube := func(c *Config) {
		c.Logger = kubeLog()
		c.Kube = &kube.Config{Kubeconfig: env.AdminKubeconfig, AllocateGrace: 500 * time.Millisecond}
	}
	sa := startServer(t, t.TempDir(), func(c *Config) {
		haServer(t, "srv-a", func(h *HAConfig) { h.ClusterInit = true })(c)
		withKube(c)
	})
	sb := startServer(t, t.TempDir(), func(c *Config) {
		haServer(t, "srv-b", func(h *HAConfig) { h.JoinURL = sa.URL() })(c)
		c.Token = sa.Token()
		withKube(c)
	})
	names := []string{"n1", "n2", "n3", "n4"}
	var follow []*follower
	for i, name := range names {
		ts := sa
		if i%2 == 1 {
			ts = sb
		}
		follow = append(follow, ts.follow(t, mustJoin(t, ts, joinReq(name, byte(1+i), pwA))))
	}
	for _, name := range names {
		env.RegisterNode(t, name, nil)
	}
	for i, f := range follow {
		f.wait(t, "every other node in the netmap of "+names[i], func(nm api.NetMap) bool { return len(nm.Peers) == len(names)-1 && len(nm.Self.PodCIDRs) == 1 })
	}
	seen := map[string]string{}
	for _, name := range names {
		cidr := nodeCIDRs(getNode(t, admin, name))
		if other, dup := seen[cidr]; dup || cidr == "" {
			t.Fatalf("Nodes %s and %s both have pod CIDR %q", other, name, cidr)
		}
		seen[cidr] = name
	}
	eventually(t, "every Node up", func() bool {
		for _, name := range names {
			if c, ok := networkCondition(getNode(t, admin, name)); !ok || c.Status != "False" {
				return false
			}
		}
		return true
	})
	time.Sleep(2 * time.Second)
	settled := writes.total()
	t.Logf("measured: two servers, %d Nodes: %d Node writes until settled (%s); srv-a %+v, srv-b %+v", len(names), settled, writes, sa.kube.Load().Stats(), sb.kube.Load().Stats())
	if settled > 4*len(names) {
		t.Errorf("%d Node writes for %d Nodes: the servers fight", settled, len(names))
	}
	time.Sleep(2 * time.Second)
	if n := writes.total(); n != settled {
		t.Fatalf("Node writes went on after settling: %d → %d (%s)", settled, n, writes)
	}
	start := time.Now()
	if err := admin.CoreV1().Nodes().Delete(context.Background(), "n4", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	for i, f := range follow[:3] {
		f.wait(t, "n4 gone from the netmap of "+names[i], func(nm api.NetMap) bool { return peerNames(nm) == removeName("n1,n2,n3", names[i]) })
	}
	t.Logf("measured: Node deleted → gone from the netmaps on both servers: %v", time.Since(start).Round(time.Millisecond))
}

// removeName drops name from a comma-separated list.
func removeName(list, name string) string {
	return strings.Join(slices.DeleteFunc(strings.Split(list, ","), func(n string) bool { return n == name }), ",")
}

// gauge returns the value of the server's metric name (without labels).
func gauge(t *testing.T, ts *testServer, name string) float64 {
	t.Helper()
	mfs, err := ts.Metrics().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}
