package kubetest

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("k8s.io/klog/v2.(*flushDaemon).run.func1"))
}

// TestVersionMatchesBuildScript: the harness looks for the binaries where
// scripts/build-kube.sh puts them, named by the version it builds.
func TestVersionMatchesBuildScript(t *testing.T) {
	_, file, _, _ := runtime.Caller(0)
	b, err := os.ReadFile(filepath.Join(filepath.Dir(file), "..", "..", "..", "e2e", "kube", "tools", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(strings.TrimPrefix(strings.TrimSpace(l), "require "))
		if len(f) >= 2 && f[0] == "k8s.io/kubernetes" {
			if f[1] != Version {
				t.Fatalf("e2e/kube/tools builds k8s.io/kubernetes %s, the harness looks for %s", f[1], Version)
			}
			return
		}
	}
	t.Fatal("no k8s.io/kubernetes in e2e/kube/tools/go.mod")
}

// TestControlPlane: the node IPAM allocates a registered Node's pod CIDR,
// and a node's credentials reach only its own Node (NodeRestriction), as
// a kubelet's do.
func TestControlPlane(t *testing.T) {
	env := Start(t, Options{NodeIPAM: []netip.Prefix{netip.MustParsePrefix("10.42.0.0/16")}})
	t.Logf("control plane ready in %v", env.StartedIn.Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	env.RegisterNode(t, "n1", map[string]string{"k3s.io/external-ip": "203.0.113.1"})
	env.RegisterNode(t, "n2", nil)
	admin := env.Admin(t)
	deadline := time.Now().Add(30 * time.Second)
	for {
		n, err := admin.CoreV1().Nodes().Get(ctx, "n1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(n.Spec.PodCIDRs) == 1 && strings.HasPrefix(n.Spec.PodCIDRs[0], "10.42.") && strings.HasSuffix(n.Spec.PodCIDRs[0], "/24") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node IPAM gave n1 no pod CIDR: %+v", n.Spec)
		}
		time.Sleep(50 * time.Millisecond)
	}
	n1 := env.NodeClient(t, "n1")
	if _, err := n1.CoreV1().Nodes().Patch(ctx, "n2", types.MergePatchType, []byte(`{"metadata":{"annotations":{"x":"y"}}}`), metav1.PatchOptions{}); !apierrors.IsForbidden(err) {
		t.Fatalf("n1 patching n2's Node: %v, want forbidden", err)
	}
	if err := n1.CoreV1().Nodes().Delete(ctx, "n2", metav1.DeleteOptions{}); !apierrors.IsForbidden(err) {
		t.Fatalf("n1 deleting n2's Node: %v, want forbidden", err)
	}
	if _, err := n1.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n3"}}, metav1.CreateOptions{}); !apierrors.IsForbidden(err) {
		t.Fatalf("n1 creating another Node: %v, want forbidden", err)
	}
	if !env.HasKubectl() {
		t.Log("kubectl is not built: not run")
	} else if out, err := env.Kubectl(t, "get", "nodes", "-o", "name"); err != nil || !strings.Contains(out, "node/n2") {
		t.Fatalf("kubectl get nodes: %v\n%s", err, out)
	}
	// The API server stops and comes back on the same port and data.
	env.StopAPIServer()
	env.StartAPIServer()
	if _, err := admin.CoreV1().Nodes().Get(ctx, "n2", metav1.GetOptions{}); err != nil {
		t.Fatalf("after a restart of the API server: %v", err)
	}
	for name, mib := range env.RSS() {
		t.Logf("RSS %s: %.0f MiB", name, mib)
	}
}
