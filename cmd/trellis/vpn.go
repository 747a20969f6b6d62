package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/trellis-mesh/trellis/internal/agent"
	"github.com/trellis-mesh/trellis/internal/server"
	"github.com/trellis-mesh/trellis/internal/vpn"
	"github.com/trellis-mesh/trellis/internal/vpn/tailscale"
)

// vpnFlags select a VPN carrier instead of WireGuard (server and agent).
type vpnFlags struct {
	auth            string
	authFile        string
	approvalTimeout time.Duration
}

func (v *vpnFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&v.auth, "vpn-auth", "", `carry cluster traffic over a VPN: "name=tailscale,joinKey=KEY[,controlServerURL=URL][,extraArgs=ARGS]" (extraArgs: tailscale up flags separated by spaces)`)
	fs.StringVar(&v.authFile, "vpn-auth-file", "", "file holding the --vpn-auth value (keep it mode 0600: it holds the join key)")
	fs.DurationVar(&v.approvalTimeout, "vpn-route-approval-timeout", agent.DefaultRouteApprovalTimeout, "warn when the VPN has not approved the node's pod CIDR routes after this long")
}

// readAuth returns the parsed --vpn-auth or --vpn-auth-file, or ok false if
// neither is set.
func (v *vpnFlags) readAuth(log *slog.Logger) (a vpn.Auth, ok bool, err error) {
	switch {
	case v.auth != "" && v.authFile != "":
		return a, false, errors.New("give either --vpn-auth or --vpn-auth-file, not both")
	case v.auth != "":
		a, err = vpn.Parse(v.auth)
	case v.authFile != "":
		a, err = vpn.ReadFile(v.authFile, log)
	default:
		return a, false, nil
	}
	return a, err == nil, err
}

// apply sets c.VPN from the flags: with a VPN carrier, WireGuard is off.
func (v *vpnFlags) apply(c *agent.Config, log *slog.Logger) error {
	a, ok, err := v.readAuth(log)
	if err != nil || !ok {
		return err
	}
	p, err := newProvider(a, c.DataDir, log)
	if err != nil {
		return err
	}
	c.VPN, c.DataPlane, c.RouteApprovalTimeout = p, false, v.approvalTimeout
	log.Info("cluster traffic goes over the VPN instead of WireGuard", "vpnAuth", a)
	return nil
}

func newProvider(a vpn.Auth, dataDir string, log *slog.Logger) (vpn.Provider, error) {
	switch a.Name {
	case "tailscale":
		return tailscale.New(tailscale.Config{Auth: a, Logger: log})
	}
	return nil, fmt.Errorf("VPN provider %q is not supported; supported: %v", a.Name, vpn.Supported)
}

// startVPN brings the server's node onto the VPN before the server starts,
// so that its VPN addresses are node IPs in the serving certificate:
// agents reach the server at them.
func startVPN(ctx context.Context, ac *agent.Config, sc *server.Config) error {
	if ac.VPN == nil {
		return nil
	}
	st, err := ac.VPN.Up(ctx)
	if err != nil {
		return fmt.Errorf("VPN %s: %w", ac.VPN.Name(), err)
	}
	sc.NodeIPs = append(sc.NodeIPs, st.Addrs...)
	return nil
}

// runCleanup removes what this node's agent created: the routes it
// advertised through its VPN (not the routes advertised otherwise) and its
// kernel routes to the VPN interface, its WireGuard interface and routes,
// its pod bridge and its CNI config. Run it when uninstalling a node.
func runCleanup(ctx context.Context, args []string, stderr io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("cleanup", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dataDir := fs.String("data-dir", "/var/lib/trellis", "the node's data directory")
	cniConfDir := fs.String("cni-conf-dir", "/etc/cni/net.d", "directory of the node's CNI network config")
	statusPort := statusPortFlag(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if err := settle(fs, getenv, nil); err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	return runNodeCleanup(ctx, *dataDir, *cniConfDir, *statusPort, log)
}
