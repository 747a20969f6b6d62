package netconv

import (
	"net"
	"net/netip"
	"testing"
)

func TestPrefix(t *testing.T) {
	for _, c := range []struct {
		n    *net.IPNet
		want string // "" for not ok
	}{
		{nil, ""},
		{&net.IPNet{IP: net.IPv4(10, 42, 0, 1), Mask: net.CIDRMask(24, 32)}, "10.42.0.1/24"}, // 16-byte form of an IPv4 address
		{&net.IPNet{IP: net.IP{10, 42, 0, 1}, Mask: net.CIDRMask(32, 32)}, "10.42.0.1/32"},
		{&net.IPNet{IP: net.ParseIP("fd42::1"), Mask: net.CIDRMask(64, 128)}, "fd42::1/64"},
		{&net.IPNet{IP: net.ParseIP("fd42::1"), Mask: net.CIDRMask(24, 32)}, ""}, // an IPv4 mask on IPv6
		{&net.IPNet{IP: net.IP{10, 42, 0}, Mask: net.CIDRMask(24, 32)}, ""},      // 3 bytes
		{&net.IPNet{IP: net.IP{10, 42, 0, 1}, Mask: net.IPMask{255, 0, 255, 0}}, ""},
		{&net.IPNet{IP: net.IPv4(48, 48, 48, 48), Mask: net.IPMask{255}}, ""}, // found by FuzzPrefix: an 8-bit mask
	} {
		p, ok := Prefix(c.n)
		if got := map[bool]string{true: p.String(), false: ""}[ok]; got != c.want {
			t.Errorf("Prefix(%v) = %q, want %q", c.n, got, c.want)
		}
	}
	if got := Unmap(netip.MustParsePrefix("::ffff:10.42.0.0/112")); got.String() != "10.42.0.0/16" {
		t.Errorf("Unmap = %v", got)
	}
	if got := Unmap(netip.MustParsePrefix("fd42::/64")); got.String() != "fd42::/64" {
		t.Errorf("Unmap changed an IPv6 prefix: %v", got)
	}
}

// FuzzPrefix: whatever netlink hands over converts to a valid prefix or
// is refused, and a valid one converts back to the same net.IPNet form.
func FuzzPrefix(f *testing.F) {
	f.Add([]byte{10, 42, 0, 1}, []byte{255, 255, 255, 0})
	f.Add([]byte(net.ParseIP("fd42::1").To16()), []byte(net.CIDRMask(64, 128)))
	f.Add([]byte(net.IPv4(1, 2, 3, 4)), []byte{255, 255, 255, 255})
	f.Fuzz(func(t *testing.T, ip, mask []byte) {
		p, ok := Prefix(&net.IPNet{IP: ip, Mask: mask})
		if !ok {
			return
		}
		if !p.IsValid() {
			t.Fatalf("Prefix(%v/%v) = invalid %v", ip, mask, p)
		}
		back, ok := Prefix(IPNet(p))
		if !ok || back != p {
			t.Fatalf("round trip of %v: %v, %v", p, back, ok)
		}
		if ones, bits := net.IPMask(mask).Size(); bits == 32 && !p.Addr().Is4() || p.Bits() != ones {
			t.Fatalf("Prefix(%v/%v) = %v: want an IPv4 prefix of %d bits for a 4-byte mask", ip, mask, p, ones)
		}
	})
}
