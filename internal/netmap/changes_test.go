package netmap

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/internal/api"
)

// randomCluster builds clusters whose nodes vary in everything the netmap
// reads: addresses of both families, shared LANs and NATs, keys that
// collide, relays, readiness, missing data planes, observations.
type randomCluster struct {
	r     *rand.Rand
	names []string
}

func (g *randomCluster) pick(s ...string) string { return s[g.r.IntN(len(s))] }

func (g *randomCluster) node(i int) api.Node {
	r := g.r
	name := g.names[i]
	n := api.Node{Name: name, PublicKey: key(byte(1 + r.IntN(len(g.names)+2))), ListenPort: 51820}
	if r.IntN(10) == 0 {
		n.ListenPort = 0
	}
	lan := r.IntN(3)
	n.InternalIPs = addrs(fmt.Sprintf("10.%d.0.%d", lan, 10+i))
	n.Networks = prefixes(fmt.Sprintf("10.%d.0.0/24", lan))
	if r.IntN(3) == 0 {
		n.InternalIPs = append(n.InternalIPs, netip.MustParseAddr(fmt.Sprintf("2001:db8:%d::%d", lan, 10+i)))
	}
	switch r.IntN(4) {
	case 0:
		n.ExternalIPs = addrs(fmt.Sprintf("203.0.113.%d", 10+i+r.IntN(2)*100))
	case 1:
		n.ObservedIP = netip.MustParseAddr(g.pick("198.51.100.1", "198.51.100.2")) // behind a NAT
	case 2:
		n.ExternalIPs = addrs(fmt.Sprintf("2001:db8:ff::%d", 10+i))
	}
	switch r.IntN(8) {
	case 0:
		n.PodCIDRs = nil
	case 1:
		n.PodCIDRs = prefixes("192.168.0.0/24") // outside the cluster
	default:
		n.PodCIDRs = prefixes(fmt.Sprintf("10.42.%d.0/24", i))
	}
	if r.IntN(4) == 0 {
		n.Relay = true
	}
	if r.IntN(6) == 0 {
		n.Roles = []string{api.RoleServer}
	}
	n.Ready = r.IntN(3) > 0
	for j, peer := range g.names {
		if j == i || r.IntN(2) == 0 {
			continue
		}
		o := api.Observation{Peer: peer, Handshake: g.pick(api.HandshakeOK, api.HandshakeOK, api.HandshakeFailing, "")}
		switch r.IntN(3) {
		case 0:
			o.Endpoint = netip.MustParseAddrPort(fmt.Sprintf("198.51.100.%d:%d", 1+r.IntN(2), 40000+j))
		case 1:
			o.Endpoint = netip.MustParseAddrPort(fmt.Sprintf("[2001:db8:%d::%d]:51820", r.IntN(3), 10+j))
		}
		n.Observations = append(n.Observations, o)
	}
	return n
}

