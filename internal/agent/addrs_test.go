package agent

import (
	"net/netip"
	"slices"
	"testing"
)

func TestGoneAddrs(t *testing.T) {
	a := netip.MustParseAddr
	prev := []netip.Addr{a("10.0.0.5"), a("198.51.100.40"), a("2001:db8::5")}
	for _, tc := range []struct {
		name string
		cur  []netip.Addr
		want []netip.Addr
	}{
		{"unchanged", prev, nil},
		{"own addresses added at start (tunnel, bridge)", []netip.Addr{a("10.0.0.5"), a("10.42.3.0"), a("10.42.3.1"), a("198.51.100.40"), a("2001:db8::5")}, nil},
		{"public address replaced", []netip.Addr{a("10.0.0.5"), a("198.51.100.41"), a("2001:db8::5")}, []netip.Addr{a("198.51.100.40")}},
		{"all gone", nil, prev},
	} {
		if got := goneAddrs(prev, tc.cur); !slices.Equal(got, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
		}
	}
}
