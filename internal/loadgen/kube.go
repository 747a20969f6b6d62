package loadgen

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/trellis-mesh/trellis/internal/kube"
)

// Nodes is the Kubernetes API as a run in Kubernetes mode uses it: a Node
// per virtual agent, made as a kubelet's registration and node IPAM would
// leave it, deleted as `kubectl delete node` does.
type Nodes interface {
	// Create creates Node name with spec.podCIDRs = [podCIDR].
	Create(ctx context.Context, name string, podCIDR netip.Prefix) error
	// Delete deletes Node name.
	Delete(ctx context.Context, name string) error
	// Synced counts the Nodes that carry Trellis's public-key annotation.
	Synced(ctx context.Context) (int, error)
}

// LoadgenLabel marks the Nodes a run created.
const LoadgenLabel = "trellis-mesh.io/loadgen"

// KubeNodes returns Nodes on the API server of kubeconfig, whose user may
// create, delete and list Nodes.
func KubeNodes(kubeconfig string) (Nodes, error) {
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", kubeconfig, err)
	}
	// A thousand creates should measure the API server, not client-go's
	// default limit of 5 requests per second.
	rc.QPS, rc.Burst = 500, 1000
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", kubeconfig, err)
	}
	return kubeNodes{cs}, nil
}

type kubeNodes struct{ cs kubernetes.Interface }

func (k kubeNodes) Create(ctx context.Context, name string, podCIDR netip.Prefix) error {
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{LoadgenLabel: "true"}},
		Spec:       corev1.NodeSpec{PodCIDR: podCIDR.String(), PodCIDRs: []string{podCIDR.String()}},
	}
	if _, err := k.cs.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create Node %s: %w", name, err)
	}
	return nil
}

func (k kubeNodes) Delete(ctx context.Context, name string) error {
	if err := k.cs.CoreV1().Nodes().Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete Node %s: %w", name, err)
	}
	return nil
}

func (k kubeNodes) Synced(ctx context.Context) (int, error) {
	list, err := k.cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{LabelSelector: LoadgenLabel + "=true", ResourceVersion: "0"})
	if err != nil {
		return 0, fmt.Errorf("list Nodes: %w", err)
	}
	synced := 0
	for _, n := range list.Items {
		if n.Annotations[kube.AnnotationPublicKey] != "" {
			synced++
		}
	}
	return synced, nil
}

// podCIDROf is the pod CIDR of agent idx's Node in Kubernetes mode: a /24
// of 10.0.0.0/8, the loadgen server's cluster CIDR, as node IPAM would
// allocate it.
func podCIDROf(idx int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(idx >> 8), byte(idx), 0}), 24)
}

// createNodes creates every agent's Node, JoinConcurrency at a time.
func createNodes(ctx context.Context, cfg Config, agents []*vagent, res *Result) error {
	cfg.Logger.Info("creating Nodes", "nodes", len(agents))
	cctx, cancel := context.WithTimeout(ctx, cfg.PhaseTimeout)
	defer cancel()
	start := time.Now()
	var made atomic.Int64
	err := parallel(cctx, len(agents), cfg.JoinConcurrency, func(i int) error {
		if err := cfg.Nodes.Create(cctx, agents[i].name, podCIDROf(i)); err != nil {
			return err
		}
		if k := made.Add(1); k%500 == 0 {
			cfg.Logger.Info("creating Nodes", "created", k, "of", len(agents))
		}
		return nil
	})
	res.NodesTime = time.Since(start)
	if err != nil {
		return fmt.Errorf("create Nodes (%d of %d made): %w", made.Load(), len(agents), err)
	}
	cfg.Logger.Info("created Nodes", "nodes", len(agents), "took", res.NodesTime.Round(time.Millisecond))
	return nil
}

// waitKubeSync waits until every agent's netmap had the last Node's pod
// CIDR (podCIDRs, followed since the streams opened) and every Node
// carries Trellis's annotation, each at most the phase timeout.
func waitKubeSync(ctx context.Context, cfg Config, podCIDRs *probe, joinedAt time.Time, res *Result) error {
	timer := time.NewTimer(cfg.PhaseTimeout)
	defer timer.Stop()
	select {
	case <-podCIDRs.done:
	case <-timer.C:
		return fmt.Errorf("%d of %d agents' netmaps got the pod CIDRs of the Nodes within %v", len(podCIDRs.latencies()), cfg.Agents, cfg.PhaseTimeout)
	case <-ctx.Done():
		return ctx.Err()
	}
	res.PodCIDRsTime = slices.Max(podCIDRs.latencies())
	cfg.Logger.Info("every netmap has the Nodes' pod CIDRs", "took", res.PodCIDRsTime.Round(time.Millisecond))
	deadline := time.Now().Add(cfg.PhaseTimeout)
	for {
		synced, err := cfg.Nodes.Synced(ctx)
		if err != nil {
			return err
		}
		if synced == cfg.Agents {
			res.AnnotatedTime = time.Since(joinedAt)
			cfg.Logger.Info("every Node carries the Trellis annotations", "sinceJoins", res.AnnotatedTime.Round(time.Millisecond))
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d Nodes carry the Trellis annotations %v after the joins", synced, cfg.Agents, time.Since(joinedAt).Round(time.Second))
		}
		cfg.Logger.Info("waiting for the Trellis annotations on the Nodes", "annotated", synced, "of", cfg.Agents)
		sleep(ctx, time.Second)
	}
}

// deleteNodes deletes cfg.NodeDeletes Nodes one after another (never
// agent 0's, whose netmap is measured afterwards) and measures how fast
// each leaves the netmaps of the agents whose Nodes remain. It returns
// the indexes of the deleted agents.
func deleteNodes(ctx context.Context, cfg Config, agents []*vagent, f *follower, base float64, res *Result) ([]int, error) {
	n := len(agents)
	var gone []int
	var all []time.Duration
	for k := range cfg.NodeDeletes {
		idx := 1 + (n/2+k)%(n-1)
		name := agents[idx].name
		c, lat, err := fanout(ctx, cfg, f, `"peersRemoved":["`+name+`"]`, append(gone, idx), func() error { return cfg.Nodes.Delete(ctx, name) })
		if err != nil {
			return gone, err
		}
		gone = append(gone, idx)
		res.NodeDeletes = append(res.NodeDeletes, c)
		all = append(all, lat...)
		cfg.Logger.Info("Node deletion fanned out", "deletion", k+1, "of", cfg.NodeDeletes, "node", name, "delivered", c.Delivered, "all", c.All.Round(time.Millisecond),
			"p50", c.P50.Round(time.Millisecond), "p99", c.P99.Round(time.Millisecond), "serverCPU", c.ServerCPU)
		if c.Delivered < n-len(gone) {
			return gone, fmt.Errorf("the deletion of Node %s reached %d of %d agents within %v", name, c.Delivered, n-len(gone), cfg.PhaseTimeout)
		}
		if _, err := waitIdle(ctx, cfg.ServerPID, base, settleTimeout); err != nil {
			return gone, err
		}
	}
	res.NodeDeleteP99 = percentile(all, 99)
	return gone, nil
}
