package agent

import (
	"context"
	"sync"

	"github.com/trellis-mesh/trellis/internal/api"
)

// Source is where the node's netmaps come from. The loop (loop.go) does not
// know more about it than this: the Trellis server is one source
// (serverSource: join, the netmap stream with deltas and resume, failover
// between servers); a test feeds netmaps directly.
type Source interface {
	// Run follows the node's netmaps until ctx ends, posting every whole
	// netmap to out (the newest replaces one not yet taken). It returns
	// nil when ctx ends, ErrDeleted when the node was deleted from the
	// cluster, and otherwise an error that retrying cannot fix (a wrong
	// token, a name taken).
	Run(ctx context.Context, out *Mailbox[Update]) error
	// Report hands the source what the node sees of itself and its
	// peers, to pass on to whoever computes netmaps. It never blocks: a
	// report not yet sent is replaced by a newer one.
	Report(r api.Report)
	// Reconnect drops the source's connections and makes them again (an
	// address they may be bound to went away).
	Reconnect()
}

// Update is what a Source posts: a whole netmap, and the cluster's nodes
// as of the last join when the source knows them (a VPN carrier checks
// the VPN's routes against them).
type Update struct {
	NetMap  api.NetMap
	Members []api.Member
}

// Mailbox holds the newest value posted and not yet taken: the reader
// waits on C and then Takes it. Posting never blocks. The zero value is
// not usable; use NewMailbox.
type Mailbox[T any] struct {
	c   chan struct{}
	mu  sync.Mutex
	v   T
	has bool
}

// NewMailbox returns an empty mailbox.
func NewMailbox[T any]() *Mailbox[T] { return &Mailbox[T]{c: make(chan struct{}, 1)} }

// Post replaces the value held, if any, with v.
func (m *Mailbox[T]) Post(v T) {
	m.mu.Lock()
	m.v, m.has = v, true
	m.mu.Unlock()
	select {
	case m.c <- struct{}{}:
	default:
	}
}

// C delivers a value after a Post.
func (m *Mailbox[T]) C() <-chan struct{} { return m.c }

// Take returns the value held and empties the mailbox; ok is false when it
// was empty.
func (m *Mailbox[T]) Take() (v T, ok bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok = m.v, m.has
	var zero T
	m.v, m.has = zero, false
	return v, ok
}
