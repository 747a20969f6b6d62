package mesh

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func key(b byte) [32]byte { return [32]byte{0: b, 31: 1} }

func pfx(s ...string) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(s))
	for _, x := range s {
		out = append(out, netip.MustParsePrefix(x))
	}
	return out
}

// ipnets builds wgctrl allowed IPs the way the kernel reports them.
func ipnets(s ...string) []net.IPNet {
	out := make([]net.IPNet, 0, len(s))
	for _, x := range s {
		_, n, err := net.ParseCIDR(x)
		if err != nil {
			panic(err)
		}
		out = append(out, *n)
	}
	return out
}

// ipnets16 is like ipnets with IPv4 addresses in 16-byte form.
func ipnets16(s ...string) []net.IPNet {
	out := ipnets(s...)
	for i := range out {
		out[i].IP = out[i].IP.To16()
	}
	return out
}

func udp(s string) *net.UDPAddr { return net.UDPAddrFromAddrPort(netip.MustParseAddrPort(s)) }

func udp16(s string) *net.UDPAddr {
	u := udp(s)
	u.IP = u.IP.To16()
	return u
}

func dur(d time.Duration) *time.Duration { return &d }

func TestDiff(t *testing.T) {
	a, b, c, d := key(1), key(2), key(3), key(4)
	wk := func(k [32]byte) wgtypes.Key { return wgtypes.Key(k) }
	curA := wgtypes.Peer{
		PublicKey:                   wk(a),
		Endpoint:                    udp("192.0.2.1:51820"),
		PersistentKeepaliveInterval: 25 * time.Second,
		AllowedIPs:                  ipnets("10.42.0.0/24", "fd00:42::/64"),
		LastHandshakeTime:           time.Unix(1000, 0),
		ReceiveBytes:                10,
	}
	desA := Peer{
		PublicKey:           a,
		Endpoint:            netip.MustParseAddrPort("192.0.2.1:51820"),
		PersistentKeepalive: 25 * time.Second,
		AllowedIPs:          pfx("fd00:42::/64", "10.42.0.0/24"),
	}
	tests := []struct {
		name    string
		current []wgtypes.Peer
		desired []Peer
		want    []wgtypes.PeerConfig
	}{
		{name: "nothing"},
		{
			name:    "add new peer with canonical allowed IPs",
			desired: []Peer{{PublicKey: b, Endpoint: netip.MustParseAddrPort("198.51.100.2:51820"), PersistentKeepalive: 25 * time.Second, AllowedIPs: pfx("10.42.1.7/24", "10.42.1.0/24", "::ffff:10.43.0.0/112")}},
			want: []wgtypes.PeerConfig{{
				PublicKey: wk(b), Endpoint: udp("198.51.100.2:51820"), PersistentKeepaliveInterval: dur(25 * time.Second),
				ReplaceAllowedIPs: true, AllowedIPs: ipnets("10.42.1.0/24", "10.43.0.0/16"),
			}},
		},
		{
			name:    "add peer without endpoint or keepalive",
			desired: []Peer{{PublicKey: b, AllowedIPs: pfx("10.42.1.0/24")}},
			want:    []wgtypes.PeerConfig{{PublicKey: wk(b), ReplaceAllowedIPs: true, AllowedIPs: ipnets("10.42.1.0/24")}},
		},
		{
			name:    "unchanged peer is not touched",
			current: []wgtypes.Peer{curA},
			desired: []Peer{desA},
		},
		{
			name: "unchanged peer reported in 16-byte form and another order",
			current: []wgtypes.Peer{{
				PublicKey: wk(a), Endpoint: udp16("192.0.2.1:51820"), PersistentKeepaliveInterval: 25 * time.Second,
				AllowedIPs: ipnets16("fd00:42::/64", "10.42.0.0/24"),
			}},
			desired: []Peer{desA},
		},
		{
			name:    "no desired endpoint keeps the learned one",
			current: []wgtypes.Peer{curA},
			desired: []Peer{{PublicKey: a, PersistentKeepalive: 25 * time.Second, AllowedIPs: desA.AllowedIPs}},
		},
		{
			name:    "endpoint changed",
			current: []wgtypes.Peer{curA},
			desired: []Peer{{PublicKey: a, Endpoint: netip.MustParseAddrPort("203.0.113.9:51821"), PersistentKeepalive: 25 * time.Second, AllowedIPs: desA.AllowedIPs}},
			want:    []wgtypes.PeerConfig{{PublicKey: wk(a), UpdateOnly: true, Endpoint: udp("203.0.113.9:51821")}},
		},
		{
			name:    "keepalive turned off",
			current: []wgtypes.Peer{curA},
			desired: []Peer{{PublicKey: a, Endpoint: desA.Endpoint, AllowedIPs: desA.AllowedIPs}},
			want:    []wgtypes.PeerConfig{{PublicKey: wk(a), UpdateOnly: true, PersistentKeepaliveInterval: dur(0)}},
		},
		{
			name:    "allowed IPs changed are replaced in full",
			current: []wgtypes.Peer{curA},
			desired: []Peer{{PublicKey: a, Endpoint: desA.Endpoint, PersistentKeepalive: 25 * time.Second, AllowedIPs: pfx("10.42.0.0/24")}},
			want:    []wgtypes.PeerConfig{{PublicKey: wk(a), UpdateOnly: true, ReplaceAllowedIPs: true, AllowedIPs: ipnets("10.42.0.0/24")}},
		},
		{
			name:    "allowed IPs emptied",
			current: []wgtypes.Peer{curA},
			desired: []Peer{{PublicKey: a, Endpoint: desA.Endpoint, PersistentKeepalive: 25 * time.Second}},
			want:    []wgtypes.PeerConfig{{PublicKey: wk(a), UpdateOnly: true, ReplaceAllowedIPs: true, AllowedIPs: []net.IPNet{}}},
		},
		{
			name:    "peer no longer desired is removed",
			current: []wgtypes.Peer{curA},
			want:    []wgtypes.PeerConfig{{PublicKey: wk(a), Remove: true}},
		},
		{
			name: "mixed: keep, update, add, remove",
			current: []wgtypes.Peer{
				{PublicKey: wk(c), AllowedIPs: ipnets("10.42.3.0/24")},
				curA,
				{PublicKey: wk(b), AllowedIPs: ipnets("10.42.2.0/24")},
			},
			desired: []Peer{
				{PublicKey: d, AllowedIPs: pfx("10.42.4.0/24")},
				desA,
				{PublicKey: b, AllowedIPs: pfx("10.42.2.0/24", "10.42.9.0/24")},
			},
			want: []wgtypes.PeerConfig{
				{PublicKey: wk(d), ReplaceAllowedIPs: true, AllowedIPs: ipnets("10.42.4.0/24")},
				{PublicKey: wk(b), UpdateOnly: true, ReplaceAllowedIPs: true, AllowedIPs: ipnets("10.42.2.0/24", "10.42.9.0/24")},
				{PublicKey: wk(c), Remove: true},
			},
		},
		{
			name:    "duplicate desired key: last wins",
			desired: []Peer{{PublicKey: b, AllowedIPs: pfx("10.42.1.0/24")}, {PublicKey: b, AllowedIPs: pfx("10.42.2.0/24")}},
			want:    []wgtypes.PeerConfig{{PublicKey: wk(b), ReplaceAllowedIPs: true, AllowedIPs: ipnets("10.42.2.0/24")}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Diff(tt.current, tt.desired)
			if got.PrivateKey != nil || got.ListenPort != nil || got.FirewallMark != nil || got.ReplacePeers {
				t.Errorf("Diff touched device-wide settings: %+v", got)
			}
			if !reflect.DeepEqual(got.Peers, tt.want) {
				t.Errorf("Diff:\n got %s\nwant %s", fmtPeers(got.Peers), fmtPeers(tt.want))
			}
		})
	}
}

