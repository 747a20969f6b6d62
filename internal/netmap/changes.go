package netmap

import (
	"slices"

	"github.com/trellis-mesh/trellis/internal/api"
)

// Changes says which parts of the nodes' netmaps may differ between two
// views: what a server must recompute after a change, instead of every
// node's whole netmap (O(N²) per change in a cluster of N nodes).
type Changes struct {
	// All: anything may have changed (a relay changed, keys collide, the
	// view was replaced). Recompute every netmap.
	All bool
	// Peers are nodes whose entry may differ in any node's netmap.
	Peers map[string]bool
	// Maps are nodes whose own netmap may differ anywhere.
	Maps map[string]bool
}

// Diff returns what may differ in any netmap between views old and new,
// given that the records named in changed (added, updated, removed or
// with a new readiness) are the only differences between them.
//
// A peer entry of n in self's netmap depends on the records of self and
// n (addresses, networks, keys, pod CIDRs, what each observed of the
// other), on n's observed endpoint (what the first node by name with a
// working handshake saw of n), and on the relays (their records,
// readiness and what they observed). So a changed record X changes X's
// entry everywhere and X's own netmap; the observed endpoint of each peer
// X reported on may move, which changes that peer's entry and map; a
// relay that changes anything but its observations changes everything,
// and a relay's observation of b changes every path of b.
func Diff(old, new *View, changed []string) Changes {
	c := Changes{Peers: map[string]bool{}, Maps: map[string]bool{}}
	for _, x := range changed {
		o, n := old.byName[x], new.byName[x]
		c.Peers[x], c.Maps[x] = true, true
		relay := (o != nil && relayCapable(o)) || (n != nil && relayCapable(n))
		if relay && !sameExceptObservations(o, n) {
			c.All = true
			return c
		}
		for _, nd := range []*api.Node{o, n} {
			if nd != nil && (old.keyCount[nd.PublicKey] > 1 || new.keyCount[nd.PublicKey] > 1) {
				c.All = true // who owns the key may change for others
				return c
			}
		}
		// Whether x's sightings count depends on x's networks too.
		obsOnly := sameExceptObservations(o, n)
		for b := range unionKeys(old.obs[x], new.obs[x]) {
			before, had := old.obs[x][b]
			after, has := new.obs[x][b]
			if had == has && before == after && obsOnly {
				continue
			}
			if relay {
				c.Peers[b], c.Maps[b] = true, true
			}
			for _, v6 := range []bool{false, true} {
				k := observedKey{node: b, v6: v6}
				if old.observed[k].ep == new.observed[k].ep {
					continue
				}
				c.Peers[b], c.Maps[b] = true, true
				if bn := new.byName[b]; bn != nil && relayCapable(bn) {
					c.All = true // every path through b may change
					return c
				}
				if bo := old.byName[b]; bo != nil && relayCapable(bo) {
					c.All = true
					return c
				}
			}
		}
	}
	return c
}

// Merge adds o to c.
func (c *Changes) Merge(o Changes) {
	if o.All {
		c.All = true
	}
	if c.All {
		c.Peers, c.Maps = nil, nil
		return
	}
	if c.Peers == nil {
		c.Peers = map[string]bool{}
	}
	if c.Maps == nil {
		c.Maps = map[string]bool{}
	}
	for k := range o.Peers {
		c.Peers[k] = true
	}
	for k := range o.Maps {
		c.Maps[k] = true
	}
}

// sameExceptObservations reports whether a and b are the same record
// (both absent counts as the same) apart from their observations and the
// times they were written.
func sameExceptObservations(a, b *api.Node) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.Name == b.Name && a.PublicKey == b.PublicKey && a.ListenPort == b.ListenPort &&
		a.Relay == b.Relay && a.Ready == b.Ready && a.ObservedIP == b.ObservedIP &&
		slices.Equal(a.Roles, b.Roles) && slices.Equal(a.InternalIPs, b.InternalIPs) &&
		slices.Equal(a.Networks, b.Networks) && slices.Equal(a.ExternalIPs, b.ExternalIPs) &&
		slices.Equal(a.PodCIDRs, b.PodCIDRs)
}

// Delta returns the entries of self's netmap that differ between old and
// new, given c = Diff(old, new, ...): changed holds the new or changed
// entries, removed the names of entries that are gone. full reports
// whether self's whole netmap was compared (c says it may all have
// changed, or a relayed path is involved), which costs O(nodes); otherwise
// only the entries c names were. vias are the relays self's new netmap
// uses; pass the previous call's (Vias of the first netmap sent).
func Delta(old, new *View, c Changes, self string, vias map[string]bool) (changed []api.Peer, removed []string, full bool, newVias map[string]bool) {
	if !c.All && !c.Maps[self] {
		changed, removed, ok := partialDelta(old, new, c, self, vias)
		if ok {
			return changed, removed, false, vias
		}
	}
	before, after := old.Peers(self), new.Peers(self)
	newVias = Vias(after)
	i, j := 0, 0
	for i < len(before) || j < len(after) {
		switch {
		case j == len(after) || (i < len(before) && before[i].Name < after[j].Name):
			removed = append(removed, before[i].Name)
			i++
		case i == len(before) || after[j].Name < before[i].Name:
			changed = append(changed, after[j])
			j++
		default:
			if !samePeer(before[i], after[j]) {
				changed = append(changed, after[j])
			}
			i++
			j++
		}
	}
	return changed, removed, true, newVias
}

// partialDelta compares only the entries c names. It gives up (ok false)
// when one of them is or was relayed, or is a relay self uses: a relay's
// entry carries the pod CIDRs of every peer relayed through it.
func partialDelta(old, new *View, c Changes, self string, vias map[string]bool) (changed []api.Peer, removed []string, ok bool) {
	names := make([]string, 0, len(c.Peers))
	for name := range c.Peers {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		if vias[name] {
			return nil, nil, false
		}
		before, directBefore, had := old.Peer(self, name)
		after, directAfter, has := new.Peer(self, name)
		if (had && !directBefore) || (has && !directAfter) {
			return nil, nil, false
		}
		switch {
		case had && !has:
			removed = append(removed, name)
		case has && (!had || !samePeer(before, after)):
			changed = append(changed, after)
		}
	}
	return changed, removed, true
}

func samePeer(a, b api.Peer) bool {
	return a.Name == b.Name && a.PublicKey == b.PublicKey && a.Endpoint == b.Endpoint &&
		slices.Equal(a.AllowedIPs, b.AllowedIPs) && a.PersistentKeepalive == b.PersistentKeepalive &&
		a.Via == b.Via && a.Reason == b.Reason
}

// Vias returns the relays a netmap's peers go through.
func Vias(peers []api.Peer) map[string]bool {
	vias := map[string]bool{}
	for _, p := range peers {
		if p.Via != "" {
			vias[p.Via] = true
		}
	}
	return vias
}
