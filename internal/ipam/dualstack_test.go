package ipam

import (
	"errors"
	"net/netip"
	"testing"
)

// TestDualStackAllocation allocates nodes out of an IPv4 and an IPv6
// cluster CIDR side by side, the way the server claims one prefix per
// cluster CIDR for each node.
func TestDualStackAllocation(t *testing.T) {
	clusters := []netip.Prefix{netip.MustParsePrefix("10.42.0.0/16"), netip.MustParsePrefix("fd00:42::/56")}
	used := map[netip.Prefix]bool{}
	want := [][2]string{
		{"10.42.0.0/24", "fd00:42::/64"},
		{"10.42.1.0/24", "fd00:42:0:1::/64"},
		{"10.42.2.0/24", "fd00:42:0:2::/64"},
	}
	for i, w := range want {
		for j, c := range clusters {
			p, err := Next(c, used)
			if err != nil {
				t.Fatalf("node %d, cluster %s: %v", i, c, err)
			}
			if p.String() != w[j] {
				t.Errorf("node %d, cluster %s: got %s, want %s", i, c, p, w[j])
			}
			// Claims of both families live in one set: they never
			// collide.
			used[p] = true
		}
	}
	// A freed IPv6 prefix is reused without touching IPv4.
	delete(used, netip.MustParsePrefix("fd00:42:0:1::/64"))
	if p, _ := Next(clusters[1], used); p.String() != "fd00:42:0:1::/64" {
		t.Errorf("Next after freeing an IPv6 prefix = %s", p)
	}
	if p, _ := Next(clusters[0], used); p.String() != "10.42.3.0/24" {
		t.Errorf("IPv4 Next after freeing an IPv6 prefix = %s", p)
	}
}

func TestDualStackTable(t *testing.T) {
	tests := []struct {
		cluster  string
		bits     int
		size     uint64
		node     string // a node prefix inside
		gateway  string
		tunnel   string
		contains []string // node prefixes Contains accepts
		rejects  []string // prefixes it refuses
	}{
		{
			cluster: "10.42.0.0/16", bits: 24, size: 256, node: "10.42.7.0/24",
			gateway: "10.42.7.1/24", tunnel: "10.42.7.0/32",
			contains: []string{"10.42.0.0/24", "10.42.255.0/24"},
			rejects:  []string{"10.42.0.0/16", "fd00:42::/64", "10.42.7.0/25", "10.43.0.0/24"},
		},
		{
			cluster: "fd00:42::/56", bits: 64, size: 256, node: "fd00:42:0:7::/64",
			gateway: "fd00:42:0:7::1/64", tunnel: "fd00:42:0:7::/128",
			contains: []string{"fd00:42::/64", "fd00:42:0:ff::/64"},
			rejects:  []string{"fd00:42::/56", "fd00:42:0:100::/64", "10.42.0.0/24", "fd00:42:0:7::/80", "fd00:42:0:7::1/64", "::/0"},
		},
		{
			// The seed page's Tailscale example.
			cluster: "2001:cafe:42::/56", bits: 64, size: 256, node: "2001:cafe:42:1::/64",
			gateway: "2001:cafe:42:1::1/64", tunnel: "2001:cafe:42:1::/128",
			contains: []string{"2001:cafe:42:1::/64"},
			rejects:  []string{"2001:cafe:43::/64"},
		},
		{
			// A /48 holds 65536 node prefixes.
			cluster: "fd00:42::/48", bits: 64, size: 65536, node: "fd00:42:0:ffff::/64",
			gateway: "fd00:42:0:ffff::1/64", tunnel: "fd00:42:0:ffff::/128",
		},
		{
			// Smaller than a node prefix: one node prefix of its own size.
			cluster: "fd00:42::/96", bits: 96, size: 1, node: "fd00:42::/96",
			gateway: "fd00:42::1/96", tunnel: "fd00:42::/128",
		},
	}
	for _, tt := range tests {
		c := netip.MustParsePrefix(tt.cluster)
		if got := NodeBits(c); got != tt.bits {
			t.Errorf("NodeBits(%s) = %d, want %d", c, got, tt.bits)
		}
		if got := Size(c); got != tt.size {
			t.Errorf("Size(%s) = %d, want %d", c, got, tt.size)
		}
		last, err := Nth(c, tt.size-1)
		if err != nil || !Contains(c, last) {
			t.Errorf("Nth(%s, %d) = %v, %v; want a node prefix", c, tt.size-1, last, err)
		}
		if _, err := Nth(c, tt.size); !errors.Is(err, ErrExhausted) {
			t.Errorf("Nth(%s, %d): err = %v, want ErrExhausted", c, tt.size, err)
		}
		n := netip.MustParsePrefix(tt.node)
		if !Contains(c, n) {
			t.Errorf("Contains(%s, %s) = false", c, n)
		}
		if got := Gateway(n).String(); got != tt.gateway {
			t.Errorf("Gateway(%s) = %s, want %s", n, got, tt.gateway)
		}
		if got := TunnelAddr(n).String(); got != tt.tunnel {
			t.Errorf("TunnelAddr(%s) = %s, want %s", n, got, tt.tunnel)
		}
		for _, s := range tt.contains {
			if !Contains(c, netip.MustParsePrefix(s)) {
				t.Errorf("Contains(%s, %s) = false, want true", c, s)
			}
		}
		for _, s := range tt.rejects {
			if Contains(c, netip.MustParsePrefix(s)) {
				t.Errorf("Contains(%s, %s) = true, want false", c, s)
			}
		}
	}
}
