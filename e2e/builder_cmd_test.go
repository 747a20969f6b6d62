//go:build e2e

package e2e

import (
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/internal/api"
)

// TestBuilderCommandLines pins the command lines the cluster builder makes
// for the starts the tests use (no root needed: nothing is started).
func TestBuilderCommandLines(t *testing.T) {
	lab := &Lab{t: t}
	node := func(name, public, lanIP string, lan *LAN) *Node {
		n := &Node{Name: name, NS: "ns-" + name, LAN: lan, lab: lab}
		if public != "" {
			n.PublicIP = netip.MustParseAddr(public)
		}
		if lanIP != "" {
			n.LANIP = netip.MustParseAddr(lanIP)
		}
		return n
	}
	lan1 := &LAN{}
	c1 := node("cloud1", "198.51.100.10", "10.1.0.10", lan1)
	c1b := node("cloud1b", "198.51.100.11", "10.1.0.11", lan1)
	c2 := node("cloud2", "203.0.113.20", "10.2.0.20", &LAN{})
	home := node("home1", "", "192.168.1.10", &LAN{})
	ts := node("ts2", "203.0.113.20", "", nil)
	lab.v6().public6[c1] = netip.MustParseAddr("2001:db8:1::10")
	tn := &Tailnet{byNode: map[*Node]*TSNode{ts: {Node: ts, PathDir: "/ts2/bin"}}}
	const tok = "K10abc::server:e2e-secret"
	srv := &member{Node: c1, role: api.RoleServer}

	tests := []struct {
		name     string
		defaults []option
		node     *Node
		role     string
		opts     []option
		want     string
	}{
		{"server", nil, c1, api.RoleServer, nil,
			"trellis server --data-dir D --node-name cloud1 --node-ip 10.1.0.10 --node-external-ip 198.51.100.10 --cni-conf-dir C --flannel-backend=wireguard-native --flannel-external-ip --token e2e-secret --cluster-cidr 10.42.0.0/16 --https-listen-port 6443"},
		{"agent", nil, c2, api.RoleAgent, nil,
			"trellis agent --server https://198.51.100.10:6443 --token " + tok + " --data-dir D --node-name cloud2 --node-ip 10.2.0.20 --node-external-ip 203.0.113.20 --cni-conf-dir C"},
		{"agent behind NAT, with flags", nil, home, api.RoleAgent, []option{withFlags("--tunnel-allow-port", "8080")},
			"trellis agent --server https://198.51.100.10:6443 --token " + tok + " --data-dir D --node-name home1 --node-ip 192.168.1.10 --cni-conf-dir C --tunnel-allow-port 8080"},
		{"relay that finds its addresses", nil, c2, api.RoleAgent, []option{withAddressFlags(), asRelay(), withMetrics("127.0.0.1:10252")},
			"trellis agent --server https://198.51.100.10:6443 --token " + tok + " --data-dir D --node-name cloud2 --cni-conf-dir C --relay --metrics-address 127.0.0.1:10252"},
		{"server without a node", nil, c1, api.RoleServer, []option{withServerFlags("--disable-agent")},
			"trellis server --data-dir D --node-name cloud1 --node-ip 10.1.0.10 --node-external-ip 198.51.100.10 --cni-conf-dir C --disable-agent --token e2e-secret --cluster-cidr 10.42.0.0/16 --https-listen-port 6443"},
		{"HA: first server", nil, c1, api.RoleServer, []option{withClusterInit()},
			"trellis server --data-dir D --node-name cloud1 --node-ip 10.1.0.10 --node-external-ip 198.51.100.10 --cni-conf-dir C --flannel-backend=wireguard-native --flannel-external-ip --cluster-init --token e2e-secret --cluster-cidr 10.42.0.0/16 --https-listen-port 6443"},
		{"HA: a server on its LAN joins it", nil, c1b, api.RoleServer, []option{via(srv)},
			"trellis server --data-dir D --node-name cloud1b --node-ip 10.1.0.11 --node-external-ip 198.51.100.11 --cni-conf-dir C --flannel-backend=wireguard-native --flannel-external-ip --server https://10.1.0.10:6443 --token " + tok + " --cluster-cidr 10.42.0.0/16 --https-listen-port 6443"},
		{"HA: an agent elsewhere joins through it", nil, c2, api.RoleAgent, []option{via(srv)},
			"trellis agent --server https://198.51.100.10:6443 --token " + tok + " --data-dir D --node-name cloud2 --node-ip 10.2.0.20 --node-external-ip 203.0.113.20 --cni-conf-dir C"},
		{"dual-stack server", []option{dualStack()}, c1, api.RoleServer, []option{withAddressFlags("--node-ip", "10.1.0.10", "--node-external-ip", "198.51.100.10,2001:db8:1::10"), withFlags("--flannel-external-ip")},
			"trellis server --data-dir D --node-name cloud1 --node-ip 10.1.0.10 --node-external-ip 198.51.100.10,2001:db8:1::10 --cni-conf-dir C --flannel-backend=wireguard-native --token e2e-secret --cluster-cidr 10.42.0.0/16,fd00:42::/56 --https-listen-port 6443 --flannel-external-ip"},
		{"dual-stack agent over IPv6", []option{dualStack()}, c2, api.RoleAgent, []option{overIPv6(), withAddressFlags()},
			"trellis agent --server https://[2001:db8:1::10]:6443 --token " + tok + " --data-dir D --node-name cloud2 --cni-conf-dir C"},
		{"tailnet server", []option{overTailnet(tn)}, ts, api.RoleServer, []option{withVPNAuth("name=tailscale,joinKey=K")},
			"env PATH=/ts2/bin:$PATH trellis server --data-dir D --node-name ts2 --cni-conf-dir C --token e2e-secret --cluster-cidr 10.42.0.0/16 --https-listen-port 6443 --vpn-auth=name=tailscale,joinKey=K --vpn-route-approval-timeout 5s"},
		{"tailnet agent", []option{overTailnet(tn)}, ts, api.RoleAgent, []option{withServerURL("https://100.64.0.1:6443"), withEnv("TRELLIS_VPN_AUTH=K")},
			"env PATH=/ts2/bin:$PATH TRELLIS_VPN_AUTH=K trellis agent --server https://100.64.0.1:6443 --token " + tok + " --data-dir D --node-name ts2 --cni-conf-dir C --vpn-route-approval-timeout 5s"},
		{"agent from a config file", nil, c2, api.RoleAgent, []option{flagsOnly("--config", "/etc/x.yaml")},
			"trellis agent --config /etc/x.yaml"},
		{"hook", []option{beforeStart(func(m *member, s *startConfig) {
			if m.role == api.RoleServer {
				s.flags = append(s.flags, "--kubeconfig", "/k/"+m.Name)
			}
		})}, c1, api.RoleServer, nil,
			"trellis server --data-dir D --node-name cloud1 --node-ip 10.1.0.10 --node-external-ip 198.51.100.10 --cni-conf-dir C --flannel-backend=wireguard-native --flannel-external-ip --token e2e-secret --cluster-cidr 10.42.0.0/16 --https-listen-port 6443 --kubeconfig /k/cloud1"},
	}
	for _, level := range []string{"", "debug"} {
		t.Setenv("TRELLIS_E2E_LOG_LEVEL", level)
		for _, tt := range tests {
			c := &cluster{t: t, lab: lab, bin: "trellis", defaults: tt.defaults, server: srv, token: tok}
			m := &member{Node: tt.node, role: tt.role, dataDir: "D", cniDir: "C"}
			got := strings.Join(c.command(m, c.config(m, tt.opts...)), " ")
			got = strings.ReplaceAll(got, "PATH=/ts2/bin:"+os.Getenv("PATH"), "PATH=/ts2/bin:$PATH")
			want := tt.want
			switch {
			case level == "":
			case strings.Contains(want, "--cni-conf-dir C"):
				want = strings.Replace(want, "--cni-conf-dir C", "--cni-conf-dir C --log-level "+level, 1)
			default:
				want += " --log-level " + level
			}
			if got != want {
				t.Errorf("%s (TRELLIS_E2E_LOG_LEVEL=%q):\n got %s\nwant %s", tt.name, level, got, want)
			}
		}
	}
}
