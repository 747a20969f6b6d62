package server

import (
	"maps"
	"net/netip"
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
	nodes   []api.Node             // guarded by mu; sorted snapshot, a new slice per change
	view    *netmap.View           // guarded by mu; built from nodes
	seq     int64                  // guarded by mu; counts publications (version may repeat)
	history []published            // guarded by mu; what the last publications changed
	changed chan struct{}          // guarded by mu; closed on change
	status  chan struct{}          // guarded by mu; closed on a change of a record or of any node's readiness
	streams map[string]*streamInfo // guarded by mu; open netmap streams by node
	seen    map[string]int64       // guarded by mu; version each node's stream last computed
	remote  map[string]string      // guarded by mu; nodes with a stream on any server (ha.go)
	servers []api.Server           // guarded by mu; every server (ha.go)
}

// published is what one publication changed in the netmaps.
type published struct {
	seq     int64
	changes netmap.Changes
}

// historyLen bounds the publications a stream can catch up from with
// deltas; a stream further behind compares its whole netmap.
const historyLen = 512

// snap is one publication: the nodes, their view, the store version, the
// publication's sequence number and a channel closed on the next one.
type snap struct {
	nodes   []api.Node
	view    *netmap.View
	version int64
	seq     int64
	changed <-chan struct{}
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
		status:  make(chan struct{}),
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
	h.publishLocked(nil)
}

// put stores or replaces one record.
func (h *hub) put(r record, rev int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.records[r.Name] = r
	h.version = rev
	h.publishLocked([]string{r.Name})
}

// del removes one record.
func (h *hub) del(name string, rev int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.records, name)
	h.version = rev
	h.publishLocked([]string{name})
}

// publishLocked makes a new view from the records and wakes the streams.
// changed names the records (or readiness) that changed since the last
// publication; nil means anything may have. The cost is O(nodes) plus the
// changed records' observations: the view is updated, not rebuilt.
func (h *hub) publishLocked(changed []string) {
	var view *netmap.View
	var changes netmap.Changes
	if changed == nil {
		names := slices.Sorted(maps.Keys(h.records))
		nodes := make([]api.Node, 0, len(names))
		for _, n := range names {
			nodes = append(nodes, h.nodeLocked(n))
		}
		h.nodes = nodes
		view = netmap.NewView(nodes, h.policy)
		changes = netmap.Changes{All: true}
	} else {
		nodes := slices.Clone(h.nodes) // the old view keeps the old slice
		for _, name := range changed {
			i, found := slices.BinarySearchFunc(nodes, name, byName)
			_, exists := h.records[name]
			switch {
			case exists && found:
				nodes[i] = h.nodeLocked(name)
			case exists:
				nodes = slices.Insert(nodes, i, h.nodeLocked(name))
			case found:
				nodes = slices.Delete(nodes, i, i+1)
			}
		}
		h.nodes = nodes
		view = h.view.Next(nodes, changed)
		changes = netmap.Diff(h.view, view, changed)
	}
	h.view = view
	h.seq++
	if len(h.history) == historyLen {
		h.history = slices.Delete(h.history, 0, historyLen/2)
	}
	h.history = append(h.history, published{seq: h.seq, changes: changes})
	close(h.changed)
	h.changed = make(chan struct{})
	h.statusChangedLocked()
}

// statusChangedLocked wakes those who follow records and readiness (the
// Kubernetes controller).
func (h *hub) statusChangedLocked() {
	close(h.status)
	h.status = make(chan struct{})
}

// nodeLocked is the node of record name as netmaps show it: with its
// readiness, and with the addresses of its Kubernetes Node's k3s.io
// annotations added to its own.
func (h *hub) nodeLocked(name string) api.Node {
	r := h.records[name]
	node := r.Node
	node.Ready = h.readyLocked(name)
	node.ExternalIPs = addMissing(node.ExternalIPs, r.KubeExternalIPs)
	node.InternalIPs = addMissing(node.InternalIPs, r.KubeInternalIPs)
	return node
}

// addMissing returns a with the addresses of b it lacks appended (a new
// slice if any are).
func addMissing(a, b []netip.Addr) []netip.Addr {
	for _, x := range b {
		if !slices.Contains(a, x) {
			a = append(slices.Clip(a), x)
		}
	}
	return a
}

func (h *hub) readyLocked(name string) bool {
	return h.streams[name] != nil || h.remote[name] != ""
}

func byName(n api.Node, name string) int { return strings.Compare(n.Name, name) }

// snapshot returns the current publication.
func (h *hub) snapshot() snap {
	h.mu.Lock()
	defer h.mu.Unlock()
	return snap{nodes: h.nodes, view: h.view, version: h.version, seq: h.seq, changed: h.changed}
}

// changesSince returns what the publications after seq changed, all in
// one; All when they are no longer remembered.
func (h *hub) changesSince(seq int64) netmap.Changes {
	h.mu.Lock()
	defer h.mu.Unlock()
	i, _ := slices.BinarySearchFunc(h.history, seq+1, func(p published, s int64) int { return int(p.seq - s) })
	if i == len(h.history) {
		return netmap.Changes{} // nothing new
	}
	if h.history[i].seq != seq+1 {
		return netmap.Changes{All: true}
	}
	var c netmap.Changes
	for _, p := range h.history[i:] {
		c.Merge(p.changes)
		if c.All {
			break
		}
	}
	return c
}

// markSeen notes the version the stream of name last computed.
func (h *hub) markSeen(name string, version int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.seen[name] = version
}

// record returns the stored record of name.
func (h *hub) record(name string) (record, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	r, ok := h.records[name]
	return r, ok
}

// netmapFor computes the whole netmap of node self from a publication.
// It returns false if self is not a node.
func (h *hub) netmapFor(self string, p snap) (api.NetMap, bool) {
	i, found := slices.BinarySearchFunc(p.nodes, self, byName)
	if !found {
		return api.NetMap{}, false
	}
	h.markSeen(self, p.version)
	peers := p.view.Peers(self)
	if peers == nil {
		peers = []api.Peer{}
	}
	return api.NetMap{
		Version:      p.version,
		Self:         asSelf(&p.nodes[i]),
		ClusterCIDRs: h.policy.ClusterCIDRs,
		Peers:        peers,
	}, true
}

// asSelf is n as its own netmap shows it: Ready, since the node reads its
// netmap. (The record's Ready is as of its last publication, which a
// plain node's readiness does not cause, so it would differ between
// servers and across restarts and defeat resumed streams.)
func asSelf(n *api.Node) api.Node {
	self := *n
	self.Ready = true
	return self
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
		h.publishLocked([]string{name})
	} else if s.count == 1 {
		h.statusChangedLocked()
	}
	return func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		if s.count--; s.count == 0 {
			delete(h.streams, name)
			delete(h.seen, name)
			if h.relayCapableLocked(name) {
				h.publishLocked([]string{name})
			} else {
				h.statusChangedLocked()
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
		out[i].Ready = h.readyLocked(out[i].Name)
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
