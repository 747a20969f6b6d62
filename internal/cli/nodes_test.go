package cli

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/api"
)

var testNow = time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)

func testNodes() []api.Node {
	key := api.Key{1}
	return []api.Node{{
		Name: "srv", Roles: []string{api.RoleServer}, PublicKey: key, ListenPort: 51820,
		InternalIPs: []netip.Addr{netip.MustParseAddr("10.1.0.10")},
		ExternalIPs: []netip.Addr{netip.MustParseAddr("198.51.100.10")},
		PodCIDRs:    []netip.Prefix{netip.MustParsePrefix("10.42.0.0/24")},
		CreatedAt:   testNow.Add(-time.Hour), Ready: true,
		Tunnel: &api.TunnelStatus{Connected: true, Since: testNow.Add(-time.Hour)},
	}, {
		Name: "a2", Roles: []string{api.RoleAgent}, PublicKey: api.Key{2}, ListenPort: 51820,
		InternalIPs: []netip.Addr{netip.MustParseAddr("10.2.0.20")},
		PodCIDRs:    []netip.Prefix{netip.MustParsePrefix("10.42.1.0/24")},
		CreatedAt:   testNow.Add(-time.Minute), Ready: true,
		Tunnel: &api.TunnelStatus{Connected: true, Since: testNow.Add(-time.Minute)},
	}, {
		Name: "a3", Roles: []string{api.RoleAgent}, PublicKey: api.Key{3}, ListenPort: 51820,
		PodCIDRs:  []netip.Prefix{netip.MustParsePrefix("10.42.2.0/24")},
		CreatedAt: testNow.Add(-time.Minute),
		Tunnel:    &api.TunnelStatus{Connected: false, Since: testNow.Add(-30 * time.Second)},
	}}
}

func TestPrintNodeListTable(t *testing.T) {
	var b bytes.Buffer
	if err := PrintNodeList(&b, testNodes(), NodeListOptions{Format: FormatTable, Now: testNow}); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 4 {
		t.Fatalf("want a header and 3 rows, got:\n%s", b.String())
	}
	if got := strings.Fields(lines[0]); strings.Join(got, " ") != "NAME ROLES READY TUNNEL INTERNAL-IP EXTERNAL-IP POD-CIDR AGE" {
		t.Errorf("header %q", lines[0])
	}
	if !strings.HasPrefix(lines[3], "a3 ") || !strings.Contains(lines[3], "False") || !strings.Contains(lines[3], "down 30s") {
		t.Errorf("a3's row %q: want not ready, tunnel down 30s", lines[3])
	}
	if strings.Contains(b.String(), "\x1b[") {
		t.Errorf("colour without a terminal:\n%q", b.String())
	}
}

func TestPrintNodeListWide(t *testing.T) {
	wide := map[string]WideInfo{
		"srv": {Self: true},
		"a2": {Known: true, Endpoint: netip.MustParseAddrPort("203.0.113.20:51820"), Path: api.PathDirect,
			HasHandshake: true, Handshake: 12 * time.Second, RTT: 1500 * time.Microsecond, Rx: 2048, Tx: 100},
		// a3 missing: unreachable
	}
	var b bytes.Buffer
	if err := PrintNodeList(&b, testNodes(), NodeListOptions{Format: FormatWide, Now: testNow, Wide: wide}); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	for _, h := range []string{"ENDPOINT", "PATH", "HANDSHAKE", "RTT", "RX", "TX"} {
		if !strings.Contains(lines[0], h) {
			t.Errorf("wide header %q lacks %s", lines[0], h)
		}
	}
	for _, want := range []string{"203.0.113.20:51820", "direct", "12s ago", "1.50ms", "2.0 KiB", "100 B"} {
		if !strings.Contains(lines[2], want) {
			t.Errorf("a2's wide row %q lacks %q", lines[2], want)
		}
	}
	if strings.Count(lines[3], Unknown) != 6 {
		t.Errorf("a3's wide row %q: want %s in the 6 wide columns", lines[3], Unknown)
	}
	if !strings.Contains(lines[1], "self") {
		t.Errorf("srv's row %q: want self", lines[1])
	}
	// Relayed paths name the relay.
	wide["a2"] = WideInfo{Known: true, Path: api.PathRelayed, Via: "srv"}
	b.Reset()
	_ = PrintNodeList(&b, testNodes(), NodeListOptions{Format: FormatWide, Now: testNow, Wide: wide})
	if !strings.Contains(b.String(), "relayed:srv") {
		t.Errorf("want relayed:srv in\n%s", b.String())
	}
}

func TestPrintNodeListColourAligned(t *testing.T) {
	var b bytes.Buffer
	if err := PrintNodeList(&b, testNodes(), NodeListOptions{Format: FormatWide, Colour: true, Now: testNow, Wide: map[string]WideInfo{"srv": {Self: true}}}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), colGreen+"True"+colReset) || !strings.Contains(b.String(), colRed+"False"+colReset) {
		t.Fatalf("want READY in green and red:\n%q", b.String())
	}
	// Every coloured cell carries codes of the same length: the columns
	// after them line up once the codes are removed.
	plain := strings.NewReplacer(colGreen, "", colRed, "", colYellow, "", colDefault, "", colReset, "").Replace(b.String())
	lines := strings.Split(strings.TrimSpace(plain), "\n")
	col := strings.Index(lines[0], "INTERNAL-IP")
	for _, l := range lines[1:] {
		if len(l) <= col || l[col-1] != ' ' || l[col] == ' ' {
			t.Errorf("column INTERNAL-IP (at %d) is not aligned in %q", col, l)
		}
	}
}

