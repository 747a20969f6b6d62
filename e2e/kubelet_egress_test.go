//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/kube"
	"github.com/trellis-mesh/trellis/internal/kube/kubetest"
	"github.com/trellis-mesh/trellis/internal/server"
)

// TestKubeletThroughEgress is TestRealKubelet's node behind NAT, with
// Trellis: kube-apiserver runs with the egress selector that `trellis
// egress-config` writes, a Trellis server next to it and a Trellis agent
// on the home node, whose real kubelet (containerd, busybox pod, the CNI
// config the agent writes) has no inbound port. kubectl logs, exec and
// port-forward work through the node's tunnel, TLS end to end between
// kube-apiserver and the kubelet; with the agent stopped, the error names
// the node and why.
func TestKubeletThroughEgress(t *testing.T) {
	lab := NewLab(t)
	RequireRuntime(t)
	kubetest.Require(t, "etcdembed", "kube-apiserver", "kubectl")
	busybox := BusyboxImage(t)
	c := newCluster(t, lab)
	cp := lab.Cloud("cp", "198.51.100.10/24", "10.1.0.10/24")
	home := lab.Home("home", "203.0.113.50/24", "10.9.0.10/24")

	// The Trellis server's data dir is known before either starts: the
	// egress config names its socket.
	srv := c.newMember(cp, api.RoleServer)
	egressConf := filepath.Join(lab.TempDir("egress"), "egress-selector.yaml")
	if _, err := server.WriteEgressConfig(server.EgressConfig{DataDir: srv.dataDir, Output: egressConf}); err != nil {
		t.Fatal(err)
	}
	env := kubetest.Start(t, kubetest.Options{
		NetNS:         cp.NS,
		Address:       cp.PublicIP,
		Kubelets:      true,
		APIServerArgs: []string{"--egress-selector-config-file=" + egressConf},
	})
	t.Logf("measured: control plane ready in %v", env.StartedIn.Round(time.Millisecond))
	// Kubernetes mode: the home node's pod CIDR comes from its Node
	// (nothing allocates here: Trellis writes its own into the Node).
	c.start(srv, withFlags("--kubeconfig", env.AdminKubeconfig))
	agent := c.startAgent(home)
	c.waitNodes(srv, agent)
	// The server's own node registers a Node as a kubelet would (one real
	// kubelet per machine: this one is a stand-in), so that it gets a pod
	// CIDR and a pod in the other cloud to reach.
	env.RegisterNode(t, "cp", nil)
	c.attachPod(srv)

	cd := home.StartContainerd(t, ContainerdOptions{CNIConfDir: agent.cniDir, Images: []Image{busybox}})
	k := cd.StartKubelet(t, env, KubeletOptions{Name: "home"})
	d := k.WaitReady(t, 3*time.Minute)
	t.Logf("measured: kubelet on home (behind NAT): start → Node Ready in %v (the CNI config is Trellis's)", d.Round(time.Millisecond))

	const script = `echo "hello from $(hostname)"; mkdir -p /www; echo "served by $(hostname)" > /www/index.html; exec httpd -f -p 8080 -h /www`
	p, took := RunPod(t, env.Admin(t), BusyboxPod("echo-home", k.Name, busybox, script, 8080), 2*time.Minute)
	t.Logf("measured: pod echo-home: create → Running in %v (pod IP %s, in Trellis's pod CIDR)", took.Round(time.Millisecond), p.Status.PodIP)
	nodes, err := c.nodes()
	if err != nil {
		t.Fatal(err)
	}
	podIP := netip.MustParseAddr(p.Status.PodIP)
	if cidrs := nodes["home"].PodCIDRs; len(cidrs) == 0 || !cidrs[0].Contains(podIP) {
		t.Fatalf("pod IP %s is not in home's Trellis pod CIDR %v", podIP, cidrs)
	}
	// The Node as Trellis left it: its pod CIDR is Trellis's, the
	// annotations, and NetworkUnavailable=False.
	kn, err := env.Admin(t).CoreV1().Nodes().Get(context.Background(), "home", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if want := nodes["home"].PodCIDRs[0].String(); kn.Spec.PodCIDR != want {
		t.Errorf("Node home's spec.podCIDR %q, want Trellis's %s", kn.Spec.PodCIDR, want)
	}
	if kn.Annotations[kube.AnnotationPublicKey] != nodes["home"].PublicKey.String() {
		t.Errorf("Node home's annotations %v lack its WireGuard key %s", kn.Annotations, nodes["home"].PublicKey)
	}
	up := false
	for _, cond := range kn.Status.Conditions {
		up = up || cond.Type == corev1.NodeNetworkUnavailable && cond.Status == corev1.ConditionFalse && cond.Reason == kube.ConditionReasonUp
	}
	if !up {
		t.Errorf("Node home has no NetworkUnavailable=False (%s): %+v", kube.ConditionReasonUp, kn.Status.Conditions)
	}

	// The real pod reaches a pod in the other cloud over the mesh, and back.
	if out, err := env.Kubectl(t, "exec", "echo-home", "--", "ping", "-c", "3", "-W", "3", srv.pod.IP.String()); err != nil {
		t.Errorf("from the real pod on home, ping the pod on cp (%s): %v\n%s", srv.pod.IP, err, out)
	}
	if err := Poll(meshTimeout, func() error { return srv.pod.Ping(podIP) }); err != nil {
		t.Errorf("from the pod on cp, ping the real pod on home: %v", err)
	}

	t0 := time.Now()
	out, err := env.Kubectl(t, "logs", "echo-home")
	if err != nil || !strings.Contains(out, "hello from echo-home") {
		t.Fatalf("kubectl logs through the egress: %v\n%s", err, out)
	}
	t.Logf("measured: kubectl logs echo-home through the Trellis egress: %v: %s", time.Since(t0).Round(time.Millisecond), strings.TrimSpace(out))
	t0 = time.Now()
	out, err = env.Kubectl(t, "exec", "echo-home", "--", "cat", "/www/index.html")
	if err != nil || !strings.Contains(out, "served by echo-home") {
		t.Fatalf("kubectl exec through the egress: %v\n%s", err, out)
	}
	t.Logf("measured: kubectl exec echo-home through the Trellis egress: %v", time.Since(t0).Round(time.Millisecond))
	t0 = time.Now()
	body, err := portForwardGet(t, env, "echo-home", 8080)
	if err != nil || !strings.Contains(body, "served by echo-home") {
		t.Fatalf("kubectl port-forward through the egress: %v\n%s", err, body)
	}
	t.Logf("measured: kubectl port-forward echo-home 8080 through the Trellis egress, GET /: %v", time.Since(t0).Round(time.Millisecond))

	// 50 execs at once, each its own CONNECT and stream.
	t0 = time.Now()
	var wg sync.WaitGroup
	errs := make(chan string, 50)
	for i := range 50 {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			out, err := env.KubectlCommand(ctx, "--request-timeout=150s", "exec", "echo-home", "--", "echo", fmt.Sprintf("ok %d", i)).CombinedOutput()
			if err != nil || !strings.Contains(string(out), fmt.Sprintf("ok %d", i)) {
				errs <- fmt.Sprintf("exec %d: %v: %s", i, err, strings.TrimSpace(string(out)))
			}
		})
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	t.Logf("measured: 50 concurrent kubectl exec … -- echo ok through the Trellis egress: all done in %v", time.Since(t0).Round(time.Millisecond))

	// The agent down: the error kubectl prints names the node and why.
	if err := agent.proc.Stop(); err != nil {
		t.Fatal(err)
	}
	WaitFor(t, 60*time.Second, "kubectl logs to fail naming home and its tunnel", func() error {
		out, err := env.Kubectl(t, "--request-timeout=30s", "logs", "echo-home")
		if err == nil {
			return fmt.Errorf("kubectl logs still works: %s", out)
		}
		if !strings.Contains(out, "node home is not reachable through Trellis") || !strings.Contains(out, "tunnel") {
			return fmt.Errorf("%s", strings.TrimSpace(out))
		}
		t.Logf("with home's agent stopped, kubectl logs says: %s", strings.TrimSpace(out))
		return nil
	})
}
