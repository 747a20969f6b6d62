package agent

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/vpn"
)

func pfx(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func TestPlanAdvertise(t *testing.T) {
	tests := []struct {
		name                           string
		recorded, advertised, podCIDRs []netip.Prefix
		ours, stale                    []netip.Prefix
	}{
		{name: "first start", advertised: pfx("192.168.1.0/24"), podCIDRs: pfx("10.42.1.0/24"), ours: pfx("10.42.1.0/24")},
		{name: "restart", recorded: pfx("10.42.1.0/24"), advertised: pfx("192.168.1.0/24", "10.42.1.0/24"), podCIDRs: pfx("10.42.1.0/24"), ours: pfx("10.42.1.0/24")},
		{name: "user advertised the pod CIDR already", advertised: pfx("10.42.1.0/24"), podCIDRs: pfx("10.42.1.0/24")},
		{name: "new pod CIDR", recorded: pfx("10.42.1.0/24"), advertised: pfx("10.42.1.0/24"), podCIDRs: pfx("10.42.7.0/24"), ours: pfx("10.42.7.0/24"), stale: pfx("10.42.1.0/24")},
		{name: "dual stack", advertised: nil, podCIDRs: pfx("10.42.1.0/24", "fd00:42:0:1::/64"), ours: pfx("10.42.1.0/24", "fd00:42:0:1::/64")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ours, stale := planAdvertise(tt.recorded, tt.advertised, tt.podCIDRs)
			if !slices.Equal(ours, tt.ours) || !slices.Equal(stale, tt.stale) {
				t.Errorf("planAdvertise = %v, %v; want %v, %v", ours, stale, tt.ours, tt.stale)
			}
		})
	}
}

func TestForeignRoutes(t *testing.T) {
	a := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	members := []api.Member{
		{Name: "n1", InternalIPs: []netip.Addr{a("100.64.0.1"), a("fd7a::1")}, PodCIDRs: pfx("10.42.0.0/24")},
		{Name: "n2", InternalIPs: []netip.Addr{a("100.64.0.2")}, PodCIDRs: pfx("10.42.1.0/24")},
	}
	cidrs := pfx("10.42.0.0/16", "fd00:42::/56")
	st := vpn.State{Peers: []vpn.Peer{
		{Name: "n2", Addrs: []netip.Addr{a("100.64.0.2")}, Routes: pfx("10.42.1.0/24", "10.0.0.0/8")}, // member: fine
		{Name: "lan", Addrs: []netip.Addr{a("100.64.0.9")}, Routes: pfx("192.168.0.0/24")},            // no overlap
		{Name: "other", Addrs: []netip.Addr{a("100.64.0.7")}, Routes: pfx("10.0.0.0/8")},              // covers the cluster
		{Name: "other6", Addrs: []netip.Addr{a("100.64.0.8")}, Routes: pfx("fd00:42:0:5::/64")},       // inside the v6 CIDR
		{Name: "gone", Addrs: []netip.Addr{a("100.64.0.3")}, Routes: pfx("10.42.2.0/24")},             // an old node of this cluster
	}}
	got := foreignRoutes(st, cidrs, members)
	if len(got) != 3 || !strings.Contains(got[0], `"other"`) || !strings.Contains(got[0], "10.0.0.0/8") ||
		!strings.Contains(got[1], `"other6"`) || !strings.Contains(got[2], `"gone"`) {
		t.Errorf("foreignRoutes = %q", got)
	}
	if got := foreignRoutes(st, pfx("10.50.0.0/16"), members); len(got) != 1 || !strings.Contains(got[0], `"other"`) {
		t.Errorf("with 10.50.0.0/16: foreignRoutes = %q, want only other's 10.0.0.0/8", got)
	}
}