func fmtPeers(ps []wgtypes.PeerConfig) string {
	var b strings.Builder
	for _, p := range ps {
		fmt.Fprintf(&b, "\n  {key=%x remove=%v updateOnly=%v ep=%v ka=", p.PublicKey[:1], p.Remove, p.UpdateOnly, p.Endpoint)
		if p.PersistentKeepaliveInterval != nil {
			fmt.Fprint(&b, *p.PersistentKeepaliveInterval)
		} else {
			b.WriteString("nil")
		}
		fmt.Fprintf(&b, " replace=%v allowed=%v(nil=%v)}", p.ReplaceAllowedIPs, p.AllowedIPs, p.AllowedIPs == nil)
	}
	if len(ps) == 0 {
		return "[]"
	}
	return b.String()
}

// TestDiffConverges applies Diff's output to a model of a device and
// checks that a second Diff finds nothing to do.
func TestDiffConverges(t *testing.T) {
	current := []wgtypes.Peer{
		{PublicKey: wgtypes.Key(key(1)), AllowedIPs: ipnets("10.42.1.0/24"), Endpoint: udp("192.0.2.1:1")},
		{PublicKey: wgtypes.Key(key(2)), AllowedIPs: ipnets("10.42.2.0/24")},
	}
	desired := []Peer{
		{PublicKey: key(2), AllowedIPs: pfx("10.42.2.0/24", "fd00:42:0:2::/64"), Endpoint: netip.MustParseAddrPort("[2001:db8::2]:51820")},
		{PublicKey: key(3), AllowedIPs: pfx("10.42.3.0/24"), PersistentKeepalive: 25 * time.Second},
	}
	applied := apply(current, Diff(current, desired))
	if again := Diff(applied, desired); len(again.Peers) != 0 {
		t.Fatalf("second Diff is not empty: %s", fmtPeers(again.Peers))
	}
}

