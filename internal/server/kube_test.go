package server

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/kube"
	"github.com/trellis-mesh/trellis/internal/kube/kubetest"
)

// Tests of Kubernetes mode against a real kube-apiserver (and
// kube-controller-manager's node IPAM): internal/kube/kubetest. Nodes
// join through the join API and follow their netmap streams as agents do;
// their Nodes are registered with node credentials, as kubelets do.

var clusterV4 = []netip.Prefix{netip.MustParsePrefix("10.42.0.0/16")}

// kubeLog is where the servers of these tests log: stderr with -v, else
// nowhere.
func kubeLog() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// startKubeServer starts a Trellis server following env's Nodes through
// kubeconfig (the admin's if "").
func startKubeServer(t *testing.T, env *kubetest.Env, kubeconfig string, mod func(*Config)) *testServer {
	t.Helper()
	if kubeconfig == "" {
		kubeconfig = env.AdminKubeconfig
	}
	return startServer(t, t.TempDir(), func(c *Config) {
		c.Logger = kubeLog()
		c.Kube = &kube.Config{Kubeconfig: kubeconfig, AllocateGrace: 500 * time.Millisecond}
		if mod != nil {
			mod(c)
		}
	})
}

// follower follows a node's netmap stream (deltas, as agents ask for
// them) and checks every netmap it sees: no two peers share a pod CIDR.
type follower struct {
	mu      sync.Mutex
	last    api.NetMap
	seen    bool
	changed chan struct{} // closed and replaced on each netmap
	closed  bool
}

func (ts *testServer) follow(t *testing.T, j *joined) *follower {
	src, _, _ := ts.deltaStream(t, j)
	f := &follower{changed: make(chan struct{})}
	go func() {
		for nm := range src {
			seen := map[netip.Prefix]string{}
			for _, p := range nm.Peers {
				for _, c := range p.AllowedIPs {
					if other, dup := seen[c]; dup {
						t.Errorf("netmap of %s (version %d): peers %s and %s both have %s", nm.Self.Name, nm.Version, other, p.Name, c)
					}
					seen[c] = p.Name
				}
			}
			f.mu.Lock()
			f.last, f.seen = nm, true
			close(f.changed)
			f.changed = make(chan struct{})
			f.mu.Unlock()
		}
		f.mu.Lock()
		f.closed = true
		close(f.changed)
		f.mu.Unlock()
	}()
	return f
}

// wait returns the node's netmap once ok holds for it (at once if it
// does already), failing after 30 s: these netmaps wait for the API
// server and the node IPAM on a busy machine.
func (f *follower) wait(t *testing.T, what string, ok func(api.NetMap) bool) api.NetMap {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		f.mu.Lock()
		nm, seen, closed, changed := f.last, f.seen, f.closed, f.changed
		f.mu.Unlock()
		if seen && ok(nm) {
			return nm
		}
		if closed {
			t.Fatalf("stream closed while waiting for %s", what)
		}
		select {
		case <-changed:
		case <-timeout:
			t.Fatalf("timed out waiting for %s; the netmap of %s has pod CIDRs %v and peers %q", what, nm.Self.Name, nm.Self.PodCIDRs, peerNames(nm))
		}
	}
}

// now returns the node's netmap as it is.
func (f *follower) now(t *testing.T) api.NetMap {
	t.Helper()
	return f.wait(t, "a first netmap", func(api.NetMap) bool { return true })
}

func peer(nm api.NetMap, name string) (api.Peer, bool) {
	for _, p := range nm.Peers {
		if p.Name == name {
			return p, true
		}
	}
	return api.Peer{}, false
}

// eventually polls ok until it holds, failing after 30 s.
func eventually(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func getNode(t *testing.T, c kubernetes.Interface, name string) *corev1.Node {
	t.Helper()
	n, err := c.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get Node %s: %v", name, err)
	}
	return n
}

func nodeCIDRs(n *corev1.Node) string { return strings.Join(n.Spec.PodCIDRs, ",") }

func networkCondition(n *corev1.Node) (corev1.NodeCondition, bool) {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeNetworkUnavailable {
			return c, true
		}
	}
	return corev1.NodeCondition{}, false
}

// nodeWrites counts the MODIFIED events of every Node, from now on: the
// writes every Node watcher of the cluster pays for.
type nodeWrites struct {
	mu     sync.Mutex
	counts map[string]int
}

