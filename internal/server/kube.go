package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/trellis-mesh/trellis/internal/kube"
	"github.com/trellis-mesh/trellis/internal/netmap"
	"github.com/trellis-mesh/trellis/internal/store"
)

// The server as the Kubernetes controller sees it (kube.Mesh): its nodes
// from the hub, and pod CIDR claims and records in the store, every
// write a compare-and-swap so that several servers agree.

// kubeMesh implements kube.Mesh.
type kubeMesh struct{ s *Server }

var _ kube.Mesh = kubeMesh{}

func (k kubeMesh) Members() ([]kube.Member, <-chan struct{}) { return k.s.hub.kubeMembers() }

func (k kubeMesh) AdoptPodCIDRs(ctx context.Context, name, uid string, cidrs []netip.Prefix) error {
	return k.s.reg.adoptPodCIDRs(ctx, name, uid, cidrs)
}

func (k kubeMesh) AllocatePodCIDRs(ctx context.Context, name string, inUse func(netip.Prefix) bool) ([]netip.Prefix, error) {
	if _, _, err := k.s.reg.get(ctx, name); errors.Is(err, store.ErrNotFound) {
		return nil, kube.ErrNoMember
	} else if err != nil {
		return nil, err
	}
	return k.s.reg.claim(ctx, name, inUse)
}

func (k kubeMesh) ClearPodCIDRs(ctx context.Context, name, goneUID string) error {
	return k.s.reg.clearPodCIDRs(ctx, name, goneUID)
}

func (k kubeMesh) SetKubeAddresses(ctx context.Context, name string, external, internal []netip.Addr) error {
	_, err := k.s.reg.update(ctx, name, func(rec *record) bool {
		if slices.Equal(rec.KubeExternalIPs, external) && slices.Equal(rec.KubeInternalIPs, internal) {
			return false
		}
		rec.KubeExternalIPs, rec.KubeInternalIPs = external, internal
		return true
	})
	if errors.Is(err, store.ErrNotFound) {
		return kube.ErrNoMember
	}
	return err
}

// kubeMembers returns every node as the Kubernetes controller needs it,
// and a channel closed on the next change of a record or a readiness.
func (h *hub) kubeMembers() ([]kube.Member, <-chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]kube.Member, 0, len(h.records))
	for name, r := range h.records {
		n := h.nodeLocked(name)
		out = append(out, kube.Member{
			Name: name, PodCIDRs: r.PodCIDRs, NodeUID: r.NodeUID, GoneUID: r.GoneUID,
			PublicKey: r.PublicKey, Endpoints: netmap.PublicEndpoints(&n, h.policy), Ready: n.Ready,
			KubeExternalIPs: r.KubeExternalIPs, KubeInternalIPs: r.KubeInternalIPs,
		})
	}
	return out, h.status
}

// adoptPodCIDRs makes cidrs, the pod CIDRs of the Node with UID uid, the
// pod CIDRs of node name (kube.Mesh.AdoptPodCIDRs): claims first, then
// the record, then the release of claims it no longer needs.
func (r *registry) adoptPodCIDRs(ctx context.Context, name, uid string, cidrs []netip.Prefix) error {
	rec, _, err := r.get(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		return kube.ErrNoMember
	} else if err != nil {
		return err
	}
	if slices.Equal(rec.PodCIDRs, cidrs) && rec.NodeUID == uid {
		return nil
	}
	var made []netip.Prefix
	undo := func() {
		for _, p := range made {
			r.releaseClaim(ctx, name, p)
		}
	}
	for _, p := range cidrs {
		created, err := r.claimExact(ctx, name, p)
		if err != nil {
			undo()
			return err
		}
		if created {
			made = append(made, p)
		}
	}
	var before []netip.Prefix // the pod CIDRs the record held
	_, err = r.update(ctx, name, func(rec *record) bool {
		before = rec.PodCIDRs
		if slices.Equal(rec.PodCIDRs, cidrs) && rec.NodeUID == uid {
			return false
		}
		if rec.NodeUID != "" && rec.NodeUID != uid {
			// The CIDRs of a Node that is gone: a server whose informer
			// still shows it must not bring them back.
			rec.GoneUID = rec.NodeUID
		}
		rec.PodCIDRs, rec.NodeUID = slices.Clone(cidrs), uid
		return true
	})
	if err != nil {
		undo()
		if errors.Is(err, store.ErrNotFound) {
			return kube.ErrNoMember
		}
		return err
	}
	// Release what the record held and holds no more, by key: a sweep of
	// every claim (releaseClaims) per adoption made a thousand Nodes
	// registering at once cost a thousand lists of a thousand claims.
	// A claim of the node's that its record never held (an interrupted
	// allocation) is taken over by whoever needs the prefix (claimExact).
	for _, p := range before {
		if !slices.Contains(cidrs, p) {
			r.releaseClaim(ctx, name, p)
		}
	}
	return nil
}

