package server

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/internal/api"
)

// TestEncodeNetMapMatchesJSON checks that the hand-written encoding of a
// netmap line is encoding/json's, byte for byte, and that the digest
// ignores the version only.
func TestEncodeNetMapMatchesJSON(t *testing.T) {
	nm := api.NetMap{
		Version:      42,
		Self:         api.Node{Name: "me", PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.42.0.0/24")}, Observations: []api.Observation{{Peer: "a", Handshake: api.HandshakeOK}}},
		ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.42.0.0/16")},
		Peers: []api.Peer{
			{Name: "a", PublicKey: key(1), Endpoint: netip.MustParseAddrPort("203.0.113.1:51820"), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.42.1.0/24"), netip.MustParsePrefix("fd42::/64")}, PersistentKeepalive: 25},
			{Name: "b", PublicKey: key(2), Endpoint: netip.MustParseAddrPort("[2001:db8::1]:51820"), AllowedIPs: []netip.Prefix{}, Via: "r", Reason: `direct handshake failed; "quoted" <&>`},
			{Name: "c", PublicKey: key(3), AllowedIPs: nil, Reason: "ünïcode\u2028\x01"},
		},
		Servers:    []api.Server{{Name: "s1", URL: "https://198.51.100.1:6443"}, {Name: "s2", URL: "https://198.51.100.2:6443"}},
		ServerName: "s1",
	}
	line, ds, err := encodeNetMap(nm, digestBoth)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := json.Marshal(nm)
	if !bytes.Equal(line, append(want, '\n')) {
		t.Fatalf("encoding differs:\n got %s\nwant %s", line, want)
	}
	// The agent's digest of the netmap it decoded is the server's content
	// digest: a resumed stream relies on it.
	var got api.NetMap
	if err := json.Unmarshal(line, &got); err != nil {
		t.Fatal(err)
	}
	if d, err := got.Digest(); err != nil || d != ds.content {
		t.Errorf("agent's digest %x (%v), server's content digest %x", d, err, ds.content)
	}
	nm.Version = 43
	if _, d, _ := encodeNetMap(nm, digestBoth); d != ds {
		t.Error("the digests depend on the version")
	}
	nm.Servers, nm.ServerName = nm.Servers[1:], "s2"
	if _, d, _ := encodeNetMap(nm, digestBoth); d.content != ds.content || d.whole == ds.whole {
		t.Error("the whole digest must see the server list, the content digest must not")
	}
	nm.Peers[0].Endpoint = netip.MustParseAddrPort("203.0.113.9:51820")
	if _, d, _ := encodeNetMap(nm, digestBoth); d.content == ds.content || d.whole == ds.whole {
		t.Error("the digests do not see a new endpoint")
	}
	nm.Peers, nm.Servers, nm.ServerName = nil, nil, ""
	line, ds, _ = encodeNetMap(nm, digestBoth)
	if !bytes.Contains(line, []byte(`"peers":[]`)) {
		t.Errorf("no peers: %s", line)
	}
	if d, err := nm.Digest(); err != nil || d != ds.content {
		t.Errorf("no peers, no servers: agent's digest %x (%v), server's %x", d, err, ds.content)
	}
}

// FuzzAppendPeer compares appendPeer with encoding/json on any peer.
func FuzzAppendPeer(f *testing.F) {
	f.Add("a", []byte{1}, "203.0.113.1:51820", "10.42.1.0/24", 25, "", "")
	f.Add("b<>&\"", []byte{}, "[::1]:1", "", -1, "r", "ü\u2028\xff")
	f.Fuzz(func(t *testing.T, name string, k []byte, ep, prefix string, keepalive int, via, reason string) {
		p := api.Peer{Name: name, PersistentKeepalive: keepalive, Via: via, Reason: reason}
		copy(p.PublicKey[:], k)
		p.Endpoint, _ = netip.ParseAddrPort(ep)
		if pr, err := netip.ParsePrefix(prefix); err == nil {
			p.AllowedIPs = []netip.Prefix{pr, pr}
		} else if strings.HasPrefix(prefix, "e") {
			p.AllowedIPs = []netip.Prefix{}
		}
		want, err := json.Marshal(p)
		if err != nil {
			t.Skip()
		}
		if got := appendPeer(nil, p); !bytes.Equal(got, want) {
			t.Fatalf("appendPeer differs:\n got %s\nwant %s", got, want)
		}
	})
}
