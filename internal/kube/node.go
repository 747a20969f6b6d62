package kube

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"

	"github.com/trellis-mesh/trellis/internal/ipam"
	"github.com/trellis-mesh/trellis/internal/netmap"
)

// What Trellis reads from and writes to a Node. Everything it writes is
// under one prefix of its own, except the NetworkUnavailable condition,
// which the scheduler reads.
const (
	// AnnotationPrefix is the prefix of every annotation Trellis writes.
	AnnotationPrefix = "trellis-mesh.io/"
	// AnnotationPublicKey is the node's WireGuard public key (base64).
	AnnotationPublicKey = AnnotationPrefix + "public-key"
	// AnnotationEndpoints lists, comma-separated, the ip:port at which
	// peers on other networks reach the node's WireGuard (one per address
	// family); absent for a node behind NAT without an external IP.
	AnnotationEndpoints = AnnotationPrefix + "endpoints"
	// AnnotationK3sExternalIP and AnnotationK3sInternalIP are what K3s
	// puts on its Nodes (comma-separated addresses, both families): they
	// count as the node's external and internal IPs, besides those the
	// node gives itself (--node-external-ip, --node-ip).
	AnnotationK3sExternalIP = "k3s.io/external-ip"
	AnnotationK3sInternalIP = "k3s.io/internal-ip"

	// ConditionReasonUp is the reason of NetworkUnavailable=False.
	ConditionReasonUp = "TrellisIsUp"
	// ConditionReasonRefused is the reason of NetworkUnavailable=True for
	// a Node whose pod CIDR Trellis refuses.
	ConditionReasonRefused = "TrellisPodCIDRRefused"
	// ConditionReasonRemoved is the reason of NetworkUnavailable=True
	// on a Node whose Trellis node was deleted (trellis node delete).
	ConditionReasonRemoved = "TrellisNodeDeleted"
	// EventReasonRefused is the reason of the Event on such a Node.
	EventReasonRefused = "PodCIDRRefused"
	// FieldManager names Trellis in the Node's managed fields.
	FieldManager = "trellis"

	conditionMessageUp = "Trellis has put this node's pod CIDRs on the WireGuard mesh"
	// maxAddresses bounds the addresses taken from one annotation.
	maxAddresses = 16
)

// ParseAddressList parses a comma-separated list of IP addresses, as K3s
// writes k3s.io/external-ip and k3s.io/internal-ip. Blanks around entries
// are ignored. Entries that are not addresses, or not addresses another
// host can reach (loopback, link-local, multicast, unspecified), are left
// out and named in the error; the addresses that are valid are returned
// all the same, unmapped, without duplicates, at most 16.
func ParseAddressList(s string) ([]netip.Addr, error) {
	var out []netip.Addr
	var bad []string
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		a, err := netip.ParseAddr(f)
		if err != nil || a.Zone() != "" || !netmap.ValidEndpoint(a) {
			if len(bad) < 3 {
				bad = append(bad, fmt.Sprintf("%.64q", f))
			}
			continue
		}
		a = a.Unmap()
		if !slices.Contains(out, a) && len(out) < maxAddresses {
			out = append(out, a)
		}
	}
	if len(bad) > 0 {
		msg := strings.Join(bad, ", ")
		if len(msg) > 200 { // quoting may expand a strange value fourfold
			msg = strings.ToValidUTF8(msg[:200], "") + "…"
		}
		return out, fmt.Errorf("not usable as node addresses: %s", msg)
	}
	return out, nil
}

// refusal says why Trellis refuses a Node's pod CIDRs, in words that say
// what to fix.
type refusal struct {
	message string
	overlap bool // another node holds the prefix: may clear up by itself
}

// nodePodCIDRs returns the pod CIDRs of a Node's spec (spec.podCIDRs, or
// spec.podCIDR on a Node that has only that), in the order of the
// cluster CIDRs, or why Trellis cannot use them: one node prefix of each
// cluster CIDR, no more, no other. Nil and no refusal means the Node has
// none yet.
func nodePodCIDRs(spec *corev1.NodeSpec, clusterCIDRs []netip.Prefix) ([]netip.Prefix, *refusal) {
	raw := spec.PodCIDRs
	if len(raw) == 0 && spec.PodCIDR != "" {
		raw = []string{spec.PodCIDR}
	}
	if len(raw) == 0 {
		return nil, nil
	}
	cluster := joinPrefixes(clusterCIDRs)
	out := make([]netip.Prefix, len(clusterCIDRs))
	for _, s := range raw {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, &refusal{message: fmt.Sprintf("spec.podCIDRs has %.64q, which is not a CIDR prefix", s)}
		}
		i := slices.IndexFunc(clusterCIDRs, func(c netip.Prefix) bool { return c.Overlaps(p) && c.Addr().Is4() == p.Addr().Is4() })
		switch {
		case i < 0:
			return nil, &refusal{message: fmt.Sprintf("pod CIDR %s is outside the pod range of Trellis: kube-controller-manager --cluster-cidr must equal trellis server --cluster-cidr=%s", p, cluster)}
		case !ipam.Contains(clusterCIDRs[i], p):
			bits := ipam.NodeBits(clusterCIDRs[i])
			flag := "--node-cidr-mask-size-ipv4"
			if p.Addr().Is6() {
				flag = "--node-cidr-mask-size-ipv6"
			}
			return nil, &refusal{message: fmt.Sprintf("pod CIDR %s is not a /%d inside %s, the node prefix size of Trellis: start kube-controller-manager with --cluster-cidr=%s and %s=%d", p, bits, clusterCIDRs[i], cluster, flag, bits)}
		case out[i].IsValid():
			return nil, &refusal{message: fmt.Sprintf("spec.podCIDRs has two prefixes of %s (%s and %s): a node has one per address family", clusterCIDRs[i], out[i], p)}
		}
		out[i] = p
	}
	for i, p := range out {
		if !p.IsValid() {
			fam := "IPv4"
			if clusterCIDRs[i].Addr().Is6() {
				fam = "IPv6"
			}
			return nil, &refusal{message: fmt.Sprintf("the Node has no %s pod CIDR, but trellis server --cluster-cidr=%s has an %s range: kube-controller-manager --cluster-cidr must equal it (both families), or trellis server --cluster-cidr must name only the families Kubernetes allocates", fam, cluster, fam)}
		}
	}
	return out, nil
}

