// Package netmap computes each node's WireGuard peers from the cluster's
// node records. It is pure: no I/O, no clock, no store.
package netmap

import (
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/ipam"
)

// DefaultKeepalive is the persistent keepalive, in seconds, given to every
// peer. It keeps NAT mappings open and lets a peer behind NAT be reached
// after it spoke first.
const DefaultKeepalive = 25

// Policy holds the cluster-wide settings that shape the netmap.
type Policy struct {
	// ClusterCIDRs are the pod address ranges. A peer's allowed IPs are
	// limited to node prefixes inside them.
	ClusterCIDRs []netip.Prefix
	// ForceExternal makes every peer reachable at its external IP, even
	// when both nodes share a network (--flannel-external-ip).
	ForceExternal bool
	// Keepalive is the persistent keepalive in seconds; 0 disables it.
	Keepalive int
}

// Compute returns the peers of the node named self, sorted by name. It is
// NewView(nodes, p).Peers(self); callers computing the peers of many nodes
// from one set of records should build the View once.
func Compute(self string, nodes []api.Node, p Policy) []api.Peer {
	return NewView(nodes, p).Peers(self)
}

// View is the cluster as the netmap sees it: nodes indexed by name, the
// WireGuard endpoints their peers observed, and the relay candidates. It is
// immutable once built.
type View struct {
	policy Policy
	nodes  []api.Node
	byName map[string]*api.Node
	// obs[a][b] is what a reported about b.
	obs map[string]map[string]api.Observation
	// observed[{b, v6}] is b's endpoint of that family as a node with a
	// working handshake sees it: for a node behind NAT, its NAT mapping.
	// The first reporter by name wins.
	observed map[observedKey]sighting
	relays   []*api.Node // sorted by name
	// keyOwner[k] is the first node (in nodes order) that may be a peer
	// and has public key k: two records with one key would make
	// WireGuard route one node's traffic to the other, so only the first
	// is a peer. keyCount counts every record with the key.
	keyOwner map[api.Key]string
	keyCount map[api.Key]int
	// allowed[name] is AllowedIPs of the node, sorted and clipped (an
	// append copies it); shared by every netmap, read-only.
	allowed map[string][]netip.Prefix
}

// observedKey names a node's observed endpoint of one address family.
type observedKey struct {
	node string
	v6   bool
}

// sighting is an observed endpoint and the node that reported it.
type sighting struct {
	ep netip.AddrPort
	by string
}

// NewView indexes nodes for the policy. The view keeps nodes: the caller
// must not modify it afterwards.
func NewView(nodes []api.Node, p Policy) *View {
	v := &View{
		policy:   p,
		nodes:    nodes,
		obs:      make(map[string]map[string]api.Observation, len(nodes)),
		observed: map[observedKey]sighting{},
	}
	v.index()
	// Reporters in name order, so the chosen observation is stable.
	for _, name := range v.names() {
		n := v.byName[name]
		if len(n.Observations) == 0 {
			continue
		}
		v.obs[name] = observationMap(n)
		for _, o := range n.Observations {
			ep, ok := v.sighting(name, o)
			if !ok {
				continue
			}
			k := observedKey{node: o.Peer, v6: is6(ep.Addr())}
			if _, have := v.observed[k]; !have {
				v.observed[k] = sighting{ep: ep, by: name}
			}
		}
	}
	return v
}