func watchNodeWrites(t *testing.T, c kubernetes.Interface) *nodeWrites {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w, err := c.CoreV1().Nodes().Watch(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	nw := &nodeWrites{counts: map[string]int{}}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev := range w.ResultChan() {
			if n, ok := ev.Object.(*corev1.Node); ok && ev.Type == watch.Modified {
				nw.mu.Lock()
				nw.counts[n.Name]++
				nw.mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() { cancel(); w.Stop(); <-done })
	return nw
}

func (nw *nodeWrites) total() int {
	nw.mu.Lock()
	defer nw.mu.Unlock()
	n := 0
	for _, c := range nw.counts {
		n += c
	}
	return n
}

func (nw *nodeWrites) String() string {
	nw.mu.Lock()
	defer nw.mu.Unlock()
	return fmt.Sprint(nw.counts)
}

// refusalEvents returns the messages of the PodCIDRRefused Events on
// Node name.
func refusalEvents(t *testing.T, c kubernetes.Interface, name string) []string {
	t.Helper()
	evs, err := c.CoreV1().Events("default").List(context.Background(), metav1.ListOptions{FieldSelector: "involvedObject.kind=Node,involvedObject.name=" + name})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range evs.Items {
		if e.Reason == kube.EventReasonRefused {
			out = append(out, e.Message)
		}
	}
	return out
}

// TestKubePodCIDRsFromNodes: with kube-controller-manager allocating, a
// node's pod CIDRs are its Node's spec.podCIDRs; before its Node has one
// it is in no netmap; the Node gets the key, endpoints and
// NetworkUnavailable=False and then no more writes; a deleted Node takes
// the node out of every netmap at once, and a Node registered again
// brings it back.
func TestKubePodCIDRsFromNodes(t *testing.T) {
	env := kubetest.Start(t, kubetest.Options{NodeIPAM: clusterV4})
	t.Logf("control plane ready in %v", env.StartedIn.Round(time.Millisecond))
	admin := env.Admin(t)
	writes := watchNodeWrites(t, admin)
	// Only the node IPAM allocates here.
	ts := startKubeServer(t, env, "", func(c *Config) { c.Kube.AllocateGrace = 10 * time.Minute })
	ctx := context.Background()

	a := mustJoin(t, ts, joinReq("a", 1, pwA))
	b := mustJoin(t, ts, joinReq("b", 2, pwA))
	if len(a.resp.Node.PodCIDRs) != 0 {
		t.Fatalf("a join in Kubernetes mode allocated %v", a.resp.Node.PodCIDRs)
	}
	kReq := joinReq("k", 3, pwA) // no --node-external-ip: K3s's annotation says it
	kReq.ExternalIPs = nil
	k := mustJoin(t, ts, kReq)
	aCh, bCh, kCh := ts.follow(t, a), ts.follow(t, b), ts.follow(t, k)
	nm := aCh.now(t)
	if len(nm.Self.PodCIDRs) != 0 || len(nm.Peers) != 0 {
		t.Fatalf("a has no Node yet but its netmap has pod CIDRs %v and peers %q", nm.Self.PodCIDRs, peerNames(nm))
	}

	start := time.Now()
	env.RegisterNode(t, "a", nil)
	nm = aCh.wait(t, "a's pod CIDR", func(nm api.NetMap) bool { return len(nm.Self.PodCIDRs) == 1 })
	tookA := time.Since(start)
	if got, want := prefixList(nm.Self.PodCIDRs), nodeCIDRs(getNode(t, admin, "a")); got != want {
		t.Fatalf("a's pod CIDRs %s, its Node's spec.podCIDRs %s", got, want)
	}
	t.Logf("measured: Node registered → its pod CIDR (node IPAM) in its netmap: %v", tookA.Round(time.Millisecond))
	env.RegisterNode(t, "b", nil)
	env.RegisterNode(t, "k", map[string]string{kube.AnnotationK3sExternalIP: "198.51.100.33", kube.AnnotationK3sInternalIP: "10.3.0.1"})
	nm = aCh.wait(t, "b and k in a's netmap", func(nm api.NetMap) bool { return peerNames(nm) == "b,k" })
	for _, name := range []string{"b", "k"} {
		p, _ := peer(nm, name)
		if got, want := prefixList(p.AllowedIPs), nodeCIDRs(getNode(t, admin, name)); got != want {
			t.Errorf("a's peer %s allows %s, its Node has %s", name, got, want)
		}
	}
	if p, _ := peer(nm, "k"); p.Endpoint.String() != "198.51.100.33:51820" {
		t.Errorf("a reaches k at %v, want the address of its k3s.io/external-ip annotation", p.Endpoint)
	}
	bCh.wait(t, "a and k in b's netmap", func(nm api.NetMap) bool { return peerNames(nm) == "a,k" && len(nm.Self.PodCIDRs) == 1 })
	kCh.wait(t, "a and b in k's netmap", func(nm api.NetMap) bool { return peerNames(nm) == "a,b" })

	// Status on the Nodes: key, endpoints, NetworkUnavailable=False.
	eventually(t, "the Trellis annotations and condition on every Node", func() bool {
		for _, name := range []string{"a", "b", "k"} {
			n := getNode(t, admin, name)
			c, ok := networkCondition(n)
			if !ok || c.Status != corev1.ConditionFalse || c.Reason != kube.ConditionReasonUp || n.Annotations[kube.AnnotationPublicKey] == "" {
				return false
			}
		}
		return true
	})
	na := getNode(t, admin, "a")
	if got := na.Annotations[kube.AnnotationPublicKey]; got != key(1).String() {
		t.Errorf("a's public-key annotation %q, want %q", got, key(1).String())
	}
	if got := na.Annotations[kube.AnnotationEndpoints]; got != "203.0.113.1:51820" {
		t.Errorf("a's endpoints annotation %q, want 203.0.113.1:51820", got)
	}
	if got := getNode(t, admin, "k").Annotations[kube.AnnotationEndpoints]; got != "198.51.100.33:51820" {
		t.Errorf("k's endpoints annotation %q, want its k3s.io/external-ip", got)
	}

	// Settled: reports, reconnects and handshakes write nothing to Nodes.
	time.Sleep(time.Second)
	settled, stats := writes.total(), ts.kube.Load().Stats()
	t.Logf("measured: Node writes until settled, 3 Nodes: %d (%s); Trellis: %d Node patches, %d status patches", settled, writes, stats.NodePatches, stats.StatusPatches)
	for i := range 5 {
		ts.report(t, a, api.Report{
			InternalIPs:  []netip.Addr{netip.MustParseAddr("10.1.0.1")},
			ExternalIPs:  []netip.Addr{netip.MustParseAddr("203.0.113.1")},
			Observations: []api.Observation{{Peer: "b", Handshake: api.HandshakeOK, Endpoint: netip.MustParseAddrPort(fmt.Sprintf("203.0.113.2:%d", 51820+i))}},
		})
	}
	bCh2 := ts.follow(t, b) // a reconnect
	bCh2.now(t)
	time.Sleep(2 * time.Second)
	if n := writes.total(); n != settled || ts.kube.Load().Stats() != stats {
		t.Fatalf("Node writes went on after the cluster settled: %d → %d (%s), Trellis %+v → %+v", settled, n, writes, stats, ts.kube.Load().Stats())
	}

	// kubectl delete node b: b leaves every netmap at once, keeps its
	// record, and its claim is released after the record lost its CIDR.
	bCIDR := nodeCIDRs(getNode(t, admin, "b"))
	start = time.Now()
	if err := admin.CoreV1().Nodes().Delete(ctx, "b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	aCh.wait(t, "b gone from a's netmap", func(nm api.NetMap) bool { return peerNames(nm) == "k" })
	tookDel := time.Since(start)
	kCh.wait(t, "b gone from k's netmap", func(nm api.NetMap) bool { return peerNames(nm) == "a" })
	t.Logf("measured: kubectl delete node → peer gone from the other nodes' netmap streams: %v (k: %v)", tookDel.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	if tookDel > 5*time.Second {
		t.Errorf("deleting a Node took %v to reach the netmaps; the goal is < 1 s", tookDel)
	}
	nm = bCh.wait(t, "b's own netmap without pod CIDR", func(nm api.NetMap) bool { return len(nm.Self.PodCIDRs) == 0 })
	if len(nm.Peers) != 0 {
		t.Errorf("b's Node is deleted but b has peers %q", peerNames(nm))
	}
	rec, _, err := ts.reg.get(ctx, "b")
	if err != nil || len(rec.PodCIDRs) != 0 {
		t.Fatalf("b's record after its Node was deleted: %+v, %v; want it kept without pod CIDRs", rec, err)
	}
	eventually(t, "b's claim released", func() bool {
		kvs, _, err := ts.store.List(ctx, prefixClaims)
		if err != nil {
			return false
		}
		for _, kv := range kvs {
			if strings.Contains(string(kv.Value), `"node":"b"`) {
				return false
			}
		}
		return true
	})

	// b's kubelet registers the Node again: b is back, no manual step.
	start = time.Now()
	env.RegisterNode(t, "b", nil)
	nm = aCh.wait(t, "b back in a's netmap", func(nm api.NetMap) bool { return peerNames(nm) == "b,k" })
	p, _ := peer(nm, "b")
	t.Logf("measured: Node registered again → back in the other netmaps: %v (pod CIDR %s, before %s)", time.Since(start).Round(time.Millisecond), prefixList(p.AllowedIPs), bCIDR)
	if got, want := prefixList(p.AllowedIPs), nodeCIDRs(getNode(t, admin, "b")); got != want {
		t.Fatalf("b back with %s, its new Node has %s", got, want)
	}
	eventually(t, "b's new Node up", func() bool {
		c, ok := networkCondition(getNode(t, admin, "b"))
		return ok && c.Status == corev1.ConditionFalse
	})

	// A node without a netmap stream (not Ready) gets its CIDR but not
	// NetworkUnavailable=False until its stream opens.
	c := mustJoin(t, ts, joinReq("c", 4, pwA))
	env.RegisterNode(t, "c", nil)
	aCh.wait(t, "c in a's netmap", func(nm api.NetMap) bool { return peerNames(nm) == "b,c,k" })
	time.Sleep(500 * time.Millisecond)
	if _, ok := networkCondition(getNode(t, admin, "c")); ok {
		t.Fatal("c has no netmap stream but its Node says the network is up")
	}
	ts.follow(t, c)
	eventually(t, "c up once its stream is open", func() bool {
		c, ok := networkCondition(getNode(t, admin, "c"))
		return ok && c.Status == corev1.ConditionFalse
	})
	for name, mib := range env.RSS() {
		t.Logf("measured: RSS %s %.0f MiB", name, mib)
	}
}

// TestKubeTrellisAllocatesAndRefuses: without a node IPAM, Trellis writes
// its own allocation into spec.podCIDRs; a Node with a pod CIDR outside
// --cluster-cidr, or with another node's, is refused with an Event and
// NetworkUnavailable=True, and the rest of the mesh is untouched; the
// overlap clears once the other node's Node is gone.
func TestKubeTrellisAllocatesAndRefuses(t *testing.T) {
	env := kubetest.Start(t, kubetest.Options{})
	admin := env.Admin(t)
	ts := startKubeServer(t, env, "", nil)
	ctx := context.Background()

	a := mustJoin(t, ts, joinReq("a", 1, pwA))
	b := mustJoin(t, ts, joinReq("b", 2, pwA))
	aCh := ts.follow(t, a)
	ts.follow(t, b)
	start := time.Now()
	env.RegisterNode(t, "a", nil)
	env.RegisterNode(t, "b", nil)
	nm := aCh.wait(t, "a with its CIDR and b", func(nm api.NetMap) bool { return len(nm.Self.PodCIDRs) == 1 && peerNames(nm) == "b" })
	t.Logf("measured: Node registered, nothing allocating → Trellis's CIDR in the netmaps: %v (grace 500 ms)", time.Since(start).Round(time.Millisecond))
	na, nb := getNode(t, admin, "a"), getNode(t, admin, "b")
	if got := prefixList(nm.Self.PodCIDRs); got != nodeCIDRs(na) || na.Spec.PodCIDR != got {
		t.Fatalf("a's pod CIDRs %s; its Node: podCIDR %s podCIDRs %s", got, na.Spec.PodCIDR, nodeCIDRs(na))
	}
	if p, _ := peer(nm, "b"); prefixList(p.AllowedIPs) != nodeCIDRs(nb) || nodeCIDRs(na) == nodeCIDRs(nb) {
		t.Fatalf("b allows %v, its Node has %s (a's %s)", p.AllowedIPs, nodeCIDRs(nb), nodeCIDRs(na))
	}
	eventually(t, "a and b up", func() bool {
		ca, oka := networkCondition(getNode(t, admin, "a"))
		cb, okb := networkCondition(getNode(t, admin, "b"))
		return oka && okb && ca.Status == corev1.ConditionFalse && cb.Status == corev1.ConditionFalse
	})

	// A Node whose pod CIDR comes from another range (a
	// kube-controller-manager with another --cluster-cidr).
	f := mustJoin(t, ts, joinReq("f", 6, pwA))
	fCh := ts.follow(t, f)
	env.RegisterNode(t, "f", nil)
	if _, err := admin.CoreV1().Nodes().Patch(ctx, "f", types.MergePatchType, []byte(`{"spec":{"podCIDR":"10.244.1.0/24","podCIDRs":["10.244.1.0/24"]}}`), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "f refused with an Event and NetworkUnavailable=True", func() bool {
		c, ok := networkCondition(getNode(t, admin, "f"))
		return ok && c.Status == corev1.ConditionTrue && c.Reason == kube.ConditionReasonRefused && len(refusalEvents(t, admin, "f")) > 0
	})
	if v := gauge(t, ts, "trellis_server_kube_refused_nodes"); v != 1 {
		t.Errorf("trellis_server_kube_refused_nodes = %v, want 1", v)
	}
	msg := refusalEvents(t, admin, "f")[0]
	if !strings.Contains(msg, "10.244.1.0/24") || !strings.Contains(msg, "kube-controller-manager --cluster-cidr must equal trellis server --cluster-cidr=10.42.0.0/16") {
		t.Fatalf("refusal Event says %q; want the CIDR and what to fix", msg)
	}
	t.Logf("Event on f: %s", msg)
	if !env.HasKubectl() {
		t.Log("kubectl is not built: what kubectl describe node shows is not checked")
	} else if out, err := env.Kubectl(t, "describe", "node", "f"); err != nil {
		t.Errorf("kubectl describe node f: %v\n%s", err, out)
	} else {
		if !strings.Contains(out, kube.EventReasonRefused) || !strings.Contains(out, kube.ConditionReasonRefused) {
			t.Errorf("kubectl describe node f shows neither the Event nor the condition:\n%s", out)
		}
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "NetworkUnavailable") || strings.Contains(l, kube.EventReasonRefused) || strings.Contains(l, "trellis-mesh.io/") {
				t.Logf("kubectl describe node f: %s", strings.TrimSpace(l))
			}
		}
	}
	time.Sleep(time.Second) // let anything that would change a's netmap happen
	if nm := fCh.now(t); len(nm.Self.PodCIDRs) != 0 || len(nm.Peers) != 0 {
		t.Fatalf("refused f has pod CIDRs %v and peers %q", nm.Self.PodCIDRs, peerNames(nm))
	}
	if recs, _, _ := ts.reg.list(ctx); len(recs) != 3 {
		t.Fatalf("%d records, want a, b and f", len(recs))
	}
	for _, r := range []string{"a", "b"} {
		rec, _, _ := ts.reg.get(ctx, r)
		if len(rec.PodCIDRs) != 1 {
			t.Fatalf("%s lost its pod CIDR over f's refusal: %+v", r, rec.PodCIDRs)
		}
	}

	// A Node given a's pod CIDR: refused for overlapping, until a's Node
	// is deleted (then a's CIDR is released after a left the netmaps).
	o := mustJoin(t, ts, joinReq("o", 7, pwA))
	oCh := ts.follow(t, o)
	env.RegisterNode(t, "o", nil)
	patch := fmt.Sprintf(`{"spec":{"podCIDR":%q,"podCIDRs":[%q]}}`, na.Spec.PodCIDR, na.Spec.PodCIDR)
	if _, err := admin.CoreV1().Nodes().Patch(ctx, "o", types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "o refused for overlapping a", func() bool {
		evs := refusalEvents(t, admin, "o")
		return len(evs) > 0 && strings.Contains(evs[0], "also the pod CIDR of node a")
	})
	if _, ok := peer(aCh.now(t), "o"); ok {
		t.Fatal("o, refused, is in a's netmap")
	}
	bCh := ts.follow(t, b)
	bCh.wait(t, "b sees a", func(nm api.NetMap) bool { return peerNames(nm) == "a" })
	if err := admin.CoreV1().Nodes().Delete(ctx, "a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	nm = bCh.wait(t, "o in b's netmap with a's old CIDR", func(nm api.NetMap) bool { return peerNames(nm) == "o" })
	if p, _ := peer(nm, "o"); prefixList(p.AllowedIPs) != na.Spec.PodCIDR {
		t.Fatalf("o allows %v, want %s", p.AllowedIPs, na.Spec.PodCIDR)
	}
	oCh.wait(t, "o in the mesh", func(nm api.NetMap) bool { return prefixList(nm.Self.PodCIDRs) == na.Spec.PodCIDR })
	eventually(t, "o up", func() bool {
		c, ok := networkCondition(getNode(t, admin, "o"))
		return ok && c.Status == corev1.ConditionFalse
	})

	// trellis node delete b: the Node no longer says the network is up,
	// and loses Trellis's annotations; b joins again and is back.
	hr, _ := http.NewRequest(http.MethodDelete, ts.URL()+api.PathNodes+"/b", nil)
	resp, err := ts.adminClient(t).Do(hr)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("trellis node delete b: %v %v", resp, err)
	}
	resp.Body.Close()
	eventually(t, "b's Node marked out of the mesh", func() bool {
		n := getNode(t, admin, "b")
		c, ok := networkCondition(n)
		return ok && c.Status == corev1.ConditionTrue && c.Reason == kube.ConditionReasonRemoved && n.Annotations[kube.AnnotationPublicKey] == ""
	})
	b = mustJoin(t, ts, joinReq("b", 2, pwA))
	ts.follow(t, b).wait(t, "b back with its Node's CIDR", func(nm api.NetMap) bool { return prefixList(nm.Self.PodCIDRs) == nodeCIDRs(nb) })
	eventually(t, "b up again", func() bool {
		c, ok := networkCondition(getNode(t, admin, "b"))
		return ok && c.Status == corev1.ConditionFalse
	})
}

// TestKubeDualStack: both families from a dual-stack node IPAM, and the
// endpoints annotation with both.
func TestKubeDualStack(t *testing.T) {
	dual := []netip.Prefix{netip.MustParsePrefix("10.42.0.0/16"), netip.MustParsePrefix("fd00:42::/56")}
	env := kubetest.Start(t, kubetest.Options{NodeIPAM: dual})
	admin := env.Admin(t)
	ts := startKubeServer(t, env, "", func(c *Config) { c.ClusterCIDRs, c.Kube.AllocateGrace = dual, 10*time.Minute })
	req := func(name string, k byte) api.JoinRequest {
		r := joinReq(name, k, pwA)
		r.ExternalIPs = append(r.ExternalIPs, netip.MustParseAddr(fmt.Sprintf("2001:db8::%d", k)))
		return r
	}
	a, b := mustJoin(t, ts, req("a", 1)), mustJoin(t, ts, req("b", 2))
	aCh := ts.follow(t, a)
	ts.follow(t, b)
	env.RegisterNode(t, "a", nil)
	env.RegisterNode(t, "b", nil)
	nm := aCh.wait(t, "both families", func(nm api.NetMap) bool { return len(nm.Self.PodCIDRs) == 2 && peerNames(nm) == "b" })
	if got, want := prefixList(nm.Self.PodCIDRs), nodeCIDRs(getNode(t, admin, "a")); got != want {
		t.Fatalf("a's pod CIDRs %s, its Node's %s", got, want)
	}
	if p, _ := peer(nm, "b"); prefixList(p.AllowedIPs) != nodeCIDRs(getNode(t, admin, "b")) {
		t.Fatalf("b allows %v, its Node has %s", p.AllowedIPs, nodeCIDRs(getNode(t, admin, "b")))
	}
	eventually(t, "a's endpoints of both families", func() bool {
		return getNode(t, admin, "a").Annotations[kube.AnnotationEndpoints] == "203.0.113.1:51820,[2001:db8::1]:51820"
	})
}

// TestKubeRBAC: the Trellis server works with a service account token
// bound to exactly the ClusterRole of deploy/kubernetes/rbac.yaml; one
// missing a permission is refused at start with a sentence naming it,
// and a permission taken away later is named in the log.
func TestKubeRBAC(t *testing.T) {
	env := kubetest.Start(t, kubetest.Options{})
	admin := env.Admin(t)
	ctx := context.Background()
	role, binding := applyRBAC(t, admin, "../../deploy/kubernetes/rbac.yaml")
	sa := binding.Subjects[0]
	kubeconfig := env.ServiceAccountKubeconfig(t, sa.Namespace, sa.Name)

	var logs syncBuffer
	ts := startKubeServer(t, env, kubeconfig, func(c *Config) {
		c.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	a := mustJoin(t, ts, joinReq("a", 1, pwA))
	ts.follow(t, a)
	env.RegisterNode(t, "a", nil)
	f := mustJoin(t, ts, joinReq("f", 2, pwA))
	ts.follow(t, f)
	env.RegisterNode(t, "f", nil)
	if _, err := admin.CoreV1().Nodes().Patch(ctx, "f", types.MergePatchType, []byte(`{"spec":{"podCIDR":"10.244.1.0/24","podCIDRs":["10.244.1.0/24"]}}`), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	// Every verb of the role: a watch, a pod CIDR and annotations
	// written (patch nodes), the condition (patch nodes/status), an Event.
	eventually(t, "a up and f refused, with the service account's rights", func() bool {
		na, nf := getNode(t, admin, "a"), getNode(t, admin, "f")
		ca, oka := networkCondition(na)
		cf, okf := networkCondition(nf)
		return len(na.Spec.PodCIDRs) == 1 && na.Annotations[kube.AnnotationPublicKey] != "" && oka && ca.Status == corev1.ConditionFalse &&
			okf && cf.Status == corev1.ConditionTrue && len(refusalEvents(t, admin, "f")) > 0
	})

	// Without patch on nodes/status: refused at start, saying what.
	narrow := role.DeepCopy()
	narrow.Name, narrow.ResourceVersion = "trellis-narrow", ""
	narrow.Rules = slices.DeleteFunc(narrow.Rules, func(r rbacv1.PolicyRule) bool { return slices.Contains(r.Resources, "nodes/status") })
	if _, err := admin.RbacV1().ClusterRoles().Create(ctx, narrow, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	nb := binding.DeepCopy()
	nb.Name, nb.ResourceVersion, nb.RoleRef.Name = "trellis-narrow", "", "trellis-narrow"
	nb.Subjects[0].Name = "trellis-narrow"
	if _, err := admin.RbacV1().ClusterRoleBindings().Create(ctx, nb, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	narrowConfig := env.ServiceAccountKubeconfig(t, sa.Namespace, "trellis-narrow")
	_, err := Start(ctx, Config{DataDir: t.TempDir(), NodeName: "srv2", Listener: mustListen(t), Logger: slog.New(slog.DiscardHandler),
		Kube: &kube.Config{Kubeconfig: narrowConfig}})
	if err == nil || !strings.Contains(err.Error(), "patch nodes/status") || !strings.Contains(err.Error(), "deploy/kubernetes/rbac.yaml") || !strings.Contains(err.Error(), "trellis-narrow") {
		t.Fatalf("start without patch on nodes/status: %v; want a sentence naming the permission, the user and the fix", err)
	}
	t.Logf("refused: %v", err)
	// Credentials the API server does not take: refused too, not taken
	// for an API server that is down.
	_, err = Start(ctx, Config{DataDir: t.TempDir(), NodeName: "srv3", Listener: mustListen(t), Logger: slog.New(slog.DiscardHandler),
		Kube: &kube.Config{Kubeconfig: env.TokenKubeconfig("bogus", "not-a-token")}})
	if err == nil || !strings.Contains(err.Error(), "Unauthorized") {
		t.Fatalf("start with a token the API server refuses: %v", err)
	}
	t.Logf("refused: %v", err)

	// The binding of the running server goes away: the next write says
	// what is missing.
	if err := admin.RbacV1().ClusterRoleBindings().Delete(ctx, binding.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	mustJoin(t, ts, joinReq("late", 3, pwA))
	env.RegisterNode(t, "late", nil)
	eventually(t, "a log line naming the denied permission", func() bool {
		s := logs.String()
		return strings.Contains(s, "Kubernetes does not allow user system:serviceaccount:"+sa.Namespace+":"+sa.Name) && strings.Contains(s, "deploy/kubernetes/rbac.yaml")
	})
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, "does not allow") {
			t.Logf("logged: %s", l)
			break
		}
	}
}

// syncBuffer is a bytes.Buffer for a logger and a reader in other
// goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// applyRBAC creates the ServiceAccount, ClusterRole and
// ClusterRoleBinding of a manifest file and returns the role and the
// binding as created.
func applyRBAC(t *testing.T, c kubernetes.Interface, path string) (*rbacv1.ClusterRole, *rbacv1.ClusterRoleBinding) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var role *rbacv1.ClusterRole
	var binding *rbacv1.ClusterRoleBinding
	for _, doc := range strings.Split(string(b), "\n---\n") {
		var meta metav1.TypeMeta
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		switch meta.Kind {
		case "ServiceAccount":
			var sa corev1.ServiceAccount
			must(t, yaml.UnmarshalStrict([]byte(doc), &sa))
			_, err = c.CoreV1().ServiceAccounts(sa.Namespace).Create(ctx, &sa, metav1.CreateOptions{})
		case "ClusterRole":
			role = &rbacv1.ClusterRole{}
			must(t, yaml.UnmarshalStrict([]byte(doc), role))
			role, err = c.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{})
		case "ClusterRoleBinding":
			binding = &rbacv1.ClusterRoleBinding{}
			must(t, yaml.UnmarshalStrict([]byte(doc), binding))
			binding, err = c.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{})
		default:
			t.Fatalf("%s: unexpected kind %q", path, meta.Kind)
		}
		if err != nil {
			t.Fatalf("%s: create %s: %v", path, meta.Kind, err)
		}
	}
	if role == nil || binding == nil || len(binding.Subjects) != 1 || binding.RoleRef.Name != role.Name {
		t.Fatalf("%s: want one ClusterRole and one ClusterRoleBinding of it to one subject", path)
	}
	return role, binding
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func mustListen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// TestKubePodCIDRsDoNotWaitForNodeWrites: a Node's pod CIDRs reach the
// netmaps without waiting for the Node writes (annotations, condition) of
// the Nodes queued before it, which go at the controller's QPS: with
// many Nodes at once (a new cluster, a thousand kubelets registering),
// the last one's pods had waited for every earlier Node's writes. Here
// the QPS is 2, so the writes of 12 Nodes take seconds, and every pod
// CIDR must be in the netmaps while most Nodes still lack their
// annotations.
func TestKubePodCIDRsDoNotWaitForNodeWrites(t *testing.T) {
	env := kubetest.Start(t, kubetest.Options{})
	admin := env.Admin(t)
	ts := startKubeServer(t, env, "", func(c *Config) { c.Kube.QPS = 2 })
	ctx := context.Background()
	const n = 12
	var first *follower
	for i := range n {
		name := fmt.Sprintf("n%02d", i)
		j := mustJoin(t, ts, joinReq(name, byte(i+1), pwA))
		if i == 0 {
			first = ts.follow(t, j)
		}
	}
	first.now(t)
	for i := range n {
		cidr := fmt.Sprintf("10.42.%d.0/24", i)
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("n%02d", i)}, Spec: corev1.NodeSpec{PodCIDR: cidr, PodCIDRs: []string{cidr}}}
		if _, err := admin.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	// (A node is a peer once it has a pod CIDR.)
	nm := first.wait(t, "every Node's pod CIDR in n00's netmap", func(nm api.NetMap) bool {
		return len(nm.Self.PodCIDRs) == 1 && len(nm.Peers) == n-1
	})
	took := time.Since(start)
	annotated := func() int {
		list, err := admin.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		k := 0
		for _, node := range list.Items {
			if node.Annotations[kube.AnnotationPublicKey] != "" {
				k++
			}
		}
		return k
	}
	if k := annotated(); k > n/2 {
		t.Errorf("when the last pod CIDR reached the netmaps (%v, peers %s), %d of %d Nodes had their annotations already: the pod CIDRs waited for the Node writes", took.Round(time.Millisecond), peerNames(nm), k, n)
	}
	t.Logf("measured: %d Nodes, controller QPS 2: every pod CIDR in the netmaps %v after the Nodes were created", n, took.Round(time.Millisecond))
	eventually(t, "every Node annotated (at 2 requests a second)", func() bool { return annotated() == n })
}
