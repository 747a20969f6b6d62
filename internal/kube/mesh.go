package kube

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/trellis-mesh/trellis/internal/api"
)

// Member is a Trellis node as the controller sees it.
type Member struct {
	Name string
	// PodCIDRs are the node's pod CIDRs in the Trellis store, in the
	// order of the cluster CIDRs; empty while it has none (then it is in
	// no one's netmap).
	PodCIDRs []netip.Prefix
	// NodeUID is the UID of the Node whose spec.podCIDRs PodCIDRs are,
	// "" if they did not come from a Node. GoneUID is the UID of the last
	// Node of this name that was deleted.
	NodeUID, GoneUID string
	// PublicKey is the node's WireGuard key (zero: no data plane).
	PublicKey api.Key
	// Endpoints are where peers on other networks reach the node
	// (netmap.PublicEndpoints).
	Endpoints []netip.AddrPort
	// Ready: the node holds a netmap stream open on some server.
	Ready bool
	// KubeExternalIPs and KubeInternalIPs are the addresses last stored
	// with SetKubeAddresses.
	KubeExternalIPs, KubeInternalIPs []netip.Addr
}

// inMesh reports whether m is in the mesh with pod CIDRs from the Node
// with UID uid.
func (m *Member) inMesh(uid string) bool {
	return len(m.PodCIDRs) > 0 && m.NodeUID == uid && !m.PublicKey.IsZero() && m.Ready
}

func (m *Member) equal(o *Member) bool {
	return m.Name == o.Name && slices.Equal(m.PodCIDRs, o.PodCIDRs) && m.NodeUID == o.NodeUID && m.GoneUID == o.GoneUID &&
		m.PublicKey == o.PublicKey && slices.Equal(m.Endpoints, o.Endpoints) && m.Ready == o.Ready &&
		slices.Equal(m.KubeExternalIPs, o.KubeExternalIPs) && slices.Equal(m.KubeInternalIPs, o.KubeInternalIPs)
}

// Mesh is what the controller needs of the Trellis server: its nodes and
// the pod CIDR claims in its store. Every method that writes is safe to
// call from several servers at once (compare-and-swap in the store) and
// idempotent: calling it again with the same arguments changes nothing.
type Mesh interface {
	// Members returns every Trellis node and a channel that is closed on
	// the next change of any of them (record or readiness). The slice
	// is the caller's.
	Members() ([]Member, <-chan struct{})
	// AdoptPodCIDRs makes cidrs (one per cluster CIDR, in their order)
	// the pod CIDRs of node name, taken from the Node with UID uid. It
	// claims each prefix exactly, then writes the record (the UID it
	// replaces, if any, becomes GoneUID), then releases the claims of
	// name it no longer needs. A prefix held by another
	// node that has it from a Node returns *OverlapError and changes
	// nothing; one held by a node that does not (pod CIDRs from before
	// Kubernetes mode, or a claim left behind) is taken from it, its
	// record cleared first. ErrNoMember if name has no record.
	AdoptPodCIDRs(ctx context.Context, name, uid string, cidrs []netip.Prefix) error
	// AllocatePodCIDRs claims one free node prefix of each cluster CIDR
	// for name (those it holds already, if any), passing over the
	// prefixes inUse reports, and returns them. It does not write the
	// record: the Node is written first, and the record adopts it.
	AllocatePodCIDRs(ctx context.Context, name string, inUse func(netip.Prefix) bool) ([]netip.Prefix, error)
	// ClearPodCIDRs writes the record of name without pod CIDRs, noting
	// goneUID (if not "") as its deleted Node, and only after that
	// releases its claims: no netmap ever holds two peers with one
	// prefix. No error if name has no record.
	ClearPodCIDRs(ctx context.Context, name, goneUID string) error
	// SetKubeAddresses stores the addresses the Node's k3s.io
	// annotations give name; netmaps count them as its own.
	// ErrNoMember if name has no record.
	SetKubeAddresses(ctx context.Context, name string, external, internal []netip.Addr) error
}

// ErrNoMember: the Trellis node is not (or no longer) in the store.
var ErrNoMember = errors.New("no such Trellis node")

// OverlapError says that a pod CIDR is another node's.
type OverlapError struct {
	Prefix netip.Prefix
	Holder string
}

func (e *OverlapError) Error() string {
	return fmt.Sprintf("pod CIDR %s is held by node %s", e.Prefix, e.Holder)
}