func TestAutoApproversStanza(t *testing.T) {
	got := AutoApproversStanza(pfx("10.42.0.0/16", "2001:cafe:42::/56"), "")
	want := `"autoApprovers": {
"routes": {
"10.42.0.0/16": ["your_account@xyz.com"],
"2001:cafe:42::/56": ["your_account@xyz.com"],
},
},`
	if got != want {
		t.Errorf("stanza:\n%s\nwant (the K3s page's):\n%s", got, want)
	}
	if got := AutoApproversStanza(pfx("10.42.0.0/16"), "ops@example.com"); !strings.Contains(got, `"10.42.0.0/16": ["ops@example.com"],`) {
		t.Errorf("stanza with owner:\n%s", got)
	}
}

func TestAutoApproversStanzaOwner(t *testing.T) {
	for owner, want := range map[string]string{
		"trellis":             `["trellis@"]`, // a headscale user without an e-mail: policy v2 wants "name@"
		"trellis@":            `["trellis@"]`,
		"trellis@example.com": `["trellis@example.com"]`,
		"tag:k8s":             `["tag:k8s"]`,
		"group:ops":           `["group:ops"]`,
	} {
		if got := AutoApproversStanza(pfx("10.42.0.0/16"), owner); !strings.Contains(got, `"10.42.0.0/16": `+want+`,`) {
			t.Errorf("owner %q: stanza\n%s\nwant %s", owner, got, want)
		}
	}
}

func TestUnapprovedWarningTagged(t *testing.T) {
	cidrs := pfx("10.42.0.0/16", "2001:cafe:42::/56")
	w := unapprovedWarning(pfx("10.42.1.0/24"), 30e9, cidrs, "tagged-devices", []string{"tag:trellis"})
	for _, want := range []string{"tagged key (tag:trellis)", "tagOwners", `"10.42.0.0/16": ["tag:trellis"],`, `"2001:cafe:42::/56": ["tag:trellis"],`} {
		if !strings.Contains(w, want) {
			t.Errorf("want %q in:\n%s", want, w)
		}
	}
	w = unapprovedWarning(pfx("10.42.1.0/24"), 30e9, cidrs, "trellis@example.com", nil)
	if strings.Contains(w, "tagged") || !strings.Contains(w, `"10.42.0.0/16": ["trellis@example.com"],`) {
		t.Errorf("untagged:\n%s", w)
	}
}

func TestPolicyDenied(t *testing.T) {
	cidrs := pfx("10.42.0.0/16", "2001:cafe:42::/56")
	routes := pfx("10.42.1.0/24", "2001:cafe:42:1::/64")
	all := []vpn.Rule{{Srcs: pfx("0.0.0.0/0", "::/0"), Dsts: pfx("0.0.0.0/0", "::/0")}}
	v4only := []vpn.Rule{{Srcs: pfx("10.42.0.0/16"), Dsts: pfx("10.42.0.0/16")}}
	tests := []struct {
		name string
		st   vpn.State
		want []netip.Prefix
	}{
		{"filter unknown", vpn.State{}, nil},
		{"acls: [] (no rules)", vpn.State{FilterKnown: true}, routes},
		{"allow all", vpn.State{FilterKnown: true, Filter: all}, nil},
		{"IPv4 only", vpn.State{FilterKnown: true, Filter: v4only}, pfx("2001:cafe:42:1::/64")},
		{"tailnet addresses only", vpn.State{FilterKnown: true, Filter: []vpn.Rule{{Srcs: pfx("100.64.0.0/10"), Dsts: pfx("100.64.0.0/10")}}}, routes},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := policyDenied(tt.st, routes, cidrs); !slices.Equal(got, tt.want) {
				t.Errorf("policyDenied = %v, want %v", got, tt.want)
			}
		})
	}
	w := policyWarning(routes, cidrs, "trellis@example.com")
	for _, want := range []string{`"acls": []`, `"src": ["trellis@example.com", "10.42.0.0/16", "2001:cafe:42::/56"]`,
		`"dst": ["trellis@example.com:*", "10.42.0.0/16:*", "2001:cafe:42::/56:*"]`, "10.42.1.0/24,2001:cafe:42:1::/64"} {
		if !strings.Contains(w, want) {
			t.Errorf("want %q in:\n%s", want, w)
		}
	}
}