// apply is a minimal model of how WireGuard applies a configuration.
func apply(current []wgtypes.Peer, cfg wgtypes.Config) []wgtypes.Peer {
	out := append([]wgtypes.Peer(nil), current...)
	find := func(k wgtypes.Key) int {
		for i := range out {
			if out[i].PublicKey == k {
				return i
			}
		}
		return -1
	}
	for _, pc := range cfg.Peers {
		i := find(pc.PublicKey)
		if pc.Remove {
			if i >= 0 {
				out = append(out[:i], out[i+1:]...)
			}
			continue
		}
		if i < 0 {
			if pc.UpdateOnly {
				continue
			}
			out = append(out, wgtypes.Peer{PublicKey: pc.PublicKey})
			i = len(out) - 1
		}
		p := &out[i]
		if pc.Endpoint != nil {
			p.Endpoint = pc.Endpoint
		}
		if pc.PersistentKeepaliveInterval != nil {
			p.PersistentKeepaliveInterval = *pc.PersistentKeepaliveInterval
		}
		if pc.ReplaceAllowedIPs {
			p.AllowedIPs = nil
		}
		p.AllowedIPs = append(p.AllowedIPs, pc.AllowedIPs...)
	}
	return out
}

func TestValidatePeers(t *testing.T) {
	own := key(9)
	ok := Peer{PublicKey: key(1), AllowedIPs: pfx("10.42.1.0/24")}
	tests := []struct {
		name  string
		peers []Peer
		want  string
	}{
		{"fine", []Peer{ok, {PublicKey: key(2)}}, ""},
		{"zero key", []Peer{{}}, "no public key"},
		{"own key", []Peer{{PublicKey: own}}, "own public key"},
		{"duplicate", []Peer{ok, ok}, "listed twice"},
		{"negative keepalive", []Peer{{PublicKey: key(1), PersistentKeepalive: -time.Second}}, "keepalive"},
		{"endpoint without port", []Peer{{PublicKey: key(1), Endpoint: netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), 0)}}, "no port"},
		{"invalid prefix", []Peer{{PublicKey: key(1), AllowedIPs: []netip.Prefix{{}}}}, "not a valid prefix"},
	}
	for _, tt := range tests {
		err := validatePeers(own, tt.peers)
		if tt.want == "" && err != nil || tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)) {
			t.Errorf("%s: validatePeers = %v, want %q", tt.name, err, tt.want)
		}
	}
}

