// Package tunnel carries the server's connections to node-local ports over
// one websocket that each agent opens.
//
// An agent dials out to the server (wss://SERVER:6443/v1/connect) with its
// node certificate; nothing on the node needs an open port. The websocket
// carries binary messages only and is wrapped as a net.Conn; over it a
// yamux session multiplexes streams. The server opens streams (it is the
// yamux client), the agent accepts them (the yamux server). Every stream
// starts with a request header naming a port on the node's loopback; the
// agent answers with a status, and if the port is allowed, dials
// 127.0.0.1:PORT and splices the two.
//
// Why not github.com/rancher/remotedialer, which K3s uses: every version
// of it that is still served requires Go ≥ 1.26.10, and Trellis is pinned
// to Go 1.26.8. github.com/hashicorp/yamux is a small, established
// multiplexer (used by Consul, Nomad and Vault) and
// github.com/gorilla/websocket a small, established websocket; together
// they replace remotedialer without a hand-rolled frame protocol. The only
// protocol of our own is the few bytes of the stream header (header.go),
// which are fuzzed.
//
// Keepalives: both ends send a websocket ping every PingInterval and drop
// the connection when nothing at all (data, ping or pong) has arrived for
// Timeout, so a dead tunnel is noticed within Timeout (12 s by default).
// yamux's own keepalive is off: its pings queue behind data, so a busy but
// healthy tunnel could fail them.
package tunnel

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/hashicorp/yamux"
)

// Defaults of Timing.
const (
	DefaultPingInterval = 4 * time.Second
	DefaultTimeout      = 12 * time.Second
	// writeTimeout is yamux's safety valve for one frame waiting to be
	// sent; a stream whose write waits longer fails, the session stays.
	writeTimeout = 30 * time.Second
)

// HeaderNodeName is the request header in which an agent names the node
// it connects as. The server keys sessions by the name in the node
// certificate and refuses a connection whose header names another node.
const HeaderNodeName = "Trellis-Node"

// HeaderStatusPort is the request header in which an agent says which
// loopback port its status endpoint listens on.
const HeaderStatusPort = "Trellis-Status-Port"

// Timing holds the keepalive settings of one end. Zero fields get the
// defaults above.
type Timing struct {
	// PingInterval is how often this end pings the other.
	PingInterval time.Duration
	// Timeout is how long this end waits without receiving anything
	// before it drops the connection. It should be a few PingIntervals.
	Timeout time.Duration
}

func (t Timing) withDefaults() Timing {
	if t.PingInterval <= 0 {
		t.PingInterval = DefaultPingInterval
	}
	if t.Timeout <= 0 {
		t.Timeout = DefaultTimeout
	}
	return t
}

// DetectWithin is the longest a dead tunnel goes unnoticed.
func (t Timing) DetectWithin() time.Duration { return t.withDefaults().Timeout }

func yamuxConfig(log *slog.Logger) *yamux.Config {
	c := yamux.DefaultConfig()
	c.EnableKeepAlive = false // see the package doc: the websocket pings
	c.ConnectionWriteTimeout = writeTimeout
	c.StreamOpenTimeout = 30 * time.Second
	c.StreamCloseTimeout = time.Minute
	c.LogOutput = nil
	c.Logger = slog.NewLogLogger(log.Handler(), slog.LevelDebug)
	return c
}

// ErrNoSession is returned by Server.Dial when the node has no tunnel.
var ErrNoSession = errors.New("no tunnel connected")

// ErrClosed is returned after Close.
var ErrClosed = errors.New("tunnel closed")

// DialError is the agent's refusal of a stream (or a failure to reach the
// port on the node).
type DialError struct {
	Node   string
	Port   int
	Status Status
	// Message is the agent's explanation, meant for a person.
	Message string
}

func (e *DialError) Error() string {
	return fmt.Sprintf("node %s port %d: %s", e.Node, e.Port, e.Message)
}
