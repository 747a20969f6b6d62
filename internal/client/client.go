// Package client talks to a Trellis server's HTTPS API.
//
// One Client serves every caller of the API: agents (join, netmap
// stream, reports), operators (nodes, paths, tokens, node status, the
// tunnel to a node's ports), servers joining another server, and the
// load generator. FetchCA gets and checks the cluster CA before there is
// a Client. Errors carry the operation and the server ("join
// https://198.51.100.10:6443: server refused (409 Conflict): ...");
// a refusal is an *Error, a call the server did not answer an
// *UnreachableError, and IsPermanent and IsTemporary say whether to try
// again.
package client

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"time"
)

// Defaults of Config.
const (
	// DefaultTimeout bounds a call that is not a stream.
	DefaultTimeout = 30 * time.Second
	// DefaultTLSHandshakeTimeout bounds the TLS handshake.
	DefaultTLSHandshakeTimeout = 10 * time.Second
	// DefaultResponseHeaderTimeout bounds the wait for an answer's header
	// once the request is sent.
	DefaultResponseHeaderTimeout = 30 * time.Second
)

// Fixed transport settings.
const (
	dialTimeout     = 10 * time.Second
	tcpKeepAlive    = 15 * time.Second
	idleConnTimeout = 60 * time.Second
	// maxAnswer is the most a JSON answer may take (a node list of
	// thousands of nodes is a few MiB).
	maxAnswer = 64 << 20
)

// Config says how a Client reaches a server. Zero durations take the
// defaults.
type Config struct {
	// URL is the server's base URL, https://host:port (a trailing slash
	// is dropped). Required.
	URL string
	// CA is the cluster CA certificate (PEM) that the server's certificate
	// must chain to: from FetchCA, a node's data dir or the admin config.
	// Required.
	CA []byte
	// Certificate is the client certificate (a node's, the admin's); nil
	// for calls that need none (join, ping, the etcd member calls).
	Certificate *tls.Certificate
	// SourceAddr, if valid, is the local address every connection comes
	// from (the load generator gives each virtual agent its own).
	SourceAddr netip.Addr
	// Timeout bounds each call that is not a stream (StreamNetmaps,
	// OpenNetmapStream, DialNode and Probe run until their context
	// ends). Default DefaultTimeout.
	Timeout time.Duration
	// TLSHandshakeTimeout and ResponseHeaderTimeout bound the handshake
	// and the wait for an answer's header. Defaults
	// DefaultTLSHandshakeTimeout and DefaultResponseHeaderTimeout; a
	// loaded server may need more.
	TLSHandshakeTimeout   time.Duration
	ResponseHeaderTimeout time.Duration
}

// Validate fills in the defaults and checks the values.
func (c *Config) Validate() error {
	c.URL = strings.TrimSuffix(c.URL, "/")
	if !strings.HasPrefix(c.URL, "https://") || len(c.URL) == len("https://") {
		return fmt.Errorf("server %q must be an https:// URL", c.URL)
	}
	if len(c.CA) == 0 || !x509.NewCertPool().AppendCertsFromPEM(c.CA) {
		return errors.New("the cluster CA is not a PEM certificate")
	}
	if c.Timeout < 0 || c.TLSHandshakeTimeout < 0 || c.ResponseHeaderTimeout < 0 {
		return errors.New("client timeouts must not be negative")
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.TLSHandshakeTimeout == 0 {
		c.TLSHandshakeTimeout = DefaultTLSHandshakeTimeout
	}
	if c.ResponseHeaderTimeout == 0 {
		c.ResponseHeaderTimeout = DefaultResponseHeaderTimeout
	}
	return nil
}

// Client calls one server's API with the cluster CA and, if configured, a
// client certificate. Its methods may be called concurrently. Clients
// made by WithBase share its connections and credential.
type Client struct {
	base    string
	timeout time.Duration
	// streamIdle is how long a netmap stream may stay silent
	// (streamIdle, shorter in tests).
	streamIdle time.Duration
	tls        *tls.Config
	dialer     *net.Dialer
	http       *http.Client
}

// New returns a client for cfg.
func New(cfg Config) (*Client, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("API client: %w", err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(cfg.CA)
	tc := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if cfg.Certificate != nil {
		tc.Certificates = []tls.Certificate{*cfg.Certificate}
	}
	dialer := &net.Dialer{Timeout: dialTimeout, KeepAlive: tcpKeepAlive}
	if cfg.SourceAddr.IsValid() {
		dialer.LocalAddr = &net.TCPAddr{IP: cfg.SourceAddr.AsSlice()}
	}
	return &Client{
		base:       cfg.URL,
		timeout:    cfg.Timeout,
		streamIdle: streamIdle,
		tls:        tc,
		dialer:     dialer,
		http: &http.Client{Transport: &http.Transport{
			TLSClientConfig:       tc,
			DialContext:           dialer.DialContext,
			TLSHandshakeTimeout:   cfg.TLSHandshakeTimeout,
			ResponseHeaderTimeout: cfg.ResponseHeaderTimeout,
			IdleConnTimeout:       idleConnTimeout,
			// The server does not compress, and the load generator
			// counts the bytes streams carry.
			DisableCompression: true,
		}},
	}, nil
}

// Base is the server's base URL, without a trailing slash.
func (c *Client) Base() string { return c.base }

// WithBase returns a client for another server of the same cluster (an
// agent failing over) that shares c's connections, credential and
// settings. base is as Config.URL.
func (c *Client) WithBase(base string) *Client {
	nc := *c
	nc.base = strings.TrimSuffix(base, "/")
	return &nc
}

// Close closes the idle connections of c and of the clients that share
// them; calls in flight go on. A closed client can be used again (it
// dials afresh). Close is idempotent.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// request describes one call of the API.
type request struct {
	op     string // what the call does, for errors: "join"
	method string
	path   string // with the query, if any
	bearer string // Authorization: Bearer, if not empty
	in     any    // the JSON body, if not nil
	out    any    // decodes a 2xx answer's JSON body, if not nil
}

// call makes the call r within c's timeout. Its errors are wrapped with
// r.op and the server: an *Error for an answer outside 2xx, an
// *UnreachableError for no answer.
func (c *Client) call(ctx context.Context, r request) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	resp, err := c.send(ctx, r)
	if err != nil {
		return c.wrap(r.op, err)
	}
	defer resp.Body.Close()
	// Drained, so that the connection can carry the next call.
	defer func() { _, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxAnswer)) }()
	if r.out == nil || resp.StatusCode == http.StatusNoContent {
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxAnswer)).Decode(r.out); err != nil {
		return c.wrap(r.op, fmt.Errorf("decode answer: %w", err))
	}
	return nil
}

// send sends r and returns the answer if its status is 2xx; the caller
// closes its body.
func (c *Client) send(ctx context.Context, r request) (*http.Response, error) {
	var body io.Reader
	if r.in != nil {
		b, err := json.Marshal(r.in)
		if err != nil {
			return nil, err
		}
		body = bytes.NewReader(b)
	}
	hr, err := http.NewRequestWithContext(ctx, r.method, c.base+r.path, body)
	if err != nil {
		return nil, err
	}
	if r.bearer != "" {
		hr.Header.Set("Authorization", "Bearer "+r.bearer)
	}
	if r.in != nil {
		hr.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(hr)
	if err != nil {
		return nil, &UnreachableError{Err: err}
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		return nil, decodeError(resp)
	}
	return resp, nil
}

// wrap adds the operation and the server to err.
func (c *Client) wrap(op string, err error) error {
	return fmt.Errorf("%s %s: %w", op, c.base, err)
}
