package hostnet_test

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/trellis-mesh/trellis/internal/hostnet"
	"github.com/trellis-mesh/trellis/internal/mesh/meshtest"
)

// TestDetectAddrsFamilies checks node IP auto-detection in namespaces
// shaped like an IPv6-only node, a dual-stack node and a node whose IPv6
// default route has only a link-local source.
func TestDetectAddrsFamilies(t *testing.T) {
	meshtest.RequireRoot(t)
	tests := []struct {
		name         string
		setup        [][]string // ip commands run with -n NS
		wantInternal []string
		wantNetworks []string
	}{
		{
			name: "IPv6-only",
			setup: [][]string{
				{"addr", "add", "2001:db8:5::10/64", "dev", "eth0", "nodad"},
				{"-6", "route", "add", "default", "via", "2001:db8:5::1", "dev", "eth0"},
			},
			wantInternal: []string{"2001:db8:5::10"},
			wantNetworks: []string{"2001:db8:5::/64"},
		},
		{
			name: "dual-stack",
			setup: [][]string{
				{"addr", "add", "10.5.0.10/24", "dev", "eth0"},
				{"addr", "add", "2001:db8:5::10/64", "dev", "eth0", "nodad"},
				{"route", "add", "default", "via", "10.5.0.1"},
				{"-6", "route", "add", "default", "via", "2001:db8:5::1", "dev", "eth0"},
			},
			wantInternal: []string{"10.5.0.10", "2001:db8:5::10"},
			wantNetworks: []string{"10.5.0.0/24", "2001:db8:5::/64"},
		},
		{
			name: "IPv6 default route without a global address",
			setup: [][]string{
				{"addr", "add", "10.5.0.10/24", "dev", "eth0"},
				{"route", "add", "default", "via", "10.5.0.1"},
				{"-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0"},
			},
			wantInternal: []string{"10.5.0.10"},
			wantNetworks: []string{"10.5.0.0/24"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ns := meshtest.NetNS(t, meshtest.Name("tra-addrs"))
			// No duplicate address detection: the link-local address is
			// usable at once, as it is on a host some seconds after boot.
			if _, err := meshtest.Exec(ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"); err != nil {
				t.Fatal(err)
			}
			// A veth pair inside the namespace: the kernel has no dummy
			// links everywhere.
			meshtest.IP(t, "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
			meshtest.IP(t, "-n", ns, "link", "set", "eth0p", "up")
			meshtest.IP(t, "-n", ns, "link", "set", "eth0", "up")
			for _, c := range tt.setup {
				meshtest.IP(t, append([]string{"-n", ns}, c...)...)
			}
			var got hostnet.Addrs
			if err := meshtest.InNetNS(ns, func() (err error) { got, err = hostnet.DetectAddrs(nil); return err }); err != nil {
				t.Fatal(err)
			}
			if want := parseAddrs(tt.wantInternal); !slices.Equal(got.Internal, want) {
				t.Errorf("internal = %v, want %v", got.Internal, want)
			}
			if want := parsePrefixes(tt.wantNetworks); !slices.Equal(got.Networks, want) {
				t.Errorf("networks = %v, want %v", got.Networks, want)
			}
		})
	}
}

func parseAddrs(ss []string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func parsePrefixes(ss []string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}
