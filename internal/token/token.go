// Package token parses and formats cluster join tokens.
//
// A full token has the K3s form
//
//	K10<ca-hash>::<user>:<secret>
//
// where <ca-hash> is the lowercase hex SHA-256 of the cluster CA certificate
// exactly as the server serves it at /cacerts (the PEM bytes), <user> is
// "server" (a token that joins servers and agents) or "node" (a token that
// joins agents only), and <secret> is the shared secret. The hash may be
// empty ("K10::node:<secret>"). A bare secret without the "K10" prefix is
// accepted too and means K10::node:<secret>.
//
// A token without a CA hash does not pin the CA: whoever parses one must warn
// the user that the server's certificate cannot be checked.
//
// Error messages of this package never contain the secret, nor any other
// part of the text they were given.
package token

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"unicode"
	"unicode/utf8"
)

// prefix starts every full token. K3s uses the same prefix; "10" is the
// version of the format.
const prefix = "K10"

// formatHint is appended to parse errors: what a token looks like and where a
// good one is found.
const formatHint = "expected K10<ca-hash>::server:<secret> or K10<ca-hash>::node:<secret> as written to <data-dir>/server/token"

// Kind says what a token may join. The zero value is KindNode, the less
// privileged kind.
type Kind uint8

// Kinds of token.
const (
	// KindNode tokens join agents. Written as the user "node".
	KindNode Kind = iota
	// KindServer tokens join servers and agents. Written as the user
	// "server".
	KindServer
)

// String returns the user name the kind is written as: "node" or "server".
func (k Kind) String() string {
	switch k {
	case KindNode:
		return "node"
	case KindServer:
		return "server"
	default:
		return fmt.Sprintf("Kind(%d)", uint8(k))
	}
}

// Token is a parsed join token. Tokens are comparable with ==.
type Token struct {
	// CAHash is the SHA-256 of the cluster CA certificate PEM. It is
	// meaningful only when HasCAHash is set, and zero otherwise.
	CAHash [sha256.Size]byte
	// HasCAHash reports whether the token pins the CA. When it is false
	// the CA served by the server cannot be checked, and the caller must
	// warn the user.
	HasCAHash bool
	// Kind says what the token may join.
	Kind Kind
	// Secret is the shared secret. It is never empty in a parsed token and
	// holds no white space or control characters.
	Secret string
}

// New returns a token of kind kind for secret that pins the CA certificate
// caPEM. If caPEM is empty the token does not pin a CA. The secret should
// come from GenerateSecret; New does not check it, and a secret that Parse
// would reject yields a token whose String does not parse.
func New(caPEM []byte, kind Kind, secret string) Token {
	t := Token{Kind: kind, Secret: secret}
	if len(caPEM) > 0 {
		t.CAHash = sha256.Sum256(caPEM)
		t.HasCAHash = true
	}
	return t
}

// GenerateSecret returns a new random secret: 256 bits from crypto/rand as
// 64 lowercase hex digits, safe in URLs, file names and shells, and free of
// ':' characters.
func GenerateSecret() (string, error) {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generate token secret: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

// Parse parses a token in either form described in the package comment.
// White space around s (a trailing newline from a token file) is ignored.
func Parse(s string) (Token, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return Token{}, errors.New("parse token: token is empty: " + formatHint)
	}
	rest, full := strings.CutPrefix(s, prefix)
	if !full {
		// A bare secret: K3s reads it as K10::node:<secret>.
		if err := checkSecret(s); err != nil {
			return Token{}, err
		}
		return Token{Kind: KindNode, Secret: s}, nil
	}
	hashHex, cred, ok := strings.Cut(rest, "::")
	if !ok {
		return Token{}, errors.New("parse token: token starts with K10 but has no '::' separator: " + formatHint)
	}
	var t Token
	if hashHex != "" {
		if len(hashHex) != hex.EncodedLen(sha256.Size) {
			return Token{}, fmt.Errorf("parse token: CA hash has %d characters, want %d hex digits (a SHA-256): %s", len(hashHex), hex.EncodedLen(sha256.Size), formatHint)
		}
		if _, err := hex.Decode(t.CAHash[:], []byte(hashHex)); err != nil {
			// hex errors quote the offending byte, which might come
			// from a mistyped secret: do not wrap them.
			return Token{}, errors.New("parse token: CA hash is not hexadecimal: " + formatHint)
		}
		t.HasCAHash = true
	}
	user, secret, ok := strings.Cut(cred, ":")
	if !ok {
		return Token{}, errors.New("parse token: no ':' between user and secret after '::': " + formatHint)
	}
	switch user {
	case KindServer.String():
		t.Kind = KindServer
	case KindNode.String():
		t.Kind = KindNode
	default:
		// The user is not quoted: a pasted secret may sit in its place.
		return Token{}, errors.New("parse token: the user after '::' must be \"server\" or \"node\": " + formatHint)
	}
	if err := checkSecret(secret); err != nil {
		return Token{}, err
	}
	t.Secret = secret
	return t, nil
}

// checkSecret rejects secrets that cannot be written on one line of a token
// file or passed as one shell word. Its errors do not show the secret.
func checkSecret(secret string) error {
	if secret == "" {
		return errors.New("parse token: secret is empty: " + formatHint)
	}
	if !utf8.ValidString(secret) {
		return errors.New("parse token: secret is not valid UTF-8: check that the token was copied whole")
	}
	for _, r := range secret {
		if unicode.IsSpace(r) || unicode.IsControl(r) {
			return errors.New("parse token: secret contains white space or control characters: check that the token was copied whole, on one line")
		}
	}
	return nil
}

// String formats t in the full form, K10<ca-hash>::<user>:<secret>, with an
// empty hash when t does not pin the CA. Parse(t.String()) returns t for any
// token Parse returned. The result contains the secret: do not log it (see
// Redacted).
func (t Token) String() string {
	var b strings.Builder
	b.Grow(len(prefix) + hex.EncodedLen(sha256.Size) + len("::server:") + len(t.Secret))
	b.WriteString(prefix)
	if t.HasCAHash {
		b.WriteString(hex.EncodeToString(t.CAHash[:]))
	}
	b.WriteString("::")
	b.WriteString(t.Kind.String())
	b.WriteByte(':')
	b.WriteString(t.Secret)
	return b.String()
}

// Redacted formats t like String with the secret replaced by "<redacted>",
// for logs and messages.
func (t Token) Redacted() string {
	return Token{CAHash: t.CAHash, HasCAHash: t.HasCAHash, Kind: t.Kind, Secret: "<redacted>"}.String()
}

// LogValue implements slog.LogValuer so that logging a Token shows Redacted,
// never the secret.
func (t Token) LogValue() slog.Value {
	return slog.StringValue(t.Redacted())
}

// CAMatches reports whether t pins the CA certificate caPEM (the bytes served
// at /cacerts). It reports false when t has no CA hash: check HasCAHash
// first. The comparison takes constant time.
func (t Token) CAMatches(caPEM []byte) bool {
	got := sha256.Sum256(caPEM)
	eq := subtle.ConstantTimeCompare(got[:], t.CAHash[:]) == 1
	return eq && t.HasCAHash
}

// SecretMatches reports whether secret equals t's secret. It takes time
// independent of the contents and the lengths of both secrets. An empty t
// secret matches nothing.
func (t Token) SecretMatches(secret string) bool {
	// Hashing first makes the comparison independent of the lengths.
	want := sha256.Sum256([]byte(t.Secret))
	got := sha256.Sum256([]byte(secret))
	eq := subtle.ConstantTimeCompare(want[:], got[:]) == 1
	return eq && t.Secret != ""
}