func BenchmarkDiff(b *testing.B) {
	const n = 500
	current := make([]wgtypes.Peer, n)
	desired := make([]Peer, n)
	for i := range n {
		k := [32]byte{0: byte(i), 1: byte(i >> 8), 31: 1}
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 42, byte(i >> 8), byte(i)}), 32)
		current[i] = wgtypes.Peer{PublicKey: k, AllowedIPs: ipNets([]netip.Prefix{p}), Endpoint: udp("192.0.2.1:51820")}
		desired[i] = Peer{PublicKey: k, AllowedIPs: []netip.Prefix{p}, Endpoint: netip.MustParseAddrPort("192.0.2.1:51820")}
	}
	desired[n/2].Endpoint = netip.MustParseAddrPort("192.0.2.2:51820")
	b.ReportAllocs()
	for b.Loop() {
		if cfg := Diff(current, desired); len(cfg.Peers) != 1 {
			b.Fatalf("got %d changes, want 1", len(cfg.Peers))
		}
	}
}

// TestPeersMatchAgreesWithDiff checks PeersMatch against Diff on random
// devices and desired peer sets: they match exactly when Diff changes
// nothing.
func TestPeersMatchAgreesWithDiff(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	eps := []netip.AddrPort{{}, netip.MustParseAddrPort("192.0.2.1:51820"), netip.MustParseAddrPort("[2001:db8::1]:51820"), netip.MustParseAddrPort("192.0.2.1:1")}
	ips := [][]netip.Prefix{nil, pfx("10.42.1.0/24"), pfx("10.42.1.0/24", "fd00:42:0:1::/64"), pfx("10.42.2.0/24")}
	kas := []time.Duration{0, 25 * time.Second}
	randPeer := func() Peer {
		return Peer{PublicKey: key(byte(1 + rng.IntN(4))), Endpoint: eps[rng.IntN(len(eps))], AllowedIPs: ips[rng.IntN(len(ips))], PersistentKeepalive: kas[rng.IntN(2)]}
	}
	matched := 0
	for range 20000 {
		var desired []Peer
		seen := map[[32]byte]bool{}
		for range rng.IntN(4) {
			if p := randPeer(); !seen[p.PublicKey] {
				seen[p.PublicKey] = true
				desired = append(desired, p)
			}
		}
		// The device: the desired peers, each maybe changed, maybe one more.
		var cur []wgtypes.Peer
		var st []PeerStatus
		for _, d := range desired {
			if rng.IntN(5) == 0 {
				continue
			}
			c := d
			if rng.IntN(3) == 0 {
				r := randPeer()
				c.Endpoint, c.AllowedIPs, c.PersistentKeepalive = r.Endpoint, r.AllowedIPs, r.PersistentKeepalive
			}
			cur = append(cur, wgtypes.Peer{PublicKey: c.PublicKey, Endpoint: udpAddr(c.Endpoint), AllowedIPs: ipNets(c.AllowedIPs), PersistentKeepaliveInterval: c.PersistentKeepalive})
			st = append(st, PeerStatus{PublicKey: c.PublicKey, Endpoint: c.Endpoint, AllowedIPs: canonicalPrefixes(c.AllowedIPs), PersistentKeepalive: c.PersistentKeepalive})
		}
		if rng.IntN(5) == 0 {
			extra := Peer{PublicKey: key(9), AllowedIPs: pfx("10.42.9.0/24")}
			cur = append(cur, wgtypes.Peer{PublicKey: extra.PublicKey, AllowedIPs: ipNets(extra.AllowedIPs)})
			st = append(st, PeerStatus{PublicKey: extra.PublicKey, AllowedIPs: extra.AllowedIPs})
		}
		want := len(Diff(cur, desired).Peers) == 0
		if got := PeersMatch(st, desired); got != want {
			t.Fatalf("PeersMatch = %v, Diff changes nothing = %v\ndevice %+v\ndesired %+v", got, want, st, desired)
		}
		if want {
			matched++
		}
	}
	t.Logf("%d of 20000 cases matched", matched)
}