func TestDeniesAll(t *testing.T) {
	a := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	addrs := []netip.Addr{a("100.64.0.1"), a("fd7a:115c:a1e0::1")}
	tests := []struct {
		name string
		st   vpn.State
		want bool
	}{
		{"filter unknown", vpn.State{Addrs: addrs}, false},
		{"acls: [] (no rules)", vpn.State{Addrs: addrs, FilterKnown: true}, true},
		{"allow all", vpn.State{Addrs: addrs, FilterKnown: true, Filter: []vpn.Rule{{Srcs: pfx("0.0.0.0/0", "::/0"), Dsts: pfx("0.0.0.0/0", "::/0")}}}, false},
		{"tailnet v6 only", vpn.State{Addrs: addrs, FilterKnown: true, Filter: []vpn.Rule{{Srcs: pfx("fd7a:115c:a1e0::/48"), Dsts: pfx("fd7a:115c:a1e0::/48")}}}, false},
		{"other hosts only", vpn.State{Addrs: addrs, FilterKnown: true, Filter: []vpn.Rule{{Srcs: pfx("0.0.0.0/0"), Dsts: pfx("100.64.0.9/32")}}}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := deniesAll(tt.st); got != tt.want {
				t.Errorf("deniesAll = %v, want %v", got, tt.want)
			}
		})
	}
	if w := denyAllWarning("tag:k8s"); !strings.Contains(w, `{"action": "accept", "src": ["tag:k8s"], "dst": ["tag:k8s:*"]}`) || !strings.Contains(w, `"acls": []`) {
		t.Errorf("denyAllWarning:\n%s", w)
	}
}

func TestStanzaOwner(t *testing.T) {
	for _, tt := range []struct {
		login string
		tags  []string
		want  string
	}{
		{"", nil, ""},
		{"trellis", nil, "trellis@"},
		{"ops@example.com", nil, "ops@example.com"},
		{"tagged-devices", []string{"tag:k8s", "tag:b"}, "tag:k8s"},
	} {
		if got := stanzaOwner(tt.login, tt.tags); got != tt.want {
			t.Errorf("stanzaOwner(%q, %v) = %q, want %q", tt.login, tt.tags, got, tt.want)
		}
	}
	if got := aclRule(pfx("10.42.0.0/16"), ""); got != `{"action": "accept", "src": ["10.42.0.0/16"], "dst": ["10.42.0.0/16:*"]}` {
		t.Errorf("aclRule without owner = %s", got)
	}
}

func TestServedRoutes(t *testing.T) {
	a := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	cidrs := pfx("10.42.0.0/16", "fd00:42::/56")
	st := vpn.State{Peers: []vpn.Peer{
		{Name: "n2", Addrs: []netip.Addr{a("fd7a::2")}, Routes: pfx("fd00:42:0:1::/64", "10.42.1.0/24")},
		{Name: "n3", Addrs: []netip.Addr{a("100.64.0.3")}, Routes: pfx("10.42.2.0/24", "10.99.0.0/16")}, // 10.99/16 is not the cluster's
		{Name: "wide", Addrs: []netip.Addr{a("100.64.0.9")}, Routes: pfx("10.0.0.0/8")},                 // wider than the cluster CIDR
		{Name: "dup", Addrs: []netip.Addr{a("100.64.0.4")}, Routes: pfx("10.42.1.0/24")},
		{Name: "n5", Addrs: []netip.Addr{a("100.64.0.5")}},
	}}
	want := pfx("10.42.1.0/24", "10.42.2.0/24", "fd00:42:0:1::/64")
	if got := servedRoutes(st, cidrs); !slices.Equal(got, want) {
		t.Errorf("servedRoutes = %v, want %v", got, want)
	}
	if got := servedRoutes(vpn.State{}, cidrs); got != nil {
		t.Errorf("no peers: %v", got)
	}
}
