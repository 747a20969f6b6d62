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
  "Self": {"HostName": "ts1", "UserID": 123, "TailscaleIPs": ["100.64.0.2", "fd7a:115c:a1e0::2"],
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
	if s.Running != want.Running || !slices.Equal(s.Addrs, want.Addrs) || s.LoginName != want.LoginName || !slices.Equal(s.Approved, want.Approved) {
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
