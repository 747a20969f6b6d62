// Package kube keeps Trellis node records and Kubernetes Node objects in
// step: a node's pod CIDRs are its Node's spec.podCIDRs (or Trellis
// writes its own there when nothing allocates), a deleted Node takes its
// node out of the mesh, and the Node shows the node's WireGuard key,
// endpoints and NetworkUnavailable=False once it is in the mesh. One
// Node informer per Trellis server; agents never talk to Kubernetes.
package kube

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Defaults of Config.
const (
	// DefaultAllocateGrace is how long a Node may be without a pod CIDR
	// before Trellis allocates one: kube-controller-manager
	// --allocate-node-cidrs takes 0.1-0.2 s.
	DefaultAllocateGrace = 3 * time.Second
	// DefaultResync is how often every Node is compared again, a
	// backstop: nothing is written unless something differs.
	DefaultResync = 10 * time.Minute
	// DefaultWorkers is how many Nodes are synced at once.
	DefaultWorkers = 4
	// DefaultRequestTimeout bounds one call to the API server.
	DefaultRequestTimeout = 15 * time.Second
	// DefaultQPS is how many requests a second the controller sends the
	// API server at most (with bursts of twice as many): Node writes,
	// almost all of them.
	DefaultQPS = 50
)

// Files of the service account of a pod (in-cluster config).
const (
	serviceAccountToken = "/var/run/secrets/kubernetes.io/serviceaccount/token"
)

// Config says how to reach Kubernetes and how to treat its Nodes. Zero
// values are replaced by the documented defaults in Validate.
type Config struct {
	// Kubeconfig is the path of a kubeconfig file (trellis server
	// --kubeconfig). Empty: the in-cluster config of the pod the server
	// runs in (see InCluster).
	Kubeconfig string
	// ClusterCIDRs are the pod ranges (trellis server --cluster-cidr).
	// Required. A Node's pod CIDRs must be node prefixes of them, one
	// per range.
	ClusterCIDRs []netip.Prefix
	// AllocateGrace is how long a Node may be without a pod CIDR before
	// Trellis allocates one itself and writes it into the Node. Default
	// DefaultAllocateGrace.
	AllocateGrace time.Duration
	// Resync is how often every Node is compared again. Default
	// DefaultResync.
	Resync time.Duration
	// Workers is how many Nodes are synced at once. Default
	// DefaultWorkers.
	Workers int
	// RequestTimeout bounds one call to the API server. Default
	// DefaultRequestTimeout.
	RequestTimeout time.Duration
	// QPS bounds the requests per second to the API server (bursts of
	// 2×). Default DefaultQPS.
	QPS float32
	// Instance names this server in Events and logs. Default: the host
	// name.
	Instance string
	// Logger receives the controller's logs (and client-go's). Default
	// slog.Default().
	Logger *slog.Logger
}

// Validate fills in defaults and checks the values.
func (c *Config) Validate() error {
	if len(c.ClusterCIDRs) == 0 {
		return errors.New("kubernetes: no cluster CIDR")
	}
	for _, p := range c.ClusterCIDRs {
		if !p.IsValid() || p != p.Masked() {
			return fmt.Errorf("kubernetes: cluster CIDR %s is not a masked prefix", p)
		}
	}
	if c.AllocateGrace == 0 {
		c.AllocateGrace = DefaultAllocateGrace
	}
	if c.Resync == 0 {
		c.Resync = DefaultResync
	}
	if c.Workers == 0 {
		c.Workers = DefaultWorkers
	}
	if c.RequestTimeout == 0 {
		c.RequestTimeout = DefaultRequestTimeout
	}
	if c.QPS == 0 {
		c.QPS = DefaultQPS
	}
	if c.AllocateGrace < 0 || c.Resync < 0 || c.Workers < 0 || c.RequestTimeout < 0 || c.QPS < 0 {
		return errors.New("kubernetes: durations, the worker count and the QPS must not be negative")
	}
	if c.Instance == "" {
		c.Instance, _ = os.Hostname()
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

// InCluster reports whether this process runs in a Kubernetes pod with a
// service account: KUBERNETES_SERVICE_HOST is set and the account's
// token is mounted. A Trellis server there uses the in-cluster config
// unless --kubeconfig is given.
func InCluster() bool {
	if os.Getenv("KUBERNETES_SERVICE_HOST") == "" {
		return false
	}
	_, err := os.Stat(serviceAccountToken)
	return err == nil
}

// restConfig loads the client config, and says where it came from.
func (c *Config) restConfig() (*rest.Config, string, error) {
	if c.Kubeconfig != "" {
		rc, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
		if err != nil {
			return nil, "", fmt.Errorf("--kubeconfig %s: %w", c.Kubeconfig, err)
		}
		return rc, "kubeconfig " + c.Kubeconfig, nil
	}
	rc, err := rest.InClusterConfig()
	if err != nil {
		return nil, "", fmt.Errorf("no --kubeconfig given and not in a pod with a service account (%w): pass --kubeconfig", err)
	}
	return rc, "in-cluster service account", nil
}