// Next returns the view of nodes, which differ from v's only in the
// records named in changed (added, updated or removed). It reuses what
// it can of v: the cost is O(nodes) plus the observations of the changed
// records, not O(all observations) as for NewView. Like NewView, it keeps
// nodes.
func (v *View) Next(nodes []api.Node, changed []string) *View {
	nv := &View{
		policy:   v.policy,
		nodes:    nodes,
		obs:      make(map[string]map[string]api.Observation, len(v.obs)+len(changed)),
		observed: maps.Clone(v.observed),
	}
	nv.index()
	isChanged := make(map[string]bool, len(changed))
	for _, name := range changed {
		isChanged[name] = true
	}
	for name, m := range v.obs {
		if !isChanged[name] && nv.byName[name] != nil {
			nv.obs[name] = m
		}
	}
	for _, name := range changed {
		if n := nv.byName[name]; n != nil && len(n.Observations) > 0 {
			nv.obs[name] = observationMap(n)
		}
	}
	var names []string // sorted, built on the first rescan
	for _, x := range changed {
		// Whether others' sightings of x count depends on x's record
		// (its networks; a removed node's sightings all count): O(N).
		if names == nil {
			names = nv.names()
		}
		nv.rescan(observedKey{node: x}, names)
		nv.rescan(observedKey{node: x, v6: true}, names)
	}
	for _, x := range changed {
		for b := range unionKeys(v.obs[x], nv.obs[x]) {
			for _, v6 := range []bool{false, true} {
				k := observedKey{node: b, v6: v6}
				cur, have := nv.observed[k]
				switch {
				case have && isChanged[cur.by]:
					// The reporter that was first changed: ask every one.
					if names == nil {
						names = nv.names()
					}
					nv.rescan(k, names)
				case have && cur.by < x:
					// An earlier reporter still has it.
				default:
					if ep, ok := nv.sighting(x, nv.obs[x][b]); ok && is6(ep.Addr()) == v6 {
						nv.observed[k] = sighting{ep: ep, by: x}
					}
				}
			}
		}
	}
	return nv
}

// index fills the indexes that are cheap to build from scratch: by name,
// relays and key owners.
func (v *View) index() {
	v.byName = make(map[string]*api.Node, len(v.nodes))
	v.keyOwner = make(map[api.Key]string, len(v.nodes))
	v.keyCount = make(map[api.Key]int, len(v.nodes))
	v.allowed = make(map[string][]netip.Prefix, len(v.nodes))
	for i := range v.nodes {
		n := &v.nodes[i]
		if _, dup := v.byName[n.Name]; dup {
			continue
		}
		v.byName[n.Name] = n
		v.keyCount[n.PublicKey]++
		allowed := AllowedIPs(n, v.policy.ClusterCIDRs)
		slices.SortFunc(allowed, comparePrefix)
		v.allowed[n.Name] = slices.Clip(allowed)
		if _, taken := v.keyOwner[n.PublicKey]; !taken && hasDataPlane(n) && len(allowed) > 0 {
			v.keyOwner[n.PublicKey] = n.Name
		}
		if relayCapable(n) && hasDataPlane(n) && len(allowed) > 0 {
			// A node without pod CIDRs is no one's peer: it cannot relay.
			v.relays = append(v.relays, n)
		}
	}
	slices.SortFunc(v.relays, func(a, b *api.Node) int { return strings.Compare(a.Name, b.Name) })
}

// Node returns the record of name, nil if there is none. It must not be
// modified.
func (v *View) Node(name string) *api.Node { return v.byName[name] }

// names returns the node names, sorted.
func (v *View) names() []string {
	return slices.Sorted(maps.Keys(v.byName))
}

// rescan finds the first reporter (of names, sorted) of k's endpoint.
func (v *View) rescan(k observedKey, names []string) {
	delete(v.observed, k)
	for _, r := range names {
		o, ok := v.obs[r][k.node]
		if !ok {
			continue
		}
		if ep, ok := v.sighting(r, o); ok && is6(ep.Addr()) == k.v6 {
			v.observed[k] = sighting{ep: ep, by: r}
			return
		}
	}
}

func observationMap(n *api.Node) map[string]api.Observation {
	m := make(map[string]api.Observation, len(n.Observations))
	for _, o := range n.Observations {
		m[o.Peer] = o
	}
	return m
}

// sighting returns the endpoint reporter's observation o vouches for, for
// every node: one with a working handshake at a usable address, seen from
// another network. A node on the peer's own network (or behind the same
// NAT) sees its LAN address, which nobody else can reach.
func (v *View) sighting(reporter string, o api.Observation) (netip.AddrPort, bool) {
	if o.Handshake != api.HandshakeOK || !o.Endpoint.IsValid() || !ValidEndpoint(o.Endpoint.Addr()) {
		return netip.AddrPort{}, false
	}
	if r, p := v.byName[reporter], v.byName[o.Peer]; r != nil && p != nil && SameNetwork(r, p) {
		return netip.AddrPort{}, false
	}
	return o.Endpoint, true
}

