package tunnel

import (
	"bytes"
	"strings"
	"testing"
)

func TestRequestRoundTrip(t *testing.T) {
	for _, port := range []int{1, 80, 10251, 65535} {
		b, err := encodeRequest(port)
		if err != nil {
			t.Fatal(err)
		}
		got, err := readRequest(bytes.NewReader(b))
		if err != nil || got != port {
			t.Errorf("port %d: got %d, %v", port, got, err)
		}
	}
	for _, port := range []int{0, -1, 65536} {
		if _, err := encodeRequest(port); err == nil {
			t.Errorf("encodeRequest(%d) succeeded", port)
		}
	}
	for name, b := range map[string][]byte{
		"short":        {'T', 1, 0},
		"magic":        {'X', 1, 0, 80},
		"version":      {'T', 2, 0, 80},
		"port 0":       {'T', 1, 0, 0},
		"empty":        {},
		"http instead": []byte("GET "),
	} {
		if p, err := readRequest(bytes.NewReader(b)); err == nil {
			t.Errorf("%s: parsed %q as port %d", name, b, p)
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
	f.Add([]byte("GET / HTTP/1.1"))
	f.Fuzz(func(t *testing.T, b []byte) {
		port, err := readRequest(bytes.NewReader(b))
		if err != nil {
			return
		}
		if port < 1 || port > 65535 {
			t.Fatalf("accepted port %d", port)
		}
		enc, err := encodeRequest(port)
		if err != nil || !bytes.Equal(enc, b[:requestLen]) {
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