// nodes returns the cluster's records sorted by name, as the server keeps
// them.
func sortedNodes(m map[string]api.Node) []api.Node {
	out := make([]api.Node, 0, len(m))
	for _, n := range m {
		out = append(out, n)
	}
	slices.SortFunc(out, func(a, b api.Node) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// applyDelta is what an agent does with a delta.
func applyDelta(peers []api.Peer, changed []api.Peer, removed []string) []api.Peer {
	byName := map[string]api.Peer{}
	for _, p := range peers {
		byName[p.Name] = p
	}
	for _, name := range removed {
		delete(byName, name)
	}
	for _, p := range changed {
		byName[p.Name] = p
	}
	out := make([]api.Peer, 0, len(byName))
	for _, p := range byName {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b api.Peer) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// TestIncrementalMatchesFull changes random clusters one or two records at
// a time and checks, for every node, that (1) View.Next gives the same
// netmaps as a view built from scratch and (2) the netmap a stream holds,
// updated only by Delta since its last wake-up (sometimes several changes
// back), equals the netmap computed from scratch.
func TestIncrementalMatchesFull(t *testing.T) {
	for seed := range uint64(600) {
		r := rand.New(rand.NewPCG(seed, 7))
		g := &randomCluster{r: r}
		size := 3 + r.IntN(6)
		for i := range size + 2 {
			g.names = append(g.names, string(rune('a'+i)))
		}
		policy := Policy{ClusterCIDRs: prefixes("10.42.0.0/16", "fd42::/48"), Keepalive: 25, ForceExternal: r.IntN(5) == 0}
		recs := map[string]api.Node{}
		for i := range size {
			recs[g.names[i]] = g.node(i)
		}
		view := NewView(sortedNodes(recs), policy)
		// One stream per node: the view it last saw, its netmap, its vias
		// and the changes since.
		type stream struct {
			view    *View
			peers   []api.Peer
			vias    map[string]bool
			pending Changes
		}
		streams := map[string]*stream{}
		for _, name := range g.names {
			p := view.Peers(name)
			streams[name] = &stream{view: view, peers: p, vias: Vias(p)}
		}
		for step := range 12 {
			var changed []string
			for range 1 + r.IntN(2) {
				i := r.IntN(len(g.names))
				name := g.names[i]
				switch {
				case r.IntN(6) == 0:
					delete(recs, name)
				case r.IntN(2) == 0 && recs[name].Name != "":
					// Only observations or readiness: the common report.
					n := recs[name]
					fresh := g.node(i)
					n.Observations, n.Ready = fresh.Observations, fresh.Ready
					recs[name] = n
				default:
					recs[name] = g.node(i)
				}
				changed = append(changed, name)
			}
			nodes := sortedNodes(recs)
			next := view.Next(nodes, changed)
			scratch := NewView(nodes, policy)
			if !reflect.DeepEqual(next.observed, scratch.observed) {
				t.Fatalf("seed %d step %d (changed %v): observed endpoints differ:\nnext    %v\nscratch %v", seed, step, changed, next.observed, scratch.observed)
			}
			c := Diff(view, next, changed)
			for _, name := range g.names {
				want := scratch.Peers(name)
				if got := next.Peers(name); !reflect.DeepEqual(got, want) {
					t.Fatalf("seed %d step %d: Next's netmap of %s differs:\n got %+v\nwant %+v", seed, step, name, got, want)
				}
				s := streams[name]
				s.pending.Merge(c)
				if r.IntN(3) == 0 {
					continue // this stream lags: it catches up later
				}
				ch, rm, _, vias := Delta(s.view, next, s.pending, name, s.vias)
				got := applyDelta(s.peers, ch, rm)
				if len(want) == 0 {
					want = nil
				}
				if len(got) == 0 {
					got = nil
				}
				if !reflect.DeepEqual(got, want) {
					t.Fatalf("seed %d step %d: netmap of %s after delta (changes %v, changed %v):\n got %+v\nwant %+v", seed, step, name, s.pending, changed, got, want)
				}
				s.view, s.peers, s.vias, s.pending = next, got, vias, Changes{}
			}
			view = next
		}
	}
}

// TestDiffIsNarrow checks that the common change, one node's new
// address, names only that node: every other stream compares one entry.
func TestDiffIsNarrow(t *testing.T) {
	var nodes []api.Node
	for i := range 50 {
		nodes = append(nodes, node(fmt.Sprintf("n%02d", i), byte(i+1), fmt.Sprintf("10.%d.0.10", i), fmt.Sprintf("10.%d.0.0/24", i), fmt.Sprintf("203.0.113.%d", i), fmt.Sprintf("10.42.%d.0/24", i)))
	}
	p := Policy{ClusterCIDRs: cluster, Keepalive: 25}
	old := NewView(nodes, p)
	moved := slices.Clone(nodes)
	moved[7].ExternalIPs = addrs("198.51.100.7")
	next := old.Next(moved, []string{"n07"})
	c := Diff(old, next, []string{"n07"})
	if c.All || len(c.Peers) != 1 || !c.Peers["n07"] || len(c.Maps) != 1 {
		t.Fatalf("changes = %+v, want only n07", c)
	}
	ch, rm, full, _ := Delta(old, next, c, "n03", nil)
	if full || len(rm) != 0 || len(ch) != 1 || ch[0].Endpoint.String() != "198.51.100.7:51820" {
		t.Fatalf("delta for n03 = %+v, removed %v, full %v", ch, rm, full)
	}
	// A relay's new address changes everything.
	relay := slices.Clone(moved) // a view keeps its nodes: do not change them
	relay[9].Relay = true
	relayView := next.Next(relay, []string{"n09"})
	if c := Diff(next, relayView, []string{"n09"}); !c.All {
		t.Fatalf("a relay's change: %+v, want All", c)
	}
}