// overlapRefusal is the refusal of a prefix another node holds.
func overlapRefusal(e *OverlapError) *refusal {
	return &refusal{overlap: true, message: fmt.Sprintf("pod CIDR %s is also the pod CIDR of node %s, and two nodes must never share one: whatever wrote spec.podCIDR of this Node must allocate from trellis server --cluster-cidr without overlaps (kube-controller-manager --allocate-node-cidrs does); delete this Node so that it registers again with a free one", e.Prefix, e.Holder)}
}

func joinPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

// wantAnnotations are the annotations m's Node should carry; an empty
// value means the annotation should be absent.
func wantAnnotations(m *Member) map[string]string {
	want := map[string]string{AnnotationPublicKey: "", AnnotationEndpoints: ""}
	if !m.PublicKey.IsZero() {
		want[AnnotationPublicKey] = m.PublicKey.String()
	}
	eps := make([]string, len(m.Endpoints))
	for i, ep := range m.Endpoints {
		eps[i] = ep.String()
	}
	want[AnnotationEndpoints] = strings.Join(eps, ",")
	return want
}

// annotationPatch returns the merge patch that gives node the annotations
// want (empty values removed), or nil when it has them already.
func annotationPatch(node *corev1.Node, want map[string]string) []byte {
	diff := map[string]any{}
	for k, v := range want {
		have, ok := node.Annotations[k]
		switch {
		case v == "" && ok:
			diff[k] = nil
		case v != "" && have != v:
			diff[k] = v
		}
	}
	if len(diff) == 0 {
		return nil
	}
	b, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": diff}})
	return b
}

// condition is the NetworkUnavailable condition Trellis wants on a Node.
type condition struct {
	status  corev1.ConditionStatus
	reason  string
	message string
}

// upCondition is NetworkUnavailable=False: the node is in the mesh.
func upCondition() condition {
	return condition{status: corev1.ConditionFalse, reason: ConditionReasonUp, message: conditionMessageUp}
}

// removedCondition is NetworkUnavailable=True for a node deleted from
// Trellis.
func removedCondition() condition {
	return condition{status: corev1.ConditionTrue, reason: ConditionReasonRemoved,
		message: "the Trellis node was deleted (trellis node delete): this node is out of the mesh until its agent joins again"}
}

// networkUnavailable returns the Node's NetworkUnavailable condition.
func networkUnavailable(n *corev1.Node) (corev1.NodeCondition, bool) {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeNetworkUnavailable {
			return c, true
		}
	}
	return corev1.NodeCondition{}, false
}

// refusedCondition is NetworkUnavailable=True with the refusal.
func refusedCondition(r *refusal) condition {
	return condition{status: corev1.ConditionTrue, reason: ConditionReasonRefused, message: "Trellis refuses this node's pod CIDR: " + r.message}
}

// conditionPatch returns the strategic merge patch of nodes/status that
// sets want (conditions merge by type, so only NetworkUnavailable is
// touched), or nil when the Node has it already. The times are those of
// the transition: nothing is rewritten to say that nothing changed.
func conditionPatch(node *corev1.Node, want condition, now func() string) []byte {
	if c, ok := networkUnavailable(node); ok && c.Status == want.status && c.Reason == want.reason && c.Message == want.message {
		return nil
	}
	t := now()
	b, _ := json.Marshal(map[string]any{"status": map[string]any{"conditions": []map[string]any{{
		"type": corev1.NodeNetworkUnavailable, "status": want.status, "reason": want.reason, "message": want.message,
		"lastTransitionTime": t, "lastHeartbeatTime": t,
	}}}})
	return b
}

// podCIDRPatch returns the merge patch that writes cidrs into a Node
// whose resourceVersion is rv (a precondition: it fails with a conflict
// if the Node changed since). A merge patch replaces the list: a
// strategic merge patch would merge it with what an allocator may have
// written meanwhile.
func podCIDRPatch(rv string, cidrs []netip.Prefix) ([]byte, error) {
	if len(cidrs) == 0 {
		return nil, errors.New("no pod CIDR to write")
	}
	list := make([]string, len(cidrs))
	for i, p := range cidrs {
		list[i] = p.String()
	}
	return json.Marshal(map[string]any{
		"metadata": map[string]any{"resourceVersion": rv},
		"spec":     map[string]any{"podCIDR": list[0], "podCIDRs": list},
	})
}
