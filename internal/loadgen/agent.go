package loadgen

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/client"
	"github.com/trellis-mesh/trellis/internal/pki"
)

// errRetry marks an answer that asks to try again later.
var errRetry = errors.New("temporary")

// vagent is one virtual agent: a node identity and API clients that
// speak the agent's protocol (join with a CSR, netmap stream, reports),
// with no data plane behind it.
type vagent struct {
	idx      int
	name     string
	password string
	pubKey   api.Key
	csr      []byte
	keyPEM   []byte
	extIP    netip.Addr

	cfg  client.Config  // the server, its CA and the source address
	boot *client.Client // without a certificate, for the join
	node *client.Client // with the node certificate; nil before the join
}

// AgentName is the node name of virtual agent idx (and of its Node in
// Kubernetes mode).
func AgentName(idx int) string { return fmt.Sprintf("vagent-%05d", idx) }

// newVAgent creates the identity of agent idx: a random WireGuard public
// key (nothing uses the private half), a node password and an ECDSA key
// with its certificate request. With src valid, every connection of the
// agent comes from that address (one source address per agent keeps the
// server's per-source join rate limit out of the measurement, as real
// agents each have their own).
func newVAgent(idx int, base string, caPEM []byte, src netip.Addr) (*vagent, error) {
	a := &vagent{idx: idx, name: AgentName(idx)}
	if _, err := rand.Read(a.pubKey[:]); err != nil {
		return nil, err
	}
	pw := make([]byte, 18)
	if _, err := rand.Read(pw); err != nil {
		return nil, err
	}
	a.password = base64.RawURLEncoding.EncodeToString(pw)
	var err error
	if a.keyPEM, a.csr, err = pki.NewKeyAndCSR(); err != nil {
		return nil, err
	}
	// Every agent has its own public address (in 198.18.0.0/15, the
	// benchmarking range), so peers reach each other at external IPs
	// and every netmap lists every other agent with an endpoint.
	a.extIP = netip.AddrFrom4([4]byte{198, 18, byte(idx >> 8), byte(idx)})
	// A loaded server takes its time: handshakes, joins and first
	// netmaps wait in its queues.
	a.cfg = client.Config{URL: base, CA: caPEM, SourceAddr: src,
		Timeout: 2 * time.Minute, TLSHandshakeTimeout: 30 * time.Second, ResponseHeaderTimeout: 2 * time.Minute}
	if a.boot, err = client.New(a.cfg); err != nil {
		return nil, err
	}
	return a, nil
}

// close closes the agent's idle connections.
func (a *vagent) close() {
	a.boot.Close()
	if a.node != nil {
		a.node.Close()
	}
}

// sourceAddr returns the loopback source address of agent idx:
// 127.1.0.1 and up, 250 per /24.
func sourceAddr(idx int) netip.Addr {
	return netip.AddrFrom4([4]byte{127, 1 + byte(idx/(250*256)), byte(idx / 250 % 256), byte(idx%250 + 1)})
}

// join registers the agent with the server and makes its client with the
// certificate it gets. The join connection carries no client
// certificate, so it is closed afterwards.
func (a *vagent) join(ctx context.Context, token string) error {
	req := api.JoinRequest{
		NodeName:     a.name,
		NodePassword: a.password,
		PublicKey:    a.pubKey,
		CSR:          a.csr,
		ExternalIPs:  []netip.Addr{a.extIP},
		ListenPort:   api.DefaultWireGuardPort,
	}
	jr, err := a.boot.Join(ctx, token, req)
	var unreachable *client.UnreachableError
	switch {
	case err == nil:
	case errors.As(err, &unreachable) && ctx.Err() == nil:
		// A connection the loaded server closed (a handshake past its
		// timeout): a real agent retries, and so do we.
		a.boot.Close()
		return fmt.Errorf("%w: %s: %w", errRetry, a.name, err)
	case client.IsTemporary(err):
		return fmt.Errorf("%w: %s: %w", errRetry, a.name, err)
	default:
		return fmt.Errorf("%s: %w", a.name, err)
	}
	a.boot.Close()
	cert, err := tls.X509KeyPair(jr.Certificate, a.keyPEM)
	if err != nil {
		return fmt.Errorf("join %s: node certificate: %w", a.name, err)
	}
	cfg := a.cfg
	cfg.Certificate = &cert
	a.node, err = client.New(cfg)
	return err
}