func TestIsTerminalNotForFilesAndBuffers(t *testing.T) {
	if IsTerminal(&bytes.Buffer{}) {
		t.Error("a buffer is not a terminal")
	}
	f, err := os.Create(filepath.Join(t.TempDir(), "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if IsTerminal(f) {
		t.Error("a regular file is not a terminal")
	}
	if tty, err := os.OpenFile("/dev/tty", os.O_WRONLY, 0); err == nil {
		defer tty.Close()
		t.Setenv("NO_COLOR", "")
		if !IsTerminal(tty) {
			t.Error("/dev/tty is a terminal")
		}
		t.Setenv("NO_COLOR", "1")
		if IsTerminal(tty) {
			t.Error("NO_COLOR turns colour off")
		}
	}
}

func TestPrintNodeListJSONAndYAMLParseBack(t *testing.T) {
	nodes := testNodes()
	for _, format := range []string{FormatJSON, FormatYAML} {
		var b bytes.Buffer
		if err := PrintNodeList(&b, nodes, NodeListOptions{Format: format, Now: testNow}); err != nil {
			t.Fatal(err)
		}
		var back []api.Node
		var err error
		if format == FormatJSON {
			err = json.Unmarshal(b.Bytes(), &back)
		} else {
			err = yaml.UnmarshalStrict(b.Bytes(), &back)
		}
		if err != nil {
			t.Fatalf("%s does not parse back: %v\n%s", format, err, b.String())
		}
		if len(back) != 3 || back[0].Name != "srv" || back[0].PodCIDRs[0] != nodes[0].PodCIDRs[0] || back[2].Tunnel.Connected || back[0].PublicKey != nodes[0].PublicKey {
			t.Errorf("%s round trip: got %+v", format, back)
		}
	}
	if err := PrintNodeList(&bytes.Buffer{}, nodes, NodeListOptions{Format: "xml"}); err == nil || !strings.Contains(err.Error(), "yaml") {
		t.Errorf("unknown format: want an error listing the formats, got %v", err)
	}
}

func TestWatchKeyIgnoresCounters(t *testing.T) {
	nodes := testNodes()
	a := map[string]WideInfo{"a2": {Known: true, Path: api.PathDirect, Rx: 1, HasHandshake: true, Handshake: time.Second, RTT: time.Millisecond}}
	b := map[string]WideInfo{"a2": {Known: true, Path: api.PathDirect, Rx: 99, HasHandshake: true, Handshake: 9 * time.Second, RTT: 2 * time.Millisecond}}
	if WatchKey(nodes, a, FormatWide) != WatchKey(nodes, b, FormatWide) {
		t.Error("traffic, handshake ages and round trips must not count as a change")
	}
	c := map[string]WideInfo{"a2": {Known: true, Path: api.PathRelayed, Via: "srv"}}
	if WatchKey(nodes, a, FormatWide) == WatchKey(nodes, c, FormatWide) {
		t.Error("a path change is a change")
	}
	nodes2 := testNodes()
	nodes2[2].Ready = true
	if WatchKey(nodes, nil, FormatTable) == WatchKey(nodes2, nil, FormatTable) {
		t.Error("readiness is a change")
	}
	// What the table does not show is no change for a table, but is for
	// JSON.
	nodes3 := testNodes()
	nodes3[1].UpdatedAt = testNow
	nodes3[1].Observations = []api.Observation{{Peer: "srv", Handshake: api.HandshakeOK}}
	if WatchKey(nodes, nil, FormatTable) != WatchKey(nodes3, nil, FormatTable) {
		t.Error("a table does not show observations: no change")
	}
	if WatchKey(nodes, nil, FormatJSON) == WatchKey(nodes3, nil, FormatJSON) {
		t.Error("JSON shows observations: a change")
	}
}

func TestProbeTarget(t *testing.T) {
	n := testNodes()[1]
	if a, _ := ProbeTarget(n); a != netip.MustParseAddr("10.42.1.0") {
		t.Errorf("WireGuard node: want its tunnel address 10.42.1.0, got %s", a)
	}
	n.PublicKey = api.Key{}
	n.VPN = &api.VPNStatus{Provider: "tailscale"}
	n.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("fd00:42::/64"), netip.MustParsePrefix("10.42.1.0/24")}
	if a, _ := ProbeTarget(n); a != netip.MustParseAddr("10.42.1.1") {
		t.Errorf("VPN node: want its bridge address 10.42.1.1 (IPv4 first), got %s", a)
	}
	n.PodCIDRs = nil
	if _, ok := ProbeTarget(n); ok {
		t.Error("a node without a pod CIDR has no target")
	}
}
