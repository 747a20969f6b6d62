package vpn

import (
	"net/netip"
	"testing"
)

func TestAdmits(t *testing.T) {
	p := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	allowAll := []Rule{{Srcs: p("0.0.0.0/0", "::/0"), Dsts: p("0.0.0.0/0", "::/0")}}
	tailnetOnly := []Rule{{Srcs: p("100.64.0.0/10"), Dsts: p("100.64.0.0/10")}}
	cluster := []Rule{{Srcs: p("10.42.0.0/16", "2001:cafe:42::/56"), Dsts: p("10.42.0.0/16", "2001:cafe:42::/56")}}
	tests := []struct {
		name   string
		filter []Rule
		srcs   []netip.Prefix
		dst    string
		want   bool
	}{
		{"no rules (acls: [])", nil, p("10.42.0.0/16"), "10.42.1.0/24", false},
		{"allow all v4", allowAll, p("10.42.0.0/16"), "10.42.1.0/24", true},
		{"allow all v6", allowAll, p("2001:cafe:42::/56"), "2001:cafe:42:1::/64", true},
		{"tailnet addresses only", tailnetOnly, p("10.42.0.0/16"), "10.42.1.0/24", false},
		{"cluster rule", cluster, p("10.42.0.0/16"), "10.42.1.0/24", true},
		{"cluster rule v6", cluster, p("2001:cafe:42::/56"), "2001:cafe:42:1::/64", true},
		{"cluster rule, other source", cluster, p("10.50.0.0/16"), "10.42.1.0/24", false},
		{"rule with no sources", []Rule{{Dsts: p("0.0.0.0/0")}}, p("10.42.0.0/16"), "10.42.1.0/24", false},
		{"rule with no destinations", []Rule{{Srcs: p("0.0.0.0/0")}}, p("10.42.0.0/16"), "10.42.1.0/24", false},
		{"invalid prefixes ignored", []Rule{{Srcs: []netip.Prefix{{}}, Dsts: []netip.Prefix{{}}}}, p("10.42.0.0/16"), "10.42.1.0/24", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Admits(tt.filter, tt.srcs, netip.MustParsePrefix(tt.dst)); got != tt.want {
				t.Errorf("Admits = %v, want %v", got, tt.want)
			}
		})
	}
}
