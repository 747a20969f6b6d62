package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"time"

	"github.com/trellis-mesh/trellis/internal/cni"
	"github.com/trellis-mesh/trellis/internal/mesh"
	"github.com/trellis-mesh/trellis/internal/vpn"
)

// CleanupConfig says where an agent kept what Cleanup removes. Zero fields
// take the agent's defaults.
type CleanupConfig struct {
	// DataDir is the agent's --data-dir; the VPN route record is there.
	DataDir string
	// CNIConfDir is the agent's --cni-conf-dir.
	CNIConfDir string
	// Interface is the WireGuard interface; default mesh.DefaultInterface.
	Interface string
	// StatusPort is the agent's --status-port: Cleanup refuses while an
	// agent answers there. Negative skips the check.
	StatusPort int
	// VPN is the provider whose routes the agent may have advertised; nil
	// skips the VPN (no record is the usual case for WireGuard nodes).
	VPN vpn.Provider
	// Logger receives what was removed. Default slog.Default().
	Logger *slog.Logger
}

// Cleanup removes what an agent created on this host, and nothing else:
// the routes it advertised through its VPN and its kernel routes to the
// VPN interface (as recorded in the data dir), the WireGuard interface
// (with the routes through it), the pod bridge named in Trellis's CNI
// config, and that config. It keeps the data dir (the node's identity)
// and the forwarding sysctls. Run it with the agent stopped.
func Cleanup(ctx context.Context, c CleanupConfig) error {
	if c.DataDir == "" {
		c.DataDir = "/var/lib/trellis"
	}
	if c.CNIConfDir == "" {
		c.CNIConfDir = cni.DefaultDir
	}
	if c.Interface == "" {
		c.Interface = mesh.DefaultInterface
	}
	if c.StatusPort == 0 {
		c.StatusPort = 10251
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	log := c.Logger
	if c.StatusPort > 0 {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(c.StatusPort))
		if conn, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			conn.Close()
			return fmt.Errorf("an agent still runs here (its status endpoint %s answers): stop it first (systemctl stop trellis-agent, or trellis-server), then run the clean-up again", addr)
		}
	}
	var errs []error
	if c.VPN != nil {
		if err := CleanupVPN(ctx, c.DataDir, c.VPN, log); err != nil {
			errs = append(errs, err)
		}
	}
	if err := mesh.Cleanup(c.Interface); err != nil {
		errs = append(errs, err)
	} else {
		log.Info("removed the WireGuard interface and its routes (if it existed)", "interface", c.Interface)
	}
	cc := cni.Config{Dir: c.CNIConfDir}
	bridge, ours, err := trellisBridge(cc.Path())
	switch {
	case err != nil:
		errs = append(errs, err)
	case !ours:
		log.Info("no Trellis CNI config; leaving any pod bridge alone", "file", cc.Path())
	default:
		if err := cni.RemoveBridge(bridge); err != nil {
			errs = append(errs, err)
		} else {
			log.Info("removed the pod bridge (if it existed)", "bridge", bridge)
		}
		if err := cni.Remove(cc); err != nil {
			errs = append(errs, err)
		} else {
			log.Info("removed the CNI config", "file", cc.Path())
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("clean-up incomplete: %w", err)
	}
	return nil
}

// trellisBridge reads the CNI config at path and returns the bridge it
// names, if the file is Trellis's (network cni.DefaultNetworkName).
func trellisBridge(path string) (bridge string, ours bool, err error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("read CNI config: %w", err)
	}
	var list struct {
		Name    string `json:"name"`
		Plugins []struct {
			Type   string `json:"type"`
			Bridge string `json:"bridge"`
		} `json:"plugins"`
	}
	if json.Unmarshal(b, &list) != nil || list.Name != cni.DefaultNetworkName {
		return "", false, fmt.Errorf("%s is not a CNI config Trellis wrote (network %q); left alone: remove it by hand if it is stale", path, list.Name)
	}
	for _, p := range list.Plugins {
		if p.Type == "bridge" {
			if p.Bridge == "" {
				p.Bridge = cni.DefaultBridge
			}
			return p.Bridge, true, nil
		}
	}
	return cni.DefaultBridge, true, nil
}
