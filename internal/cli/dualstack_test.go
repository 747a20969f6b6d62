package cli

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
)

// TestPrintNodesDualStack checks that both address families show in the
// table and survive the JSON form.
func TestPrintNodesDualStack(t *testing.T) {
	now := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	nodes := []api.Node{{
		Name:        "cloud1",
		Roles:       []string{api.RoleServer},
		InternalIPs: []netip.Addr{netip.MustParseAddr("10.1.0.10"), netip.MustParseAddr("fd01::10")},
		ExternalIPs: []netip.Addr{netip.MustParseAddr("198.51.100.10"), netip.MustParseAddr("2001:db8:1::10")},
		PodCIDRs:    []netip.Prefix{netip.MustParsePrefix("10.42.0.0/24"), netip.MustParsePrefix("fd00:42::/64")},
		CreatedAt:   now.Add(-time.Hour),
		Ready:       true,
	}, {
		Name:        "v6only",
		Roles:       []string{api.RoleAgent},
		InternalIPs: []netip.Addr{netip.MustParseAddr("2001:db8:3::30")},
		PodCIDRs:    []netip.Prefix{netip.MustParsePrefix("10.42.1.0/24"), netip.MustParsePrefix("fd00:42:0:1::/64")},
		CreatedAt:   now.Add(-time.Minute),
	}}
	var b bytes.Buffer
	if err := PrintNodes(&b, nodes, "table", now); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("table has %d lines, want a header and 2 nodes:\n%s", len(lines), b.String())
	}
	for _, want := range []string{"10.1.0.10,fd01::10", "198.51.100.10,2001:db8:1::10", "10.42.0.0/24,fd00:42::/64"} {
		if !strings.Contains(lines[1], want) {
			t.Errorf("cloud1's line %q lacks %s", lines[1], want)
		}
	}
	for _, want := range []string{"2001:db8:3::30", "<none>", "10.42.1.0/24,fd00:42:0:1::/64"} {
		if !strings.Contains(lines[2], want) {
			t.Errorf("v6only's line %q lacks %s", lines[2], want)
		}
	}

	b.Reset()
	if err := PrintNodes(&b, nodes, "json", now); err != nil {
		t.Fatal(err)
	}
	var back []api.Node
	if err := json.Unmarshal(b.Bytes(), &back); err != nil {
		t.Fatalf("JSON output does not parse: %v\n%s", err, b.String())
	}
	for i := range nodes {
		if !reflect.DeepEqual(back[i].InternalIPs, nodes[i].InternalIPs) || !reflect.DeepEqual(back[i].ExternalIPs, nodes[i].ExternalIPs) ||
			!reflect.DeepEqual(back[i].PodCIDRs, nodes[i].PodCIDRs) {
			t.Errorf("node %s after JSON: %+v", nodes[i].Name, back[i])
		}
	}
	if !strings.Contains(b.String(), `"fd00:42::/64"`) || !strings.Contains(b.String(), `"2001:db8:1::10"`) {
		t.Errorf("JSON lacks the IPv6 values in their text form:\n%s", b.String())
	}
}