// claimExact claims prefix p for name, and reports whether it made the
// claim (false: name held it already). A claim of another node whose
// record holds p from a Kubernetes Node is a *kube.OverlapError. Any other
// claim of p is taken over: one left behind (no record, or a record that
// does not hold p: an allocation whose Node never got it) is deleted; one
// of a node that holds p from before Kubernetes mode loses it after that
// node's record was written without pod CIDRs.
func (r *registry) claimExact(ctx context.Context, name string, p netip.Prefix) (bool, error) {
	tookOver := false
	defer func() {
		if tookOver {
			r.forgetClaims()
		}
	}()
	b, err := json.Marshal(claim{Node: name, ClaimedAt: r.now().UTC()})
	if err != nil {
		return false, err
	}
	for range maxCASRetries {
		_, err := r.kv.Create(ctx, claimKey(p), b)
		if err == nil {
			r.claimsMu.Lock()
			if r.claims != nil {
				r.claims[p] = name // as claimIn does: the cache stays a hint
			}
			r.claimsMu.Unlock()
			return true, nil
		}
		if !errors.Is(err, store.ErrExists) {
			return false, fmt.Errorf("claim %s: %w", p, err)
		}
		v, rev, err := r.kv.Get(ctx, claimKey(p))
		if errors.Is(err, store.ErrNotFound) {
			continue // released meanwhile
		} else if err != nil {
			return false, fmt.Errorf("read the claim of %s: %w", p, err)
		}
		var c claim
		_ = json.Unmarshal(v, &c)
		if c.Node == name {
			return false, nil
		}
		holder, _, err := r.get(ctx, c.Node)
		switch {
		case errors.Is(err, store.ErrNotFound):
		case err != nil:
			return false, err
		case slices.Contains(holder.PodCIDRs, p) && holder.NodeUID != "":
			return false, &kube.OverlapError{Prefix: p, Holder: c.Node}
		case slices.Contains(holder.PodCIDRs, p):
			if err := r.clearPodCIDRs(ctx, c.Node, ""); err != nil {
				return false, err
			}
		}
		tookOver = true
		if err := r.kv.Delete(ctx, claimKey(p), rev); err != nil && !errors.Is(err, store.ErrConflict) && !errors.Is(err, store.ErrNotFound) {
			return false, fmt.Errorf("take over the claim of %s: %w", p, err)
		}
	}
	return false, fmt.Errorf("claim %s for %q: too many concurrent changes, try again", p, name)
}

// releaseClaim deletes the claim of p if name holds it.
func (r *registry) releaseClaim(ctx context.Context, name string, p netip.Prefix) {
	defer r.forgetClaims()
	v, rev, err := r.kv.Get(ctx, claimKey(p))
	if err != nil {
		return
	}
	var c claim
	if json.Unmarshal(v, &c) == nil && c.Node == name {
		_ = r.kv.Delete(ctx, claimKey(p), rev)
	}
}

// clearPodCIDRs writes the record of name without pod CIDRs (noting
// goneUID as its deleted Node, if not ""), then releases its claims
// (kube.Mesh.ClearPodCIDRs).
func (r *registry) clearPodCIDRs(ctx context.Context, name, goneUID string) error {
	_, err := r.update(ctx, name, func(rec *record) bool {
		if len(rec.PodCIDRs) == 0 && rec.NodeUID == "" && (goneUID == "" || rec.GoneUID == goneUID) {
			return false
		}
		rec.PodCIDRs, rec.NodeUID = nil, ""
		if goneUID != "" {
			rec.GoneUID = goneUID
		}
		return true
	})
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return err
	}
	r.releaseClaims(ctx, name, nil)
	return nil
}
