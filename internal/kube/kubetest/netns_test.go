package kubetest

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestControlPlaneInNetNS: with Options.NetNS and Address the control
// plane runs in a network namespace on that address, and the Env's
// clients and kubectl reach it from this process.
func TestControlPlaneInNetNS(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs ip (iproute2)")
	}
	Require(t, binEtcd, binAPIServer)
	ns := fmt.Sprintf("kubetest-%d", os.Getpid())
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	ip("netns", "add", ns)
	// Registered before Start, so it runs after the control plane has
	// stopped.
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	ip("-n", ns, "link", "set", "lo", "up")
	// A veth pair inside the namespace carries the address (no dummy
	// module needed).
	ip("-n", ns, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
	ip("-n", ns, "addr", "add", "192.0.2.10/24", "dev", "veth0")
	ip("-n", ns, "link", "set", "veth0", "up")
	ip("-n", ns, "link", "set", "veth1", "up")

	env := Start(t, Options{NetNS: ns, Address: netip.MustParseAddr("192.0.2.10")})
	if env.Server != "https://192.0.2.10:"+env.Server[strings.LastIndexByte(env.Server, ':')+1:] {
		t.Fatalf("Server = %s, want https://192.0.2.10:<port>", env.Server)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := env.Admin(t).CoreV1().Namespaces().Get(ctx, "default", metav1.GetOptions{}); err != nil {
		t.Fatalf("admin client through the namespace: %v", err)
	}
	env.RegisterNode(t, "n1", nil)
	if env.HasKubectl() {
		if out, err := env.Kubectl(t, "get", "nodes", "-o", "name"); err != nil || !strings.Contains(out, "node/n1") {
			t.Fatalf("kubectl in the namespace: %v\n%s", err, out)
		}
	}
}
