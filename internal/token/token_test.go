package token

import (
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"strings"
	"testing"
)

var (
	testCA     = []byte("-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n")
	testHash   = sha256.Sum256(testCA)
	testHashHx = hex.EncodeToString(testHash[:])
)

func TestParse(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    Token
		wantErr string // substring of the error; "" means no error
	}{
		{
			name: "server token",
			in:   "K10" + testHashHx + "::server:abc123",
			want: Token{CAHash: testHash, HasCAHash: true, Kind: KindServer, Secret: "abc123"},
		},
		{
			name: "node token",
			in:   "K10" + testHashHx + "::node:abc123",
			want: Token{CAHash: testHash, HasCAHash: true, Kind: KindNode, Secret: "abc123"},
		},
		{
			name: "upper case hash",
			in:   "K10" + strings.ToUpper(testHashHx) + "::node:abc123",
			want: Token{CAHash: testHash, HasCAHash: true, Kind: KindNode, Secret: "abc123"},
		},
		{
			name: "trailing newline from a token file",
			in:   "K10" + testHashHx + "::server:abc123\n",
			want: Token{CAHash: testHash, HasCAHash: true, Kind: KindServer, Secret: "abc123"},
		},
		{
			name: "empty hash",
			in:   "K10::server:abc123",
			want: Token{Kind: KindServer, Secret: "abc123"},
		},
		{
			name: "bare secret",
			in:   "abc123",
			want: Token{Kind: KindNode, Secret: "abc123"},
		},
		{
			name: "bare secret with colons",
			in:   "abc::node:def",
			want: Token{Kind: KindNode, Secret: "abc::node:def"},
		},
		{
			name: "secret with colons",
			in:   "K10::server:a:b::c",
			want: Token{Kind: KindServer, Secret: "a:b::c"},
		},
		{name: "empty", in: "", wantErr: "token is empty"},
		{name: "only space", in: " \n\t", wantErr: "token is empty"},
		{name: "no separator", in: "K10" + testHashHx + ":server:abc", wantErr: "no '::' separator"},
		{name: "short hash", in: "K10abcd::server:abc", wantErr: "CA hash has 4 characters"},
		{name: "non-hex hash", in: "K10" + strings.Repeat("zz", 32) + "::server:abc", wantErr: "not hexadecimal"},
		{name: "no user", in: "K10::abc", wantErr: "no ':' between user and secret"},
		{name: "unknown user", in: "K10::admin:abc", wantErr: `must be "server" or "node"`},
		{name: "empty secret", in: "K10::server:", wantErr: "secret is empty"},
		{name: "space in secret", in: "K10::server:ab c", wantErr: "white space"},
		{name: "space in bare secret", in: "ab c", wantErr: "white space"},
		{name: "control character", in: "ab\x00c", wantErr: "control characters"},
		{name: "invalid UTF-8", in: "ab\xffc", wantErr: "not valid UTF-8"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse(tt.in)
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("Parse(%q) = %+v, want error containing %q", tt.in, got, tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Parse(%q) error = %q, want it to contain %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Fatalf("Parse(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
			back, err := Parse(got.String())
			if err != nil || back != got {
				t.Fatalf("Parse(%q.String()) = %+v, %v; want %+v", tt.in, back, err, got)
			}
		})
	}
}

func TestErrorsHideSecret(t *testing.T) {
	const secret = "Sup3rS3cretValue"
	inputs := []string{
		"K10" + secret,
		"K10" + secret + "::server:x",
		"K10" + strings.Repeat("g", 64) + "::server:" + secret,
		"K10::" + secret,
		"K10::" + secret + ":" + secret,
		"K10::server:" + secret + " tail",
		"K10::node:" + secret + "\x01",
		secret + " " + secret,
		secret + "\xff",
	}
	for _, in := range inputs {
		_, err := Parse(in)
		if err == nil {
			t.Fatalf("Parse(%q) succeeded, want an error", in)
		}
		if strings.Contains(err.Error(), secret) || strings.Contains(err.Error(), secret[:6]) {
			t.Errorf("Parse(%q) error %q shows the secret", in, err)
		}
	}
}

func TestString(t *testing.T) {
	tests := []struct {
		tok  Token
		want string
	}{
		{New(testCA, KindServer, "s"), "K10" + testHashHx + "::server:s"},
		{New(testCA, KindNode, "s"), "K10" + testHashHx + "::node:s"},
		{New(nil, KindNode, "s"), "K10::node:s"},
		{Token{Kind: KindServer, Secret: "K10x"}, "K10::server:K10x"},
	}
	for _, tt := range tests {
		if got := tt.tok.String(); got != tt.want {
			t.Errorf("%+v.String() = %q, want %q", tt.tok, got, tt.want)
		}
	}
}

