package cni_test

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/internal/cni"
	"github.com/trellis-mesh/trellis/internal/cni/cnitest"
	"github.com/trellis-mesh/trellis/internal/mesh/meshtest"
)

// TestBridgePluginAddsPod creates a node namespace with the pod bridge,
// writes the conflist, runs the real bridge plugin to put a pod
// namespace on it, and pings the gateway from the pod.
func TestBridgePluginAddsPod(t *testing.T) {
	cnitest.RequirePlugins(t)
	node := meshtest.NetNS(t, meshtest.Name("trc-node"))
	cfg := cni.Config{
		Dir:         t.TempDir(),
		PodCIDRs:    []netip.Prefix{netip.MustParsePrefix("10.42.1.0/24"), netip.MustParsePrefix("fd00:42:0:1::/64")},
		MTU:         1420,
		IPAMDataDir: filepath.Join(t.TempDir(), "ipam"),
	}
	gateways := cni.Gateways(cfg.PodCIDRs)
	if err := meshtest.InNetNS(node, func() error {
		if err := cni.EnableForwarding(true, true); err != nil {
			return err
		}
		// Adopting an existing bridge with a stray address corrects it.
		if err := cni.EnsureBridge("", append(gateways, netip.MustParsePrefix("10.99.0.1/16")), 1500); err != nil {
			return err
		}
		return cni.EnsureBridge("", gateways, cfg.MTU)
	}); err != nil {
		t.Fatal(err)
	}
	for _, sysctl := range []string{"net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"} {
		if out, err := meshtest.Exec(node, "cat", "/proc/sys/"+sysctl); err != nil || strings.TrimSpace(out) != "1" {
			t.Errorf("%s in node namespace = %q, %v; want 1", sysctl, out, err)
		}
	}
	addrs := meshtest.IP(t, "-n", node, "-br", "addr", "show", "dev", cni.DefaultBridge)
	if !strings.Contains(addrs, "10.42.1.1/24") || !strings.Contains(addrs, "fd00:42:0:1::1/64") || strings.Contains(addrs, "10.99.") {
		t.Errorf("bridge addresses: %s", addrs)
	}
	if link := meshtest.IP(t, "-n", node, "link", "show", "dev", cni.DefaultBridge); !strings.Contains(link, ",UP") || !strings.Contains(link, "mtu 1420") {
		t.Errorf("bridge is not up with MTU 1420: %s", link)
	}
	if err := cni.Write(cfg); err != nil {
		t.Fatal(err)
	}

	pod := meshtest.Name("trc-pod")
	res := cnitest.AddPodResult(t, node, pod, cfg)
	var v4, v6 netip.Addr
	for _, ip := range res.IPs {
		switch {
		case ip.Address.Addr().Is4():
			v4 = ip.Address.Addr()
		default:
			v6 = ip.Address.Addr()
		}
	}
	if !cfg.PodCIDRs[0].Contains(v4) || v4 == gateways[0].Addr() {
		t.Errorf("pod IPv4 address %s, want one in %s other than the gateway", v4, cfg.PodCIDRs[0])
	}
	if !cfg.PodCIDRs[1].Contains(v6) {
		t.Errorf("pod IPv6 address %s, want one in %s", v6, cfg.PodCIDRs[1])
	}
	if err := meshtest.Ping(pod, gateways[0].Addr().String(), 2); err != nil {
		t.Errorf("pod cannot ping its IPv4 gateway: %v", err)
	}
	if err := meshtest.Ping(pod, gateways[1].Addr().String(), 2); err != nil {
		t.Errorf("pod cannot ping its IPv6 gateway: %v", err)
	}
	if link := meshtest.IP(t, "-n", pod, "link", "show", "eth0"); !strings.Contains(link, "mtu 1420") {
		t.Errorf("pod eth0 has the wrong MTU: %s", link)
	}
	routes := meshtest.IP(t, "-n", pod, "route", "show", "default")
	if !strings.Contains(routes, "via 10.42.1.1") {
		t.Errorf("pod default route: %q, want via 10.42.1.1", routes)
	}

	// A second pod gets another address through the same IPAM state.
	if other := cnitest.AddPod(t, node, meshtest.Name("trc-pod"), cfg); other == v4 || !cfg.PodCIDRs[0].Contains(other) {
		t.Errorf("second pod address %s (first %s)", other, v4)
	}
	if entries, _ := os.ReadDir(filepath.Join(cfg.IPAMDataDir, "trellis")); len(entries) == 0 {
		t.Errorf("host-local kept no state in %s", cfg.IPAMDataDir)
	}
}

func TestRemoveBridge(t *testing.T) {
	meshtest.RequireRoot(t)
	node := meshtest.NetNS(t, meshtest.Name("trc-node"))
	err := meshtest.InNetNS(node, func() error {
		if err := cni.EnsureBridge("br-test", []netip.Prefix{netip.MustParsePrefix("10.42.5.1/24")}, 0); err != nil {
			return err
		}
		if err := cni.RemoveBridge("br-test"); err != nil {
			return err
		}
		return cni.RemoveBridge("br-test") // already gone: fine
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := meshtest.Run("ip", "-n", node, "link", "show", "br-test"); err == nil {
		t.Error("bridge still exists after RemoveBridge")
	}
	meshtest.IP(t, "-n", node, "link", "add", "notabridge", "type", "veth", "peer", "name", "nb1")
	err = meshtest.InNetNS(node, func() error { return cni.EnsureBridge("notabridge", nil, 0) })
	if err == nil || !strings.Contains(err.Error(), "not a bridge") {
		t.Errorf("EnsureBridge over a veth: %v, want a 'not a bridge' error", err)
	}
}
