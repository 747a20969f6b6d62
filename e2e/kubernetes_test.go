//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/trellis-mesh/trellis/internal/kube/kubetest"
)

// TestKubernetesMulticloud is Trellis as the network of a Kubernetes
// cluster across clouds: a control plane (kube-apiserver, node IPAM) in
// one cloud with a Trellis server in Kubernetes mode next to it, using a
// service account bound to exactly the ClusterRole of
// deploy/kubernetes/rbac.yaml; agents in a second cloud, in an AWS-style
// cloud behind a 1:1 NAT and in a home behind NAT. Each node registers its
// Node with node credentials, as a kubelet does. Trellis's pod CIDRs are
// the Nodes' spec.podCIDRs, pods reach each other, `kubectl delete node`
// takes a node out of every WireGuard config (timed) and registering it
// again brings it back, and with kube-apiserver stopped for a minute pod
// traffic loses nothing.
func TestKubernetesMulticloud(t *testing.T) {
	lab := NewLab(t)
	kubetest.Require(t, "etcdembed", "kube-apiserver", "kube-controller-manager", "kubectl")
	c := newCluster(t, lab)
	cp := lab.Cloud("cp", "198.51.100.10/24", "10.1.0.10/24")
	c2 := lab.Cloud("cloud2", "203.0.113.20/24", "10.2.0.20/24")
	aws := lab.CloudNAT("aws", "192.0.2.30/24", "10.3.0.30/24")
	home := lab.Home("home", "198.18.0.50/24", "192.168.1.10/24")

	env := kubetest.Start(t, kubetest.Options{
		NetNS:    cp.NS,
		Address:  cp.PublicIP,
		NodeIPAM: []netip.Prefix{netip.MustParsePrefix(clusterCIDR)},
	})
	t.Logf("measured: control plane (with node IPAM) ready in %v", env.StartedIn.Round(time.Millisecond))
	rbac, err := filepath.Abs("../deploy/kubernetes/rbac.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := env.Kubectl(t, "apply", "-f", rbac); err != nil {
		t.Fatalf("kubectl apply -f %s: %v\n%s", rbac, err, out)
	}
	kubeconfig := env.ServiceAccountKubeconfig(t, "kube-system", "trellis")

	srv := c.startServer(cp, withFlags("--kubeconfig", kubeconfig))
	a2 := c.startAgent(c2)
	a3 := c.startAgent(aws, withAddressFlags("--node-ip", aws.LANIP.String(), "--node-external-ip", aws.NATIP.String()))
	a4 := c.startAgent(home)
	all := []*member{srv, a2, a3, a4}
	listed := c.waitNodes(all...)
	start := time.Now()
	for _, m := range all {
		env.RegisterNode(t, m.Name, nil)
	}
	// Each node's Trellis pod CIDR becomes its Node's, then pods attach.
	admin := env.Admin(t)
	WaitFor(t, joinTimeout, "every Trellis pod CIDR to equal its Node's spec.podCIDRs", func() error {
		nodes, err := c.nodes()
		if err != nil {
			return err
		}
		for _, m := range all {
			kn, err := admin.CoreV1().Nodes().Get(context.Background(), m.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			var got []string
			for _, p := range nodes[m.Name].PodCIDRs {
				got = append(got, p.String())
			}
			if len(kn.Spec.PodCIDRs) == 0 || !slices.Equal(got, kn.Spec.PodCIDRs) {
				return fmt.Errorf("%s: Trellis %v, Node %v", m.Name, got, kn.Spec.PodCIDRs)
			}
		}
		return nil
	})
	t.Logf("measured: Nodes registered → every Trellis pod CIDR is its Node's (node IPAM) in %v", time.Since(start).Round(time.Millisecond))
	for _, m := range all {
		c.attachPod(m)
	}
	c.checkPods("pods across clouds (one behind 1:1 NAT, one in a home)", all, all, meshTimeout)

	t.Run("kubectl-delete-node", func(t *testing.T) {
		key := listed[a2.Name].PublicKey.String() // waitNodes listed every member
		t0 := time.Now()
		if out, err := env.Kubectl(t, "delete", "node", a2.Name); err != nil {
			t.Fatalf("kubectl delete node: %v\n%s", err, out)
		}
		for _, m := range []*member{srv, a3, a4} {
			WaitFor(t, 10*time.Second, m.Name+" to drop cloud2's peer", func() error {
				dev, err := m.wgShow()
				if err != nil {
					return err
				}
				if _, ok := dev.Peer(key); ok {
					return fmt.Errorf("still a peer")
				}
				return nil
			})
			t.Logf("measured: kubectl delete node cloud2 → gone from %s's WireGuard config after %v", m.Name, time.Since(t0).Round(time.Millisecond))
		}
		// Out of the mesh, the node has no CNI config: its kubelet
		// reports the network not ready.
		conflist := filepath.Join(a2.cniDir, conflistName)
		WaitFor(t, 10*time.Second, "cloud2's CNI config removed with its pod CIDR", func() error {
			if _, err := os.Stat(conflist); err == nil {
				return fmt.Errorf("%s still exists", conflist)
			}
			return nil
		})
		// Its kubelet registers it again: back without manual steps,
		// with the pod CIDR node IPAM gives the new Node (its pods are
		// made again, as a kubelet does after registering).
		t0 = time.Now()
		env.RegisterNode(t, a2.Name, nil)
		c.attachPod(a2)
		c.checkPods("cloud2 registered again", []*member{srv, a3, a4}, []*member{a2}, joinTimeout)
		c.checkPods("cloud2 registered again", []*member{a2}, []*member{srv, a3, a4}, joinTimeout)
		t.Logf("measured: cloud2's Node registered again → pods reach it after %v", time.Since(t0).Round(time.Millisecond))
	})

	t.Run("api-server-down", func(t *testing.T) {
		down := time.Minute
		if d, err := time.ParseDuration(os.Getenv("TRELLIS_KUBE_DOWN")); err == nil {
			down = d
		}
		count := int(down/(200*time.Millisecond)) + 50
		// Probes between pods in three clouds while the API server is
		// down, and a little before and after.
		type probe struct {
			from, to *member
			out      chan string
		}
		var probes []probe
		for _, pair := range [][2]*member{{a4, a2}, {a3, a4}, {srv, a3}} {
			p := probe{pair[0], pair[1], make(chan string, 1)}
			probes = append(probes, p)
			go func() {
				// Longer than the lab's one-shot command limit.
				ctx, cancel := context.WithTimeout(context.Background(), down+3*time.Minute)
				defer cancel()
				out, _ := exec.CommandContext(ctx, "ip", "netns", "exec", p.from.pod.NS, "ping", "-n", "-q", "-i", "0.2", "-W", "1", "-c", strconv.Itoa(count), p.to.pod.IP.String()).CombinedOutput()
				p.out <- string(out)
			}()
		}
		time.Sleep(5 * time.Second)
		env.StopAPIServer()
		t.Logf("kube-apiserver stopped for %v", down)
		time.Sleep(down)
		env.StartAPIServer()
		loss := regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`)
		for _, p := range probes {
			out := <-p.out
			m := loss.FindStringSubmatch(out)
			if m == nil {
				t.Errorf("%s → %s: no ping statistics: %s", p.from.Name, p.to.Name, out)
				continue
			}
			sent, _ := strconv.Atoi(m[1])
			received, _ := strconv.Atoi(m[2])
			if sent != received {
				t.Errorf("%s → %s with the API server down: %d of %d probes lost", p.from.Name, p.to.Name, sent-received, sent)
			}
			t.Logf("measured: %s → %s pod probes with the API server down %v: %s sent, %s received", p.from.Name, p.to.Name, down, m[1], m[2])
		}
		// Nothing in the mesh changed while it was down.
		for _, m := range all {
			if err := m.proc.Err(); err != nil {
				t.Fatal(err)
			}
		}
		c.checkPods("after the API server came back", all, all, meshTimeout)
	})
}
