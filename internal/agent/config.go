// Package agent runs a node: it joins the cluster, keeps its netmap stream
// open and makes the node's WireGuard device, routes and pod bridge match.
package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"net/url"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/trellis-mesh/trellis/internal/mesh"
	"github.com/trellis-mesh/trellis/internal/vpn"
)

// Config holds everything an agent needs. Zero values are replaced by the
// documented defaults in Validate.
type Config struct {
	// ServerURL is the supervisor, e.g. https://198.51.100.10:6443.
	ServerURL string
	// ServerAliases are other URLs of the server at ServerURL (a server's
	// own node reaches it on loopback, and the cluster announces it at
	// its address): the agent keeps one tunnel to it, not two.
	ServerAliases []string
	// Token is the join token (K10<ca-hash>::server:<secret>, or the bare
	// secret, which does not pin the CA).
	Token string
	// DataDir is the root of the node's state; the agent keeps its files in
	// DataDir/agent. Default /var/lib/trellis.
	DataDir string
	// NodeName is the node's name. Required.
	NodeName string
	// NodeIPs are the node's internal addresses. Default: the address the
	// default route leaves from.
	NodeIPs []netip.Addr
	// ExternalIPs are the addresses other networks reach the node at.
	ExternalIPs []netip.Addr
	// DataPlane enables WireGuard (--flannel-backend=wireguard-native);
	// false is --flannel-backend=none.
	DataPlane bool
	// WireGuard is the WireGuard device; Interface defaults to trellis-wg
	// and ListenPort to 51820. PrivateKey is filled in by the agent.
	WireGuard mesh.Config
	// CNIConfDir is where the CNI config is written. Default
	// /etc/cni/net.d.
	CNIConfDir string
	// Bridge is the pod bridge. Default cni0.
	Bridge string
	// Relay offers this node as a relay for nodes that cannot reach each
	// other directly (it needs a reachable address).
	Relay bool
	// Reload, if set, delivers new values of the settings that change
	// without a restart (SIGHUP: flags, environment and config file read
	// again).
	Reload <-chan Reload
	// VPN, if set, carries the cluster's traffic instead of WireGuard
	// (--vpn-auth): the node joins it before the cluster, its VPN
	// addresses are its node IPs, and its pod CIDRs are advertised through
	// it. DataPlane must be false.
	VPN vpn.Provider
	// RouteApprovalTimeout is how long the VPN may take to approve the
	// node's pod CIDR routes before the agent warns. Default 30 s.
	RouteApprovalTimeout time.Duration
	// StatusPort is the 127.0.0.1 TCP port of the agent's status endpoint
	// (--status-port), always reachable through the tunnel. Default
	// api.DefaultStatusPort; negative turns the endpoint off.
	StatusPort int
	// TunnelAllowPorts are the other ports the server may reach through
	// the tunnel, on 127.0.0.1 and on the node's addresses
	// (--tunnel-allow-port).
	TunnelAllowPorts []int
	// KubeletPort is the kubelet's port, which the server may reach on the
	// node's addresses through the tunnel (kube-apiserver's logs, exec,
	// port-forward through the Trellis egress). Default
	// api.DefaultKubeletPort.
	KubeletPort int
	// Logger receives the agent's logs. Default slog.Default().
	Logger *slog.Logger
	// Metrics, if set, receives the agent's Prometheus metrics
	// (--metrics-address).
	Metrics prometheus.Registerer
}

// Validate fills in defaults and checks the values.
func (c *Config) Validate() error {
	if err := c.validateTunnel(); err != nil {
		return err
	}
	if c.ServerURL == "" {
		return errors.New("no server given: set --server https://<server>:6443 (or TRELLIS_URL)")
	}
	u, err := url.Parse(c.ServerURL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return fmt.Errorf("server URL %q is not valid: use https://<server address>:6443", c.ServerURL)
	}
	if c.Token == "" {
		return errors.New("no join token given: set --token (or --token-file, TRELLIS_TOKEN) to the content of <data-dir>/server/token on the server")
	}
	if c.NodeName == "" {
		return errors.New("agent config: node name is empty; set --node-name")
	}
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
	if c.CNIConfDir == "" {
		c.CNIConfDir = "/etc/cni/net.d"
	}
	if c.Bridge == "" {
		c.Bridge = "cni0"
	}
	if c.WireGuard.Interface == "" {
		c.WireGuard.Interface = mesh.DefaultInterface
	}
	if c.WireGuard.ListenPort == 0 {
		c.WireGuard.ListenPort = mesh.DefaultListenPort
	}
	if c.WireGuard.ListenPort < 1 || c.WireGuard.ListenPort > 65535 {
		return fmt.Errorf("WireGuard listen port %d is out of range 1-65535", c.WireGuard.ListenPort)
	}
	for _, a := range append(append([]netip.Addr{}, c.NodeIPs...), c.ExternalIPs...) {
		if !a.IsValid() || a.IsUnspecified() || a.IsLoopback() {
			return fmt.Errorf("address %v cannot be a node address: other hosts cannot reach it", a)
		}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if err := c.validateVPN(); err != nil {
		return err
	}
	return nil
}

// Reload holds the settings an agent takes without a restart.
type Reload struct {
	// ExternalIPs replaces Config.ExternalIPs (--node-external-ip).
	ExternalIPs []netip.Addr
}

func (c *Config) dir(parts ...string) string {
	return filepath.Join(append([]string{c.DataDir, "agent"}, parts...)...)
}
