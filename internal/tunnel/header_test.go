package tunnel

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"
)

func TestRequestRoundTrip(t *testing.T) {
	for _, addr := range []netip.Addr{{}, netip.MustParseAddr("10.1.0.5"), netip.MustParseAddr("2001:db8::5"), netip.MustParseAddr("::ffff:10.1.0.5")} {
		for _, port := range []int{1, 80, 10250, 65535} {
			b, err := encodeRequest(addr, port)
			if err != nil {
				t.Fatal(err)
			}
			gotAddr, got, err := readRequest(bytes.NewReader(b))
			if err != nil || got != port || gotAddr != addr.Unmap() {
				t.Errorf("%v port %d: got %v %d, %v", addr, port, gotAddr, got, err)
			}
		}
	}
	if b, _ := encodeRequest(netip.Addr{}, 80); b[1] != requestLoopback {
		t.Errorf("a loopback request is version %d, want %d (what older agents read)", b[1], requestLoopback)
	}
	for _, port := range []int{0, -1, 65536} {
		if _, err := encodeRequest(netip.Addr{}, port); err == nil {
			t.Errorf("encodeRequest(%d) succeeded", port)
		}
	}
	if _, err := encodeRequest(netip.MustParseAddr("fe80::1%eth0"), 80); err == nil {
		t.Error("an address with a zone was encoded")
	}
	for name, b := range map[string][]byte{
		"short":            {'T', 1, 0},
		"magic":            {'X', 1, 0, 80},
		"version":          {'T', 3, 0, 80},
		"port 0":           {'T', 1, 0, 0},
		"no family":        {'T', 2, 0, 80},
		"bad family":       {'T', 2, 0, 80, 5, 1, 2, 3, 4},
		"short address":    {'T', 2, 0, 80, 4, 10, 1},
		"short IPv6":       {'T', 2, 0, 80, 6, 0x20, 1, 0xd, 0xb8},
		"IPv4-mapped IPv6": append([]byte{'T', 2, 0, 80, 6}, netip.MustParseAddr("::ffff:10.1.0.5").AsSlice()...),
		"empty":            {},
		"http instead":     []byte("GET "),
	} {
		if a, p, err := readRequest(bytes.NewReader(b)); err == nil {
			t.Errorf("%s: parsed %q as %v port %d", name, b, a, p)
		}
	}
}

func TestReplyRoundTrip(t *testing.T) {
	long := strings.Repeat("x", 2*maxReplyMessage)
	for _, tc := range []struct {
		s   Status
		msg string
	}{{StatusOK, ""}, {StatusNotAllowed, "use --tunnel-allow-port=80"}, {StatusUnreachable, long}} {
		s, msg, err := readReply(bytes.NewReader(encodeReply(tc.s, tc.msg)))
		if err != nil {
			t.Fatal(err)
		}
		want := tc.msg
		if len(want) > maxReplyMessage {
			want = want[:maxReplyMessage]
		}
		if s != tc.s || msg != want {
			t.Errorf("got %v %q, want %v %q", s, msg, tc.s, want)
		}
	}
	for name, b := range map[string][]byte{
		"short":      {0, 0},
		"truncated":  {1, 0, 5, 'a'},
		"too long":   {1, 0xff, 0xff},
		"bad status": {9, 0, 0},
		"not utf8":   {1, 0, 1, 0xff},
	} {
		if _, _, err := readReply(bytes.NewReader(b)); err == nil {
			t.Errorf("%s: readReply accepted %v", name, b)
		}
	}
}

func FuzzReadRequest(f *testing.F) {
	f.Add([]byte{'T', 1, 0x27, 0x1b})
	f.Add([]byte{'T', 1, 0, 0})
	f.Add([]byte{'T', 2, 0x28, 0x0a, 4, 10, 1, 0, 5})
	f.Add(append([]byte{'T', 2, 0x28, 0x0a, 6}, netip.MustParseAddr("2001:db8::5").AsSlice()...))
	f.Add([]byte("GET / HTTP/1.1"))
	f.Fuzz(func(t *testing.T, b []byte) {
		addr, port, err := readRequest(bytes.NewReader(b))
		if err != nil {
			return
		}
		if port < 1 || port > 65535 {
			t.Fatalf("accepted port %d", port)
		}
		if addr.IsValid() && (addr.Is4In6() || addr.Zone() != "") {
			t.Fatalf("accepted address %v", addr)
		}
		enc, err := encodeRequest(addr, port)
		if err != nil || !bytes.HasPrefix(b, enc) {
			t.Fatalf("round trip of %v: %v, %v", b, enc, err)
		}
	})
}

func FuzzReadReply(f *testing.F) {
	f.Add(encodeReply(StatusOK, ""))
	f.Add(encodeReply(StatusNotAllowed, "port 22 is not open"))
	f.Add([]byte{1, 0xff, 0xff, 'a'})
	f.Fuzz(func(t *testing.T, b []byte) {
		s, msg, err := readReply(bytes.NewReader(b))
		if err != nil {
			return
		}
		if s > StatusBadRequest || len(msg) > maxReplyMessage {
			t.Fatalf("accepted status %d, message of %d bytes", s, len(msg))
		}
		if enc := encodeReply(s, msg); !bytes.HasPrefix(b, enc) {
			t.Fatalf("round trip of %v gave %v", b, enc)
		}
	})
}
