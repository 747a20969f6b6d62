package api

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"
)

func names(peers []Peer) string {
	var out []string
	for _, p := range peers {
		out = append(out, p.Name+"@"+p.Via)
	}
	return strings.Join(out, ",")
}

func TestNetMapApply(t *testing.T) {
	base := NetMap{Version: 5, Self: Node{Name: "me"}, Peers: []Peer{{Name: "b"}, {Name: "d"}, {Name: "f"}}, ServerName: "s1"}
	tests := []struct {
		name  string
		delta NetMapDelta
		want  string
		err   bool
	}{
		{"add between and at both ends", NetMapDelta{Base: 5, Version: 6, PeersChanged: []Peer{{Name: "g"}, {Name: "a"}, {Name: "c"}}}, "a@,b@,c@,d@,f@,g@", false},
		{"change and remove", NetMapDelta{Base: 5, Version: 7, PeersChanged: []Peer{{Name: "d", Via: "r"}}, PeersRemoved: []string{"b", "f", "zz"}}, "d@r", false},
		{"remove all", NetMapDelta{Base: 5, Version: 6, PeersRemoved: []string{"b", "d", "f"}}, "", false},
		{"same version (readiness only)", NetMapDelta{Base: 5, Version: 5}, "b@,d@,f@", false},
		{"duplicate changes keep the first", NetMapDelta{Base: 5, Version: 6, PeersChanged: []Peer{{Name: "x", Via: "1"}, {Name: "x", Via: "2"}}}, "b@,d@,f@,x@1", false},
		{"wrong base", NetMapDelta{Base: 4, Version: 6}, "", true},
		{"going back", NetMapDelta{Base: 5, Version: 4}, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := base.Apply(tt.delta)
			if (err != nil) != tt.err {
				t.Fatalf("err = %v, want error %v", err, tt.err)
			}
			if err != nil {
				if !strings.Contains(err.Error(), "does not apply") {
					t.Fatalf("error %q does not say what is wrong", err)
				}
				return
			}
			if names(got.Peers) != tt.want {
				t.Fatalf("peers = %s, want %s", names(got.Peers), tt.want)
			}
			if got.Version != tt.delta.Version || got.Self.Name != "me" {
				t.Fatalf("version %d self %q", got.Version, got.Self.Name)
			}
		})
	}
	if names(base.Peers) != "b@,d@,f@" {
		t.Fatalf("Apply modified its receiver: %s", names(base.Peers))
	}
	self := Node{Name: "me", ExternalIPs: nil, ListenPort: 7}
	got, err := base.Apply(NetMapDelta{Base: 5, Version: 6, Self: &self, ServerName: "s2"})
	if err != nil || got.Self.ListenPort != 7 || got.ServerName != "s2" {
		t.Fatalf("self/server not taken: %+v, %v", got, err)
	}
}

// FuzzNetMapApply decodes a whole netmap line and a delta line as an agent
// does and applies one to the other: nothing may panic, and the result
// must hold every changed peer once, no removed one, and stay sorted.
func FuzzNetMapApply(f *testing.F) {
	f.Add([]byte(`{"version":3,"peers":[{"name":"a"},{"name":"c"}]}`), []byte(`{"delta":{"version":4,"base":3,"peersChanged":[{"name":"b"}],"peersRemoved":["c"]}}`))
	f.Add([]byte(`{"version":0}`), []byte(`{"delta":{"version":0,"base":0,"self":{"name":"x"}}}`))
	f.Add([]byte(`{"version":1,"peers":[{"name":"a"}]}`), []byte(`{"delta":{"version":9,"base":1,"peersChanged":[{"name":"a"},{"name":"a"}],"peersRemoved":["a"]}}`))
	f.Fuzz(func(t *testing.T, full, delta []byte) {
		var first, next NetMapLine
		if json.Unmarshal(full, &first) != nil || json.Unmarshal(delta, &next) != nil || next.Delta == nil {
			return
		}
		// Agents only hold what a server sent: sorted, unique names.
		nm := first.NetMap
		slices.SortFunc(nm.Peers, func(a, b Peer) int { return strings.Compare(a.Name, b.Name) })
		nm.Peers = slices.CompactFunc(nm.Peers, func(a, b Peer) bool { return a.Name == b.Name })
		got, err := nm.Apply(*next.Delta)
		if err != nil {
			return
		}
		if !slices.IsSortedFunc(got.Peers, func(a, b Peer) int { return strings.Compare(a.Name, b.Name) }) {
			t.Fatalf("peers not sorted: %s", names(got.Peers))
		}
		seen := map[string]bool{}
		for _, p := range got.Peers {
			if seen[p.Name] {
				t.Fatalf("peer %q twice", p.Name)
			}
			seen[p.Name] = true
		}
		for _, p := range next.Delta.PeersChanged {
			if !seen[p.Name] {
				t.Fatalf("changed peer %q missing", p.Name)
			}
		}
		changed := map[string]bool{}
		for _, p := range next.Delta.PeersChanged {
			changed[p.Name] = true
		}
		for _, name := range next.Delta.PeersRemoved {
			if seen[name] && !changed[name] {
				t.Fatalf("removed peer %q still there", name)
			}
		}
	})
}

func TestHaveRoundTrip(t *testing.T) {
	nm := NetMap{Version: 12, Self: Node{Name: "a"}, Peers: []Peer{{Name: "b"}}}
	d, err := nm.Digest()
	if err != nil {
		t.Fatal(err)
	}
	v, got, err := ParseHave(FormatHave(nm.Version, d))
	if err != nil || v != 12 || got != d {
		t.Fatalf("ParseHave(FormatHave) = %d, %x, %v", v, got, err)
	}
	// The digest sees content, not the version or the server list.
	nm2 := nm
	nm2.Version, nm2.Servers, nm2.ServerName = 99, []Server{{Name: "s"}}, "s"
	if d2, _ := nm2.Digest(); d2 != d {
		t.Error("the digest depends on the version or the servers")
	}
	nm2.Peers = []Peer{{Name: "c"}}
	if d2, _ := nm2.Digest(); d2 == d {
		t.Error("the digest does not see the peers")
	}
	for _, bad := range []string{"", "12", "12.", "x.00", "-1." + strings.Repeat("0", 64), "1." + strings.Repeat("0", 63), "1." + strings.Repeat("g", 64)} {
		if _, _, err := ParseHave(bad); err == nil || !strings.Contains(err.Error(), NetmapHaveParam) {
			t.Errorf("ParseHave(%q) = %v, want an error naming the parameter", bad, err)
		}
	}
}

func FuzzParseHave(f *testing.F) {
	f.Add("12." + strings.Repeat("ab", 32))
	f.Add("0." + strings.Repeat("0", 64))
	f.Add("x")
	f.Add("9223372036854775808." + strings.Repeat("0", 64))
	f.Fuzz(func(t *testing.T, s string) {
		v, d, err := ParseHave(s)
		if err != nil {
			return
		}
		if v < 0 {
			t.Fatalf("negative version %d from %q", v, s)
		}
		v2, d2, err := ParseHave(FormatHave(v, d))
		if err != nil || v2 != v || d2 != d {
			t.Fatalf("round trip of %q: %d %x %v", s, v2, d2, err)
		}
	})
}
