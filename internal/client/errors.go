package client

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"unicode/utf8"

	"github.com/trellis-mesh/trellis/internal/api"
)

// Error is an answer of the server other than success (a status outside
// 2xx).
type Error struct {
	// Status is the HTTP status code.
	Status int
	// API is the answer's body. When the body is not an api.Error with a
	// message (a proxy's page, a plain-text error), Raw is set, Code is
	// empty and Message is the body's text, trimmed and cut at
	// maxRawMessage bytes.
	API api.Error
	Raw bool
}

// maxErrorBody is how much of an error answer is read; maxRawMessage is
// how much of a body that is not an api.Error becomes the message.
const (
	maxErrorBody  = 64 << 10
	maxRawMessage = 1 << 10
)

// Error says whether the server refused the call for good ("server
// refused (409 Conflict): the name is taken") or failed ("server error
// 503: ...").
func (e *Error) Error() string {
	var s string
	if e.permanent() {
		s = "server refused (" + e.StatusLine() + ")"
	} else {
		s = "server error " + strconv.Itoa(e.Status)
	}
	if e.API.Message == "" {
		return s
	}
	return s + ": " + e.API.Message
}

// StatusLine is the status as HTTP writes it: "404 Not Found".
func (e *Error) StatusLine() string {
	if t := http.StatusText(e.Status); t != "" {
		return strconv.Itoa(e.Status) + " " + t
	}
	return strconv.Itoa(e.Status)
}

// permanent: retrying will not change the answer (a 4xx other than 429
// Too Many Requests).
func (e *Error) permanent() bool {
	return e.Status >= 400 && e.Status < 500 && e.Status != http.StatusTooManyRequests
}

// decodeError reads the error answer resp (status outside 2xx) into an
// *Error. It is the one place that turns the server's error bodies into
// errors.
func decodeError(resp *http.Response) *Error {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	return parseError(resp.StatusCode, body)
}

// parseError makes the *Error of an answer with status and body.
func parseError(status int, body []byte) *Error {
	e := &Error{Status: status}
	if json.Unmarshal(body, &e.API) == nil && e.API.Message != "" {
		return e
	}
	e.API, e.Raw = api.Error{Message: rawMessage(body)}, true
	return e
}

// rawMessage is the text of a body that is not an api.Error: trimmed,
// invalid UTF-8 replaced, cut at maxRawMessage bytes on a character
// boundary.
func rawMessage(body []byte) string {
	body = bytes.ToValidUTF8(bytes.TrimSpace(body), []byte("\uFFFD"))
	if len(body) <= maxRawMessage {
		return string(body)
	}
	cut := maxRawMessage
	for cut > 0 && !utf8.RuneStart(body[cut]) {
		cut--
	}
	return string(body[:cut]) + "…"
}

// UnreachableError is a call the server did not answer: the connection,
// the TLS handshake or the wait for the answer's header failed (or the
// context ended first). Its text is Err's.
type UnreachableError struct {
	// Err is what failed: the *url.Error of net/http, or the websocket
	// dialer's error.
	Err error
}

func (e *UnreachableError) Error() string { return e.Err.Error() }
func (e *UnreachableError) Unwrap() error { return e.Err }

// CAMismatchError is a server whose CA is not the one the join token
// pins: the token is from another cluster, or something intercepts the
// connection.
type CAMismatchError struct {
	// URL is the server's base URL.
	URL string
	// SHA256 is the hash of the CA the server presented.
	SHA256 [32]byte
}

func (e *CAMismatchError) Error() string {
	return fmt.Sprintf("the server at %s presents a CA (sha256 %s) that does not match the join token: the token is from another cluster, or something is intercepting the connection; copy the token again from the server's <data-dir>/server/token",
		e.URL, hex.EncodeToString(e.SHA256[:])[:16])
}

// IsPermanent reports whether err is an answer that retrying will not
// change: a refusal (a 4xx status other than 429: a wrong token, a name
// taken, a deleted node, a bad request) or a CA that does not match the
// join token.
func IsPermanent(err error) bool {
	var e *Error
	var m *CAMismatchError
	return (errors.As(err, &e) && e.permanent()) || errors.As(err, &m)
}

// IsTemporary reports whether err is the server asking to be called again
// later (503 Service Unavailable: a lost race, an etcd cluster busy adding
// a member; 429 Too Many Requests).
func IsTemporary(err error) bool {
	var e *Error
	return errors.As(err, &e) && (e.Status == http.StatusServiceUnavailable || e.Status == http.StatusTooManyRequests)
}