// report sends a report that sets the agent's external IP.
func (a *vagent) report(ctx context.Context, ext netip.Addr) error {
	if err := a.node.Report(ctx, api.Report{ExternalIPs: []netip.Addr{ext}}); err != nil {
		return fmt.Errorf("%s: %w", a.name, err)
	}
	return nil
}

// openStream starts the agent's netmap stream, of deltas or of whole
// netmaps. Its first line is a whole netmap, unless have (with deltas:
// api.NetmapHaveParam) names the netmap the agent holds and the server
// resumes from it.
func (a *vagent) openStream(ctx context.Context, deltas bool, have string) (io.ReadCloser, error) {
	body, err := a.node.OpenNetmapStream(ctx, client.NetmapQuery{Whole: !deltas, Have: have})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", a.name, err)
	}
	return body, nil
}

// probe is one change being followed: the marker that the new netmaps
// carry, when the change was made, and when each agent got it.
type probe struct {
	marker    []byte
	start     time.Time
	arrivals  []atomic.Int64 // ns after start; 0 while not arrived, -1 skipped
	remaining atomic.Int64
	done      chan struct{}
}

func newProbe(marker string, n int) *probe {
	p := &probe{marker: []byte(marker), arrivals: make([]atomic.Int64, n), done: make(chan struct{})}
	p.remaining.Store(int64(n))
	return p
}

// skip leaves agent idx out: the probe is done without it.
func (p *probe) skip(idx int) {
	if p.arrivals[idx].CompareAndSwap(0, -1) && p.remaining.Add(-1) == 0 {
		close(p.done)
	}
}

// latencies returns the arrivals so far.
func (p *probe) latencies() []time.Duration {
	var lat []time.Duration
	for i := range p.arrivals {
		if d := p.arrivals[i].Load(); d > 0 {
			lat = append(lat, time.Duration(d))
		}
	}
	return lat
}

func (p *probe) arrived(idx int) {
	d := max(time.Since(p.start), 1)
	if p.arrivals[idx].CompareAndSwap(0, int64(d)) && p.remaining.Add(-1) == 0 {
		close(p.done)
	}
}

// follower reads netmap streams for a set of agents: it counts bytes,
// notes the end of each agent's first netmap, and reports when the current
// probe's marker has arrived at each agent.
type follower struct {
	target   atomic.Pointer[probe]
	bytes    atomic.Int64
	firstN   atomic.Int64
	first    chan struct{} // closed when firstWant agents have their first netmap
	firstWnt int64
	failed   atomic.Int64
}

func newFollower(n int) *follower {
	return &follower{first: make(chan struct{}), firstWnt: int64(n)}
}

// read follows one agent's stream until it ends.
func (f *follower) read(idx int, body io.ReadCloser) error {
	defer body.Close()
	buf := make([]byte, 32<<10)
	gotFirst := false
	var cur *probe
	var m *lineMatcher
	for {
		n, err := body.Read(buf)
		if n > 0 {
			chunk := buf[:n]
			f.bytes.Add(int64(n))
			if !gotFirst && bytes.IndexByte(chunk, '\n') >= 0 {
				gotFirst = true
				if f.firstN.Add(1) == f.firstWnt {
					close(f.first)
				}
			}
			if p := f.target.Load(); p != cur {
				cur, m = p, nil
				if p != nil {
					m = newLineMatcher(p.marker)
				}
			}
			if m != nil && m.feed(chunk) {
				cur.arrived(idx)
			}
		}
		if err != nil {
			if errors.Is(err, context.Canceled) {
				return nil
			}
			f.failed.Add(1)
			return err
		}
	}
}
