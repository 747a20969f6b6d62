package server

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"

	"github.com/trellis-mesh/trellis/internal/kube"
)

// Config holds everything a server needs. Zero values are replaced by the
// documented defaults in Validate.
type Config struct {
	// DataDir is the root of the server's state; the server keeps its files
	// in DataDir/server. Default /var/lib/trellis.
	DataDir string
	// NodeName is the name of the server's own node. Required.
	NodeName string
	// BindAddress is the address the HTTPS API listens on. Default: all.
	BindAddress netip.Addr
	// Port is the HTTPS API port. Default 6443.
	Port int
	// NodeIPs and ExternalIPs of the server's node: they go into the
	// serving certificate.
	NodeIPs     []netip.Addr
	ExternalIPs []netip.Addr
	// TLSSANs are extra names or addresses for the serving certificate.
	TLSSANs []string
	// ClusterCIDRs are the pod ranges. Default 10.42.0.0/16. Fixed at the
	// first start; a later start with other values is refused.
	ClusterCIDRs []netip.Prefix
	// ForceExternal makes every node reach every other at its external IP
	// (--flannel-external-ip).
	ForceExternal bool
	// Token is the join token or its secret (--token). Empty: reuse the
	// secret of DataDir/server/token, or generate one on first start.
	Token string
	// AgentToken, if set, is a second secret that joins agents only
	// (--agent-token); written to DataDir/server/agent-token.
	AgentToken string
	// DatastoreEndpoint selects the store; empty is SQLite in DataDir.
	DatastoreEndpoint string
	// Logger receives the server's logs. Default slog.Default().
	Logger *slog.Logger
	// Listener, if set, is used instead of listening on BindAddress:Port
	// (tests pass a loopback listener on a free port).
	Listener net.Listener
	// HA holds the settings of highly available servers (ha.go).
	HA HAConfig
	// KubeletPort, if set, returns the kubelet's port of a node (its
	// Kubernetes Node's daemonEndpoints), or 0 if unknown: the egress
	// (egress.go) reaches that port on the node's addresses. Default
	// api.DefaultKubeletPort.
	KubeletPort func(node string) int
	// Kube, if set, makes the server follow the Nodes of a Kubernetes
	// cluster (--kubeconfig, or in-cluster): a node's pod CIDRs are its
	// Node's spec.podCIDRs, and a join allocates none (kube.go,
	// internal/kube). Its ClusterCIDRs, Logger and Instance are filled
	// in from this Config.
	Kube *kube.Config
}

// Validate fills in defaults and checks the values.
func (c *Config) Validate() error {
	if c.DataDir == "" {
		c.DataDir = "/var/lib/trellis"
	}
	if !filepath.IsAbs(c.DataDir) {
		abs, err := filepath.Abs(c.DataDir)
		if err != nil {
			return fmt.Errorf("data dir %q: %w", c.DataDir, err)
		}
		c.DataDir = abs
	}
	if c.NodeName == "" {
		return errors.New("server config: node name is empty; set --node-name")
	}
	if c.Port == 0 {
		c.Port = 6443
	}
	if c.Port < 1 || c.Port > 65535 {
		return fmt.Errorf("https listen port %d is out of range 1-65535", c.Port)
	}
	if len(c.ClusterCIDRs) == 0 {
		c.ClusterCIDRs = []netip.Prefix{netip.MustParsePrefix("10.42.0.0/16")}
	}
	var v4, v6 int
	for i, p := range c.ClusterCIDRs {
		if !p.IsValid() {
			return errors.New("cluster CIDR is invalid; use a prefix such as 10.42.0.0/16")
		}
		c.ClusterCIDRs[i] = p.Masked()
		if p.Addr().Is4() {
			v4++
		} else {
			v6++
		}
	}
	if v4 > 1 || v6 > 1 {
		return errors.New("--cluster-cidr takes at most one IPv4 and one IPv6 prefix")
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Kube != nil {
		c.Kube.ClusterCIDRs = c.ClusterCIDRs
		if c.Kube.Logger == nil {
			c.Kube.Logger = c.Logger
		}
		if c.Kube.Instance == "" {
			c.Kube.Instance = c.NodeName
		}
		if err := c.Kube.Validate(); err != nil {
			return err
		}
	}
	return nil
}

func (c *Config) dir(parts ...string) string {
	return filepath.Join(append([]string{c.DataDir, "server"}, parts...)...)
}
