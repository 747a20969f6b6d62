package ipam

import (
	"errors"
	"net/netip"
	"testing"
)

func TestNth(t *testing.T) {
	tests := []struct {
		cluster string
		i       uint64
		want    string
		err     bool
	}{
		{"10.42.0.0/16", 0, "10.42.0.0/24", false},
		{"10.42.0.0/16", 1, "10.42.1.0/24", false},
		{"10.42.0.0/16", 255, "10.42.255.0/24", false},
		{"10.42.0.0/16", 256, "", true},
		{"10.42.7.9/16", 3, "10.42.3.0/24", false}, // unmasked input
		{"10.42.0.0/24", 0, "10.42.0.0/24", false},
		{"10.42.0.0/24", 1, "", true},
		{"10.42.0.0/26", 0, "10.42.0.0/26", false}, // smaller than a node prefix
		{"fd00:42::/56", 0, "fd00:42::/64", false},
		{"fd00:42::/56", 1, "fd00:42:0:1::/64", false},
		{"fd00:42::/56", 255, "fd00:42:0:ff::/64", false},
		{"fd00:42::/56", 256, "", true},
		{"2001:cafe:42::/56", 2, "2001:cafe:42:2::/64", false},
		{"fd00::/8", 1 << 31, "fd00:0:8000::/64", false},
	}
	for _, tt := range tests {
		got, err := Nth(netip.MustParsePrefix(tt.cluster), tt.i)
		if tt.err {
			if !errors.Is(err, ErrExhausted) {
				t.Errorf("Nth(%s, %d) err = %v, want ErrExhausted", tt.cluster, tt.i, err)
			}
			continue
		}
		if err != nil || got.String() != tt.want {
			t.Errorf("Nth(%s, %d) = %v, %v; want %s", tt.cluster, tt.i, got, err, tt.want)
		}
	}
}

func TestNext(t *testing.T) {
	c := netip.MustParsePrefix("10.42.0.0/22")
	used := map[netip.Prefix]bool{}
	var got []string
	for i := 0; i < 4; i++ {
		p, err := Next(c, used)
		if err != nil {
			t.Fatal(err)
		}
		used[p] = true
		got = append(got, p.String())
	}
	want := []string{"10.42.0.0/24", "10.42.1.0/24", "10.42.2.0/24", "10.42.3.0/24"}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("allocation order = %v, want %v", got, want)
		}
	}
	if _, err := Next(c, used); !errors.Is(err, ErrExhausted) {
		t.Fatalf("Next on full cluster: err = %v, want ErrExhausted", err)
	}
	// A freed hole is reused first.
	delete(used, netip.MustParsePrefix("10.42.1.0/24"))
	if p, _ := Next(c, used); p.String() != "10.42.1.0/24" {
		t.Fatalf("Next after free = %v, want 10.42.1.0/24", p)
	}
}

func TestContainsGatewayTunnel(t *testing.T) {
	c := netip.MustParsePrefix("10.42.0.0/16")
	for _, tt := range []struct {
		p    string
		want bool
	}{
		{"10.42.3.0/24", true},
		{"10.42.3.0/25", false},
		{"10.42.3.1/24", false},
		{"10.43.0.0/24", false},
		{"10.42.0.0/16", false},
	} {
		if got := Contains(c, netip.MustParsePrefix(tt.p)); got != tt.want {
			t.Errorf("Contains(%s, %s) = %v", c, tt.p, got)
		}
	}
	p := netip.MustParsePrefix("10.42.3.0/24")
	if g := Gateway(p).String(); g != "10.42.3.1/24" {
		t.Errorf("Gateway = %s", g)
	}
	if a := TunnelAddr(p).String(); a != "10.42.3.0/32" {
		t.Errorf("TunnelAddr = %s", a)
	}
	p6 := netip.MustParsePrefix("fd00:42:0:3::/64")
	if g := Gateway(p6).String(); g != "fd00:42:0:3::1/64" {
		t.Errorf("Gateway v6 = %s", g)
	}
	if a := TunnelAddr(p6).String(); a != "fd00:42:0:3::/128" {
		t.Errorf("TunnelAddr v6 = %s", a)
	}
}

func BenchmarkNextHalfFull(b *testing.B) {
	c := netip.MustParsePrefix("10.42.0.0/16")
	used := map[netip.Prefix]bool{}
	for i := uint64(0); i < 128; i++ {
		p, _ := Nth(c, i)
		used[p] = true
	}
	for b.Loop() {
		if _, err := Next(c, used); err != nil {
			b.Fatal(err)
		}
	}
}

func TestNextFromWrapsAround(t *testing.T) {
	c := netip.MustParsePrefix("10.42.0.0/22") // 4 node prefixes
	used := map[netip.Prefix]bool{netip.MustParsePrefix("10.42.3.0/24"): true}
	if p, _ := NextFrom(c, used, 2); p.String() != "10.42.2.0/24" {
		t.Errorf("NextFrom(start 2) = %v", p)
	}
	if p, _ := NextFrom(c, used, 3); p.String() != "10.42.0.0/24" {
		t.Errorf("NextFrom(start 3, taken) = %v, want wrap to 10.42.0.0/24", p)
	}
	if p, _ := NextFrom(c, used, 7); p.String() != "10.42.0.0/24" {
		t.Errorf("NextFrom(start 7 ≡ 3) = %v", p)
	}
	for i := 0; i < 4; i++ {
		p, _ := Nth(c, uint64(i))
		used[p] = true
	}
	if _, err := NextFrom(c, used, 1); !errors.Is(err, ErrExhausted) {
		t.Errorf("full cluster: %v", err)
	}
}
