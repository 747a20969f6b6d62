package client

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/trellis-mesh/trellis/internal/api"
)

func TestParseError(t *testing.T) {
	for _, c := range []struct {
		name        string
		status      int
		body        string
		want        string // Error()
		code        string
		raw         bool
		permanent   bool
		temporary   bool
		wantMessage string
	}{
		{name: "conflict", status: 409, body: `{"code":"name-taken","message":"the name a is taken"}`,
			want: "server refused (409 Conflict): the name a is taken", code: api.ErrCodeNameTaken, permanent: true, wantMessage: "the name a is taken"},
		{name: "deleted", status: 403, body: `{"code":"node-deleted","message":"node a was deleted"}` + "\n",
			want: "server refused (403 Forbidden): node a was deleted", code: api.ErrCodeNodeDeleted, permanent: true, wantMessage: "node a was deleted"},
		{name: "busy", status: 503, body: `{"code":"internal","message":"lost a race; try again"}`,
			want: "server error 503: lost a race; try again", code: api.ErrCodeInternal, temporary: true, wantMessage: "lost a race; try again"},
		{name: "too many", status: 429, body: `{"code":"bad-request","message":"slow down"}`,
			want: "server error 429: slow down", code: api.ErrCodeBadRequest, temporary: true, wantMessage: "slow down"},
		{name: "internal", status: 500, body: `{"code":"internal","message":"store down"}`,
			want: "server error 500: store down", code: api.ErrCodeInternal, wantMessage: "store down"},
		{name: "plain text", status: 404, body: "404 page not found\n",
			want: "server refused (404 Not Found): 404 page not found", raw: true, permanent: true, wantMessage: "404 page not found"},
		{name: "json without message", status: 400, body: `{"code":"bad-request"}`,
			want: `server refused (400 Bad Request): {"code":"bad-request"}`, raw: true, permanent: true, wantMessage: `{"code":"bad-request"}`},
		{name: "empty", status: 502, body: "",
			want: "server error 502", raw: true},
		{name: "empty refusal", status: 401, body: "  \n",
			want: "server refused (401 Unauthorized)", raw: true, permanent: true},
		{name: "unknown status", status: 499, body: "x",
			want: "server refused (499): x", raw: true, permanent: true, wantMessage: "x"},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := parseError(c.status, []byte(c.body))
			if e.Error() != c.want {
				t.Errorf("Error() = %q, want %q", e.Error(), c.want)
			}
			if e.API.Code != c.code || e.Raw != c.raw || e.API.Message != c.wantMessage || e.Status != c.status {
				t.Errorf("got %+v, want code %q raw %v message %q", e, c.code, c.raw, c.wantMessage)
			}
			wrapped := fmt.Errorf("join https://192.0.2.1:6443: %w", e)
			if IsPermanent(wrapped) != c.permanent || IsTemporary(wrapped) != c.temporary {
				t.Errorf("IsPermanent %v IsTemporary %v, want %v %v", IsPermanent(wrapped), IsTemporary(wrapped), c.permanent, c.temporary)
			}
			var got *Error
			if !errors.As(wrapped, &got) || got != e {
				t.Error("errors.As does not find the *Error through the wrapping")
			}
		})
	}
}

func TestErrorKindsOtherThanAnswers(t *testing.T) {
	mismatch := fmt.Errorf("join: %w", &CAMismatchError{URL: "https://192.0.2.1:6443", SHA256: [32]byte{0xab, 0xcd}})
	if !IsPermanent(mismatch) || IsTemporary(mismatch) {
		t.Error("a CA mismatch must be permanent")
	}
	for _, want := range []string{"abcd000000000000", "https://192.0.2.1:6443", "copy the token again"} {
		if !strings.Contains(mismatch.Error(), want) {
			t.Errorf("%q does not name %q", mismatch, want)
		}
	}
	unreachable := fmt.Errorf("join: %w", &UnreachableError{Err: errors.New("dial tcp: connection refused")})
	if IsPermanent(unreachable) || IsTemporary(unreachable) || unreachable.Error() != "join: dial tcp: connection refused" {
		t.Errorf("unreachable: %q permanent %v temporary %v", unreachable, IsPermanent(unreachable), IsTemporary(unreachable))
	}
	if IsPermanent(nil) || IsTemporary(nil) || IsPermanent(errors.New("decode answer")) {
		t.Error("nil and other errors are neither permanent nor temporary")
	}
}

func TestRawMessageCut(t *testing.T) {
	body := strings.Repeat("é", maxRawMessage) // 2 bytes each: the cut falls inside one at odd offsets
	for _, b := range []string{body, "x" + body} {
		m := parseError(http.StatusBadGateway, []byte(b)).API.Message
		if !utf8.ValidString(m) || len(m) > maxRawMessage+len("…") || !strings.HasSuffix(m, "…") {
			t.Errorf("message of %d bytes, valid %v: want at most %d bytes of valid UTF-8 ending in …", len(m), utf8.ValidString(m), maxRawMessage)
		}
	}
	if m := parseError(500, []byte("bad \xff byte")).API.Message; m != "bad \uFFFD byte" {
		t.Errorf("invalid UTF-8: %q", m)
	}
}

// FuzzParseError: any status and body make an *Error whose text is valid
// UTF-8, bounded, and names the status; an api.Error body round-trips.
func FuzzParseError(f *testing.F) {
	f.Add(409, []byte(`{"code":"name-taken","message":"taken"}`))
	f.Add(503, []byte("busy"))
	f.Add(200, []byte(""))
	f.Add(404, []byte(`{"message":""}`))
	f.Add(-1, []byte("\xff\xfe"))
	f.Add(418, []byte(`{"code":7,"message":["x"]}`))
	f.Fuzz(func(t *testing.T, status int, body []byte) {
		e := parseError(status, body)
		s := e.Error()
		if e.Status != status || !strings.Contains(s, fmt.Sprint(status)) {
			t.Fatalf("%q does not name status %d", s, status)
		}
		if e.Raw {
			if !utf8.ValidString(s) || len(e.API.Message) > maxRawMessage+len("…") || e.API.Code != "" {
				t.Fatalf("raw message %q (%d bytes, code %q)", e.API.Message, len(e.API.Message), e.API.Code)
			}
			return
		}
		if e.API.Message == "" || !strings.HasSuffix(s, ": "+e.API.Message) {
			t.Fatalf("api.Error %+v: text %q", e.API, s)
		}
		if IsPermanent(e) == IsTemporary(e) && IsPermanent(e) {
			t.Fatalf("status %d both permanent and temporary", status)
		}
	})
}