func unionKeys[V any](a, b map[string]V) map[string]struct{} {
	out := make(map[string]struct{}, len(a)+len(b))
	for k := range a {
		out[k] = struct{}{}
	}
	for k := range b {
		out[k] = struct{}{}
	}
	return out
}

// relayCapable reports whether n may relay (servers and --relay nodes).
func relayCapable(n *api.Node) bool { return n.Relay || n.HasRole(api.RoleServer) }

func hasDataPlane(n *api.Node) bool { return !n.PublicKey.IsZero() && n.ListenPort != 0 }

// Peers returns the peers of the node named self, sorted by name; their
// AllowedIPs may be shared with other netmaps of the view: read-only. Nodes
// without a data plane (no key, no listen port or no pod CIDR) and entries
// that fail the sanity checks are left out. A node without a pod CIDR of
// its own (in Kubernetes mode, until its Node has one) has no peers: it
// is not in the mesh. A peer reached through a relay
// is listed with no allowed IPs (a probe of the direct path) and its pod
// CIDRs go to the relay's entry.
func (v *View) Peers(self string) []api.Peer {
	me := v.byName[self]
	if me == nil {
		return nil
	}
	peers := make([]api.Peer, 0, len(v.byName))
	var relayed []api.Path
	for i := range v.nodes {
		n := &v.nodes[i]
		if v.byName[n.Name] != n {
			continue
		}
		peer, path, ok := v.entry(me, n)
		if !ok {
			continue
		}
		if path.Kind == api.PathRelayed {
			relayed = append(relayed, path)
		}
		peers = append(peers, peer)
	}
	if len(relayed) > 0 {
		index := make(map[string]int, len(peers))
		for i, p := range peers {
			index[p.Name] = i
		}
		for _, p := range relayed {
			ri, ok := index[p.Via]
			if !ok {
				continue
			}
			// The relay's own prefixes are shared and clipped: append
			// copies them.
			peers[ri].AllowedIPs = append(peers[ri].AllowedIPs, v.allowed[p.To]...)
		}
		for _, p := range relayed {
			if ri, ok := index[p.Via]; ok && !slices.IsSortedFunc(peers[ri].AllowedIPs, comparePrefix) {
				slices.SortFunc(peers[ri].AllowedIPs, comparePrefix)
			}
		}
	}
	if !slices.IsSortedFunc(peers, comparePeer) {
		slices.SortFunc(peers, comparePeer)
	}
	return peers
}

// Peer returns the entry for name in self's peers, as Peers(self) has it,
// and whether self reaches name directly. The one difference: a relay's
// entry here lacks the pod CIDRs of the peers self reaches through it.
// ok is false when name is not among self's peers.
func (v *View) Peer(self, name string) (peer api.Peer, direct, ok bool) {
	me, n := v.byName[self], v.byName[name]
	if me == nil || n == nil {
		return api.Peer{}, false, false
	}
	peer, path, ok := v.entry(me, n)
	return peer, ok && path.Kind == api.PathDirect, ok
}

// entry computes me's peer entry for n, without the pod CIDRs of peers
// relayed through n. Its AllowedIPs are shared: read-only.
func (v *View) entry(me, n *api.Node) (api.Peer, api.Path, bool) {
	if n == me || !hasDataPlane(n) || n.PublicKey == me.PublicKey || v.keyOwner[n.PublicKey] != n.Name || len(v.allowed[me.Name]) == 0 {
		return api.Peer{}, api.Path{}, false
	}
	allowed := v.allowed[n.Name]
	if len(allowed) == 0 {
		return api.Peer{}, api.Path{}, false
	}
	ep := v.Endpoint(me, n)
	path := v.path(me, n, ep)
	peer := api.Peer{
		Name:                n.Name,
		PublicKey:           n.PublicKey,
		Endpoint:            ep,
		AllowedIPs:          allowed,
		PersistentKeepalive: v.policy.Keepalive,
	}
	if path.Kind != api.PathDirect {
		peer.AllowedIPs = []netip.Prefix{}
		peer.Via, peer.Reason = path.Via, path.Reason
	}
	return peer, path, true
}