func TestRedacted(t *testing.T) {
	tok := New(testCA, KindServer, "topsecret")
	for _, s := range []string{tok.Redacted(), tok.LogValue().String()} {
		if strings.Contains(s, "topsecret") {
			t.Errorf("redacted form %q shows the secret", s)
		}
		if !strings.Contains(s, testHashHx) || !strings.Contains(s, "::server:") {
			t.Errorf("redacted form %q lost the hash or the kind", s)
		}
	}
	var b strings.Builder
	slog.New(slog.NewTextHandler(&b, nil)).Info("join", "token", tok)
	if strings.Contains(b.String(), "topsecret") {
		t.Errorf("slog output %q shows the secret", b.String())
	}
}

func TestCAMatches(t *testing.T) {
	tok := New(testCA, KindNode, "s")
	if !tok.CAMatches(testCA) {
		t.Error("CAMatches(the CA) = false, want true")
	}
	if tok.CAMatches(append([]byte{}, testCA[1:]...)) {
		t.Error("CAMatches(another CA) = true, want false")
	}
	if (Token{Secret: "s"}).CAMatches(nil) {
		t.Error("a token without a CA hash matched a CA")
	}
	if (Token{Secret: "s", CAHash: sha256.Sum256(nil)}).CAMatches(nil) {
		t.Error("a token without HasCAHash matched")
	}
}

func TestSecretMatches(t *testing.T) {
	tok := Token{Secret: "abc"}
	for _, tt := range []struct {
		secret string
		want   bool
	}{
		{"abc", true},
		{"abd", false},
		{"ab", false},
		{"abcd", false},
		{"", false},
	} {
		if got := tok.SecretMatches(tt.secret); got != tt.want {
			t.Errorf("SecretMatches(%q) = %v, want %v", tt.secret, got, tt.want)
		}
	}
	if (Token{}).SecretMatches("") {
		t.Error("an empty secret matched an empty secret")
	}
}

func TestGenerateSecret(t *testing.T) {
	seen := map[string]bool{}
	for range 100 {
		s, err := GenerateSecret()
		if err != nil {
			t.Fatal(err)
		}
		if len(s) != 64 || strings.ContainsAny(s, ":/+= ") {
			t.Fatalf("GenerateSecret() = %q: want 64 URL-safe characters without ':'", s)
		}
		if seen[s] {
			t.Fatalf("GenerateSecret() repeated %q", s)
		}
		seen[s] = true
		tok := New(testCA, KindServer, s)
		back, err := Parse(tok.String())
		if err != nil || back != tok {
			t.Fatalf("round trip of a generated token: got %+v, %v; want %+v", back, err, tok)
		}
	}
}

func TestKindString(t *testing.T) {
	if KindServer.String() != "server" || KindNode.String() != "node" || Kind(7).String() != "Kind(7)" {
		t.Errorf("Kind strings: %q %q %q", KindServer, KindNode, Kind(7))
	}
}

// secretMarker starts every secret FuzzParse plants, so that a leak of the
// secret into an error message can be recognised.
const secretMarker = "Qx7Zsecret"

func FuzzParse(f *testing.F) {
	f.Add("K10"+testHashHx+"::server:abc", "abc")
	f.Add("K10::node:abc", "")
	f.Add("abc", "x y")
	f.Add("K10", "\xff")
	f.Add("K10::", "::")
	f.Add("K10zz::server:", "a:b")
	f.Fuzz(func(t *testing.T, raw, secret string) {
		// Any text: no panic, and what parses round-trips.
		if tok, err := Parse(raw); err == nil {
			back, err := Parse(tok.String())
			if err != nil {
				t.Fatalf("Parse(%q) = %+v, but Parse of its String %q: %v", raw, tok, tok.String(), err)
			}
			if back != tok {
				t.Fatalf("Parse(%q) = %+v, round trip gives %+v", raw, tok, back)
			}
			if tok.Secret == "" {
				t.Fatalf("Parse(%q) returned an empty secret", raw)
			}
		}
		// A planted secret, in well- and ill-formed tokens, never shows
		// in an error.
		secret = secretMarker + secret
		for _, in := range []string{
			secret,
			"K10" + secret,
			"K10" + testHashHx + "::server:" + secret,
			"K10" + testHashHx[:10] + "::node:" + secret,
			"K10::" + secret,
			"K10" + secret + "::node:x",
			raw + secret,
			"K10::node:" + raw + secret,
		} {
			if _, err := Parse(in); err != nil && strings.Contains(err.Error(), secretMarker) {
				t.Fatalf("Parse(%q) error %q shows the secret", in, err)
			}
		}
	})
}
