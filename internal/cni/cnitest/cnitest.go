// Package cnitest runs the real CNI reference plugins against a
// generated Trellis network config to put test pods into network
// namespaces.
package cnitest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/cni"
	"github.com/trellis-mesh/trellis/internal/mesh/meshtest"
)

// PluginDir is where the reference plugins are installed (Debian's
// containernetworking-plugins).
const PluginDir = "/usr/lib/cni"

// RequirePlugins skips t unless it runs as root and the bridge,
// host-local and portmap plugins are installed in PluginDir.
func RequirePlugins(t testing.TB) {
	t.Helper()
	meshtest.RequireRoot(t)
	for _, p := range []string{"bridge", "host-local", "portmap"} {
		if _, err := os.Stat(filepath.Join(PluginDir, p)); err != nil {
			t.Skipf("skipping: CNI plugin %s is not installed in %s (apt-get install containernetworking-plugins)", p, PluginDir)
		}
	}
}

// Result is the part of a CNI ADD result a test needs.
type Result struct {
	IPs []struct {
		Address netip.Prefix `json:"address"`
		Gateway netip.Addr   `json:"gateway"`
	} `json:"ips"`
}

// AddPod creates network namespace podNS and runs the bridge plugin of
// cfg's conflist in network namespace nodeNS (which must exist; the
// bridge and IPAM state live there) to give the pod an eth0. It returns
// the pod's first IPv4 address (its first address if it has no IPv4).
// On cleanup it runs DEL and deletes podNS.
func AddPod(t testing.TB, nodeNS, podNS string, cfg cni.Config) netip.Addr {
	t.Helper()
	res := AddPodResult(t, nodeNS, podNS, cfg)
	for _, ip := range res.IPs {
		if ip.Address.Addr().Is4() {
			return ip.Address.Addr()
		}
	}
	return res.IPs[0].Address.Addr()
}

// AddPodResult is AddPod returning all addresses the plugin assigned.
func AddPodResult(t testing.TB, nodeNS, podNS string, cfg cni.Config) Result {
	t.Helper()
	conf, err := PluginConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	meshtest.NetNS(t, podNS)
	t.Cleanup(func() {
		if _, err := invoke(nodeNS, podNS, "DEL", conf); err != nil {
			t.Logf("cleanup: CNI DEL of pod %s: %v", podNS, err)
		}
	})
	out, err := invoke(nodeNS, podNS, "ADD", conf)
	if err != nil {
		t.Fatalf("CNI ADD of pod %s in node %s: %v", podNS, nodeNS, err)
	}
	var res Result
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("CNI ADD of pod %s: bad result %s: %v", podNS, out, err)
	}
	if len(res.IPs) == 0 {
		t.Fatalf("CNI ADD of pod %s: no address in result %s", podNS, out)
	}
	return res
}

// PluginConfig returns the network config the runtime hands the first
// plugin of cfg's conflist: that plugin object plus cniVersion and name.
func PluginConfig(cfg cni.Config) ([]byte, error) {
	data, err := cni.Conflist(cfg)
	if err != nil {
		return nil, err
	}
	var list struct {
		CNIVersion string                       `json:"cniVersion"`
		Name       string                       `json:"name"`
		Plugins    []map[string]json.RawMessage `json:"plugins"`
	}
	if err := json.Unmarshal(data, &list); err != nil {
		return nil, fmt.Errorf("decode generated conflist: %w", err)
	}
	if len(list.Plugins) == 0 {
		return nil, fmt.Errorf("generated conflist has no plugins")
	}
	p := list.Plugins[0]
	p["cniVersion"], _ = json.Marshal(list.CNIVersion)
	p["name"], _ = json.Marshal(list.Name)
	return json.Marshal(p)
}

func invoke(nodeNS, podNS, command string, conf []byte) ([]byte, error) {
	var plugin struct {
		Type string `json:"type"`
	}
	if err := json.Unmarshal(conf, &plugin); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", nodeNS, filepath.Join(PluginDir, plugin.Type))
	cmd.Env = append(os.Environ(),
		"CNI_COMMAND="+command,
		"CNI_CONTAINERID="+podNS,
		"CNI_NETNS=/var/run/netns/"+podNS,
		"CNI_IFNAME=eth0",
		"CNI_PATH="+PluginDir,
	)
	cmd.Stdin = bytes.NewReader(conf)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%s %s: %w: %s %s", plugin.Type, command, err,
			strings.TrimSpace(stdout.String()), strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}