func comparePeer(a, b api.Peer) int { return strings.Compare(a.Name, b.Name) }

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

// Paths returns how every node in the mesh (with a data plane and a pod
// CIDR) reaches every other, sorted by From, To.
func (v *View) Paths() []api.Path {
	var out []api.Path
	names := make([]string, 0, len(v.byName))
	for name, n := range v.byName {
		if hasDataPlane(n) && len(v.allowed[name]) > 0 {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	for _, a := range names {
		for _, b := range names {
			if a != b {
				out = append(out, v.Path(a, b))
			}
		}
	}
	return out
}

// Path says how node a reaches node b:
//   - direct when either reported a working handshake with the other;
//   - relayed when either reported the handshake failing, or when neither
//     knows an endpoint of the other (both behind NAT);
//   - otherwise direct: try the direct path first.
//
// A relayed path goes through the first relay (by name) that is ready and
// has a working direct path to both. Path is symmetric in its decision.
func (v *View) Path(a, b string) api.Path {
	na, nb := v.byName[a], v.byName[b]
	if na == nil || nb == nil {
		return api.Path{From: a, To: b, Kind: api.PathNone, Reason: "unknown node"}
	}
	return v.path(na, nb, v.Endpoint(na, nb))
}

// path is Path for known nodes and a's endpoint for b, Endpoint(a, b).
func (v *View) path(na, nb *api.Node, ep netip.AddrPort) api.Path {
	p := api.Path{From: na.Name, To: nb.Name, Endpoint: ep}
	ok, reason := v.direct(na, nb, ep)
	if ok {
		p.Kind = api.PathDirect
		return p
	}
	p.Reason = reason
	for _, r := range v.relays {
		if r.Name == na.Name || r.Name == nb.Name || !r.Ready {
			continue
		}
		if okA, _ := v.direct(na, r, v.Endpoint(na, r)); !okA {
			continue
		}
		if okB, _ := v.direct(nb, r, v.Endpoint(nb, r)); !okB {
			continue
		}
		p.Kind, p.Via = api.PathRelayed, r.Name
		return p
	}
	p.Kind = api.PathNone
	p.Reason += "; no relay is ready that reaches both (servers relay; label more with --relay)"
	return p
}

// direct decides whether a and b use their direct path, and if not, why.
// ab is Endpoint(a, b).
func (v *View) direct(a, b *api.Node, ab netip.AddrPort) (bool, string) {
	oab, oba := v.obs[a.Name][b.Name], v.obs[b.Name][a.Name]
	switch {
	case oab.Handshake == api.HandshakeOK || oba.Handshake == api.HandshakeOK:
		return true, ""
	case oab.Handshake == api.HandshakeFailing || oba.Handshake == api.HandshakeFailing:
		return false, "direct handshake failed"
	case ab.IsValid() || v.Endpoint(b, a).IsValid():
		return true, ""
	}
	return false, "neither node has an address the other can reach (both behind NAT)"
}

// Endpoint chooses where from sends WireGuard packets for to. In each
// address family that from can send from, the candidate is:
//   - with --flannel-external-ip, to's external IP (a node without one
//     is reached as below);
//   - on a shared network, to's internal IP;
//   - otherwise its external IP, else its internal IP when that is the
//     address it talks to the server from (a public address on its
//     interface), else the NAT mapping a peer observed.
//
// When both families have a candidate, the pair uses IPv4 unless its
// observations say otherwise (see preferIPv6). The zero AddrPort means no
// usable address is known: to must reach from first.
func (v *View) Endpoint(from, to *api.Node) netip.AddrPort {
	if to.ListenPort == 0 {
		return netip.AddrPort{}
	}
	can4, can6 := families(from)
	var e4, e6 netip.AddrPort
	if can4 {
		e4 = v.endpointIn(from, to, false)
	}
	if can6 {
		e6 = v.endpointIn(from, to, true)
	}
	switch {
	case !e6.IsValid():
		return e4
	case !e4.IsValid():
		return e6
	case v.preferIPv6(from, to):
		return e6
	}
	return e4
}

// endpointIn is Endpoint's candidate in one address family. It runs for
// every peer of every netmap: it allocates nothing.
func (v *View) endpointIn(from, to *api.Node, v6 bool) netip.AddrPort {
	// Candidate sources, in order of preference.
	const (
		srcExt = iota
		srcInternal
		srcPublic
		srcObserved
	)
	var order [3]int
	switch {
	case v.policy.ForceExternal && SameNetwork(from, to):
		// Without an external IP, a node on the same network is reached
		// inside it: its NAT rarely hairpins.
		order = [3]int{srcExt, srcInternal, srcObserved}
	case v.policy.ForceExternal:
		order = [3]int{srcExt, srcPublic, srcObserved}
	case SameNetwork(from, to):
		order = [3]int{srcInternal, srcExt, srcObserved}
	default:
		order = [3]int{srcExt, srcPublic, srcObserved}
	}
	for _, src := range order {
		switch src {
		case srcExt:
			if a, ok := firstUsable(to.ExternalIPs, v6); ok {
				return netip.AddrPortFrom(a, to.ListenPort)
			}
		case srcInternal:
			if a, ok := firstUsable(to.InternalIPs, v6); ok {
				return netip.AddrPortFrom(a, to.ListenPort)
			}
		case srcPublic:
			// A NAT in one family says nothing about the other: a home
			// behind an IPv4 NAT often has global IPv6 addresses.
			if behindNAT(to) && is6(to.ObservedIP) == v6 {
				continue
			}
			for _, a := range to.InternalIPs {
				if usableIn(a, v6) && mayBePublic(to, a) {
					return netip.AddrPortFrom(a.Unmap(), to.ListenPort)
				}
			}
		case srcObserved:
			if o := v.observed[observedKey{node: to.Name, v6: v6}].ep; usableIn(o.Addr(), v6) {
				return o
			}
		}
	}
	return netip.AddrPort{}
}

func usableIn(a netip.Addr, v6 bool) bool { return ValidEndpoint(a) && is6(a) == v6 }

// firstUsable returns the first address of addrs usable as an endpoint of
// the family, unmapped.
func firstUsable(addrs []netip.Addr, v6 bool) (netip.Addr, bool) {
	for _, a := range addrs {
		if usableIn(a, v6) {
			return a.Unmap(), true
		}
	}
	return netip.Addr{}, false
}

// mayBePublic reports whether internal address a of a node that is not
// behind NAT in a's family may be reached from other networks. A private
// address (RFC 1918, IPv6 ULA) is not when the server sees the node at an
// address of the other family: on an IPv6-only underlay that says nothing
// about the node's IPv4 LAN address.
func mayBePublic(n *api.Node, a netip.Addr) bool {
	o := n.ObservedIP
	if !a.Unmap().IsPrivate() || !o.IsValid() || o.IsLoopback() {
		return true
	}
	return is6(o) == is6(a)
}

// preferIPv6 decides the family of a pair that both families connect:
//   - the family of a working session, when either node reports a
//     handshake;
//   - IPv6 when either reports the handshake failing: IPv4 (tried first)
//     does not get through. A pair whose IPv6 fails too stays on IPv6 and
//     is relayed, rather than flapping between the families;
//   - IPv6 when from shows a public IPv6 address and no public IPv4 one
//     (a cloud on an IPv6-only underlay with an IPv4 LAN);
//   - IPv4 otherwise.
func (v *View) preferIPv6(from, to *api.Node) bool {
	oft, otf := v.obs[from.Name][to.Name], v.obs[to.Name][from.Name]
	for _, o := range []api.Observation{oft, otf} {
		if o.Handshake == api.HandshakeOK && o.Endpoint.IsValid() {
			return is6(o.Endpoint.Addr())
		}
	}
	if oft.Handshake == api.HandshakeFailing || otf.Handshake == api.HandshakeFailing {
		return true
	}
	return hasPublic(from, true) && !hasPublic(from, false)
}

// hasPublic reports whether n shows an address of the family that other
// networks may reach it at or that it reaches them from: an external IP,
// a non-private node IP, or the address the server sees it at.
func hasPublic(n *api.Node, v6 bool) bool {
	for _, a := range n.ExternalIPs {
		if ValidEndpoint(a) && is6(a) == v6 {
			return true
		}
	}
	for _, a := range n.InternalIPs {
		if ValidEndpoint(a) && !a.Unmap().IsPrivate() && is6(a) == v6 {
			return true
		}
	}
	o := n.ObservedIP
	return o.IsValid() && !o.IsLoopback() && is6(o) == v6
}

// is6 reports whether a is an IPv6 address (IPv4-mapped ones count as
// IPv4).
func is6(a netip.Addr) bool { return a.Is6() && !a.Is4In6() }

// behindNAT reports whether n reaches the server from an address that is
// not its own: its internal addresses are then not reachable from other
// networks. Without an observation it is assumed not to be.
func behindNAT(n *api.Node) bool {
	if !n.ObservedIP.IsValid() || n.ObservedIP.IsLoopback() {
		return false
	}
	return !slices.Contains(n.InternalIPs, n.ObservedIP) && !slices.Contains(n.ExternalIPs, n.ObservedIP)
}

// AllowedIPs returns n's pod CIDRs that are node prefixes of one of the
// cluster CIDRs. Anything else (the cluster CIDR itself, 0.0.0.0/0, another
// range) is dropped: a node may only attract traffic for its own pods.
func AllowedIPs(n *api.Node, clusterCIDRs []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, pc := range n.PodCIDRs {
		for _, c := range clusterCIDRs {
			if ipam.Contains(c, pc) {
				out = append(out, pc)
				break
			}
		}
	}
	return out
}

// PublicEndpoints returns where a node on another network reaches n, at
// most one per address family (IPv4 first): what Endpoint chooses for a
// peer that shares no network with n, without observations. That is n's
// external IP, else a public address on its interface. A node behind NAT
// without an external IP has none: its peers learn its NAT mapping from
// their reports, which change too often to be published outside the
// netmap.
func PublicEndpoints(n *api.Node, p Policy) []netip.AddrPort {
	if n.ListenPort == 0 {
		return nil
	}
	v, stranger := &View{policy: p}, &api.Node{}
	var out []netip.AddrPort
	for _, v6 := range []bool{false, true} {
		if ep := v.endpointIn(stranger, n, v6); ep.IsValid() {
			out = append(out, ep)
		}
	}
	return out
}

// Endpoint is View.Endpoint for a view without observations.
func Endpoint(from, to *api.Node, p Policy) netip.AddrPort {
	return (&View{policy: p}).Endpoint(from, to)
}

// families reports which address families n can send from. A node that
// declares no address at all is assumed to have both.
func families(n *api.Node) (v4, v6 bool) {
	for _, list := range [][]netip.Addr{n.InternalIPs, n.ExternalIPs} {
		for _, a := range list {
			if a.Is4() || a.Is4In6() {
				v4 = true
			} else {
				v6 = true
			}
		}
	}
	if !v4 && !v6 {
		return true, true
	}
	return v4, v6
}

// SameNetwork reports whether a and b share a private network: an internal
// address of one lies in a network the other is attached to. Two clouds
// that both number their private networks alike (say 10.0.0.0/24) look the
// same here: such clusters need --flannel-external-ip, as the seed page
// prescribes for servers anyway.
func SameNetwork(a, b *api.Node) bool {
	if behindNAT(a) && a.ObservedIP == b.ObservedIP {
		return true // behind one NAT: a home network
	}
	for _, na := range a.Networks {
		for _, ib := range b.InternalIPs {
			if na.Contains(ib) {
				return true
			}
		}
	}
	for _, nb := range b.Networks {
		for _, ia := range a.InternalIPs {
			if nb.Contains(ia) {
				return true
			}
		}
	}
	return false
}

// ValidEndpoint reports whether a may be used as a WireGuard endpoint
// announced by a node: a unicast address that is not loopback, link-local,
// multicast or unspecified. Anything else is either useless across hosts
// or a way to point peers at the wrong place.
func ValidEndpoint(a netip.Addr) bool {
	a = a.Unmap()
	return a.IsValid() && !a.IsUnspecified() && !a.IsLoopback() && !a.IsMulticast() &&
		!a.IsLinkLocalUnicast() && !a.IsLinkLocalMulticast() && !a.IsInterfaceLocalMulticast() &&
		a != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}
