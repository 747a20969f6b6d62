package server

import (
	"crypto/sha256"
	"encoding/json"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/netmap"
)

// hub is the server's in-memory view of the node records, fed by a store
// watch, and the broadcast point for netmap streams: every change closes
// the current changed channel and opens a new one.
type hub struct {
	policy netmap.Policy

	mu      sync.Mutex
	records map[string]record      // guarded by mu
	version int64                  // guarded by mu; store revision of the view
	nodes   []api.Node             // guarded by mu; sorted snapshot, rebuilt per change
	view    *netmap.View           // guarded by mu; built from nodes
	changed chan struct{}          // guarded by mu; closed on change
	streams map[string]*streamInfo // guarded by mu; open netmap streams by node
	seen    map[string]int64       // guarded by mu; version each node's stream last computed
	remote  map[string]string      // guarded by mu; nodes with a stream on any server (ha.go)
	servers []api.Server           // guarded by mu; every server (ha.go)
}

type streamInfo struct {
	count int
	since time.Time
}

func newHub(p netmap.Policy) *hub {
	return &hub{
		policy:  p,
		view:    netmap.NewView(nil, p),
		records: map[string]record{},
		changed: make(chan struct{}),
		streams: map[string]*streamInfo{},
		seen:    map[string]int64{},
	}
}

// reset replaces the whole view (after a list or a compacted watch).
func (h *hub) reset(recs []record, rev int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.records = make(map[string]record, len(recs))
	for _, r := range recs {
		h.records[r.Name] = r
	}
	h.version = rev
	h.publishLocked()
}

// put stores or replaces one record.
func (h *hub) put(r record, rev int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.records[r.Name] = r
	h.version = rev
	h.publishLocked()
}

// del removes one record.
func (h *hub) del(name string, rev int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.records, name)
	h.version = rev
	h.publishLocked()
}

func (h *hub) publishLocked() {
	names := slices.Sorted(maps.Keys(h.records))
	nodes := make([]api.Node, 0, len(names))
	for _, n := range names {
		node := h.records[n].Node
		node.Ready = h.streams[n] != nil || h.remote[n] != ""
		nodes = append(nodes, node)
	}
	h.nodes = nodes
	h.view = netmap.NewView(nodes, h.policy)
	close(h.changed)
	h.changed = make(chan struct{})
}

// snapshot returns the current nodes (shared, read-only), their view, the
// version and a channel closed on the next change.
func (h *hub) snapshot() ([]api.Node, *netmap.View, int64, <-chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.nodes, h.view, h.version, h.changed
}

// record returns the stored record of name.
func (h *hub) record(name string) (record, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	r, ok := h.records[name]
	return r, ok
}

// netmapFor computes the netmap of node self from a snapshot. It returns
// false if self is not a node.
func (h *hub) netmapFor(self string, nodes []api.Node, view *netmap.View, version int64) (api.NetMap, bool) {
	i, found := slices.BinarySearchFunc(nodes, self, func(n api.Node, s string) int { return strings.Compare(n.Name, s) })
	if !found {
		return api.NetMap{}, false
	}
	h.mu.Lock()
	h.seen[self] = version
	h.mu.Unlock()
	peers := view.Peers(self)
	if peers == nil {
		peers = []api.Peer{}
	}
	return api.NetMap{
		Version:      version,
		Self:         nodes[i],
		ClusterCIDRs: h.policy.ClusterCIDRs,
		Peers:        peers,
	}, true
}

// connected marks a netmap stream of name as open; the returned function
// marks it closed.
func (h *hub) connected(name string, now time.Time) func() {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := h.streams[name]
	if s == nil {
		s = &streamInfo{since: now}
		h.streams[name] = s
	}
	s.count++
	if s.count == 1 && h.relayCapableLocked(name) {
		// Readiness feeds relay choice: only a relay's matters to the
		// netmaps. Others' is read at listing time (nodesWithStatus),
		// so N streams opening do not wake N streams N times.
		h.publishLocked()
	}
	return func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		if s.count--; s.count == 0 {
			delete(h.streams, name)
			delete(h.seen, name)
			if h.relayCapableLocked(name) {
				h.publishLocked()
			}
		}
	}
}

// relayCapableLocked reports whether name may relay (its readiness then
// changes netmaps).
func (h *hub) relayCapableLocked(name string) bool {
	r, ok := h.records[name]
	return ok && (r.Relay || r.HasRole(api.RoleServer))
}

// nodesWithStatus returns every node with Ready filled in as of now.
func (h *hub) nodesWithStatus() []api.Node {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := slices.Clone(h.nodes)
	for i := range out {
		out[i].Ready = h.streams[out[i].Name] != nil || h.remote[out[i].Name] != ""
	}
	return out
}

// streamLags returns the current version and, for each node with an open
// netmap stream, how many versions behind it its stream last computed.
func (h *hub) streamLags() (int64, map[string]int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	lags := make(map[string]int64, len(h.streams))
	for name := range h.streams {
		if v, ok := h.seen[name]; ok {
			lags[name] = h.version - v
		}
	}
	return h.version, lags
}

// paths returns how every pair of nodes reaches each other.
func (h *hub) paths() []api.Path {
	h.mu.Lock()
	v := h.view
	h.mu.Unlock()
	return v.Paths()
}

// mapDigest identifies a netmap's content apart from its version: a
// stream keeps the digest of what it sent, not the map (N maps of N peers
// would be O(N²) memory), and encodes each map once to compare.
func mapDigest(nm api.NetMap) ([sha256.Size]byte, error) {
	nm.Version = 0
	b, err := json.Marshal(nm)
	if err != nil {
		return [sha256.Size]byte{}, err
	}
	return sha256.Sum256(b), nil
}
