package tailscale

import (
	"encoding/json"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/internal/vpn"
)

// statusJSON is the shape of `tailscale status --json` (v1.102), trimmed.
const statusJSON = `{
  "BackendState": "Running",
  "TailscaleIPs": ["100.64.0.2", "fd7a:115c:a1e0::2"],
  "Self": {"HostName": "ts1", "UserID": 123, "Tags": ["tag:k8s"], "TailscaleIPs": ["100.64.0.2", "fd7a:115c:a1e0::2"],
    "AllowedIPs": ["100.64.0.2/32", "fd7a:115c:a1e0::2/128", "10.42.0.0/24"], "PrimaryRoutes": ["10.42.0.0/24"]},
  "Peer": {
    "nodekey:aa": {"HostName": "ts2", "UserID": 123, "TailscaleIPs": ["100.64.0.3"], "AllowedIPs": ["100.64.0.3/32", "10.42.2.0/24"]},
    "nodekey:bb": {"HostName": "other", "UserID": 123, "TailscaleIPs": ["100.64.0.4"], "AllowedIPs": ["100.64.0.4/32"], "PrimaryRoutes": ["10.42.0.0/16"]}
  },
  "User": {"123": {"ID": 123, "LoginName": "ops@example.com"}}
}`

func TestStatusState(t *testing.T) {
	var st status
	if err := json.Unmarshal([]byte(statusJSON), &st); err != nil {
		t.Fatal(err)
	}
	s := st.state()
	want := vpn.State{
		Running:   true,
		Addrs:     []netip.Addr{netip.MustParseAddr("100.64.0.2"), netip.MustParseAddr("fd7a:115c:a1e0::2")},
		LoginName: "ops@example.com",
		Approved:  []netip.Prefix{netip.MustParsePrefix("10.42.0.0/24")},
	}
	if s.Running != want.Running || !slices.Equal(s.Addrs, want.Addrs) || s.LoginName != want.LoginName || !slices.Equal(s.Approved, want.Approved) ||
		!slices.Equal(s.Tags, []string{"tag:k8s"}) {
		t.Errorf("state = %+v, want %+v", s, want)
	}
	if len(s.Peers) != 2 || s.Peers[0].Name != "other" || !slices.Equal(s.Peers[0].Routes, []netip.Prefix{netip.MustParsePrefix("10.42.0.0/16")}) ||
		s.Peers[1].Name != "ts2" || !slices.Equal(s.Peers[1].Routes, []netip.Prefix{netip.MustParsePrefix("10.42.2.0/24")}) {
		t.Errorf("peers = %+v", s.Peers)
	}
}

func TestParseRoutes(t *testing.T) {
	got, err := parseRoutes("10.99.3.0/24,10.42.1.0/24\n")
	if err != nil || len(got) != 2 || got[1] != netip.MustParsePrefix("10.42.1.0/24") {
		t.Errorf("parseRoutes = %v, %v", got, err)
	}
	if got, err := parseRoutes("\n"); err != nil || len(got) != 0 {
		t.Errorf("empty: %v, %v", got, err)
	}
	if got, _ := parseRoutes("0.0.0.0/0,::/0,10.0.0.0/8"); len(got) != 1 {
		t.Errorf("exit routes must be left to tailscale: %v", got)
	}
	if _, err := parseRoutes("garbage"); err == nil || !strings.Contains(err.Error(), "garbage") {
		t.Errorf("garbage: %v", err)
	}
}

func TestRedact(t *testing.T) {
	c, err := New(Config{Auth: vpn.Auth{Name: "tailscale", JoinKey: "tskey-abc-SECRET"}})
	if err != nil {
		t.Fatal(err)
	}
	if got := c.redact("backend error: invalid key tskey-abc-SECRET"); strings.Contains(got, "SECRET") {
		t.Errorf("redact = %q", got)
	}
	if _, err := New(Config{Auth: vpn.Auth{Name: "zerotier"}}); err == nil {
		t.Error("New accepted another provider")
	}
}

// filterJSON is what `tailscale debug localapi debug-packet-filter-matches`
// prints (v1.102) for headscale's allow-all policy, trimmed.
const filterJSON = `[
	{
		"IPProto": [6, 17, 1, 58],
		"Srcs": ["0.0.0.0/0", "::/0"],
		"SrcCaps": null,
		"Dsts": [{"Net": "0.0.0.0/0", "Ports": {"First": 0, "Last": 65535}}, {"Net": "::/0", "Ports": {"First": 0, "Last": 65535}}],
		"Caps": []
	}
]`

func TestParseFilterMatches(t *testing.T) {
	rules, err := parseFilterMatches([]byte(filterJSON))
	if err != nil {
		t.Fatal(err)
	}
	if len(rules) != 1 || len(rules[0].Srcs) != 2 || len(rules[0].Dsts) != 2 || rules[0].Dsts[1] != netip.MustParsePrefix("::/0") {
		t.Errorf("rules = %+v", rules)
	}
	for _, empty := range []string{"null", "[]", "null\n"} {
		rules, err := parseFilterMatches([]byte(empty))
		if err != nil || len(rules) != 0 {
			t.Errorf("%q: rules %v, err %v; want none", empty, rules, err)
		}
	}
	for _, bad := range []string{"", "{", `[{"Srcs": ["nonsense"]}]`, "404 page not found"} {
		if _, err := parseFilterMatches([]byte(bad)); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

func TestParseNetmapFilter(t *testing.T) {
	rules, err := parseNetmapFilter([]byte(`{"SelfNode": {"ID": 1}, "PacketFilter": ` + filterJSON + `, "Peers": []}`))
	if err != nil || len(rules) != 1 || len(rules[0].Dsts) != 2 {
		t.Errorf("rules %+v, err %v", rules, err)
	}
	for _, none := range []string{`{"PacketFilter": null}`, `{"PacketFilter": []}`, `{}`} {
		if rules, err := parseNetmapFilter([]byte(none)); err != nil || len(rules) != 0 {
			t.Errorf("%s: rules %v, err %v; want none", none, rules, err)
		}
	}
	for _, bad := range []string{"", "[]", `{"PacketFilter": {}}`, "no netmap"} {
		if _, err := parseNetmapFilter([]byte(bad)); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

func FuzzParseNetmapFilter(f *testing.F) {
	for _, s := range []string{`{"PacketFilter": ` + filterJSON + `}`, `{}`, `{"PacketFilter": null}`, "null", "{"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = parseNetmapFilter(b) // must not panic
	})
}

func FuzzParseFilterMatches(f *testing.F) {
	for _, s := range []string{filterJSON, "null", "[]", `[{"Dsts":[{"Net":"10.0.0.0/8"}]}]`, `[{"Srcs":null,"Dsts":null}]`, "{"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		rules, err := parseFilterMatches(b) // must not panic
		if err != nil {
			return
		}
		for _, r := range rules {
			for _, p := range append(slices.Clone(r.Srcs), r.Dsts...) {
				_ = vpn.Admits(rules, []netip.Prefix{p}, p) // nor may Admits on what it returns
			}
		}
	})
}
