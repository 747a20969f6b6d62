package server

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/ipam"
	"github.com/trellis-mesh/trellis/internal/store"
)

// Keys in the store. One key per node and one per claimed pod CIDR; the
// claim and the node record are written in two steps (kine has no
// multi-key transactions), so orphaned claims are reclaimed by name.
const (
	prefixNodes   = "/trellis/nodes/"
	prefixClaims  = "/trellis/podcidrs/"
	keyCluster    = "/trellis/cluster"
	maxCASRetries = 20
)

// kv is the part of the store the server uses; *store.Store implements it.
// Every write with more than one possible writer is a compare-and-swap.
type kv interface {
	// Get returns a key's value and mod revision, or store.ErrNotFound.
	Get(ctx context.Context, key string) ([]byte, int64, error)
	// List returns the keys under prefix and the revision of the read.
	List(ctx context.Context, prefix string) ([]store.KV, int64, error)
	// Create writes key if it does not exist, else store.ErrExists.
	Create(ctx context.Context, key string, value []byte) (int64, error)
	// Update writes key if its mod revision is still prevRev, else
	// store.ErrConflict.
	Update(ctx context.Context, key string, value []byte, prevRev int64) (int64, error)
	// Delete removes key if its mod revision is still prevRev.
	Delete(ctx context.Context, key string, prevRev int64) error
}

// record is a node as stored: the public record plus its secrets' hashes.
type record struct {
	api.Node
	// PasswordHash is "sha256$<salt hex>$<hash hex>" of the node password.
	PasswordHash string `json:"passwordHash"`
	// CertSerial is the serial of the only node certificate accepted for
	// this node: every join issues a new one and retires the last.
	CertSerial string `json:"certSerial"`
	// Kubernetes mode (kube.go). NodeUID is the UID of the Node whose
	// spec.podCIDRs PodCIDRs are ("" when they did not come from one);
	// GoneUID the UID of the last Node of this name seen deleted, so a
	// server whose informer lags does not bring its CIDRs back.
	NodeUID string `json:"nodeUID,omitempty"`
	GoneUID string `json:"goneNodeUID,omitempty"`
	// KubeExternalIPs and KubeInternalIPs come from the Node's
	// k3s.io/external-ip and k3s.io/internal-ip annotations; netmaps add
	// them to the node's own (hub.nodeLocked).
	KubeExternalIPs []netip.Addr `json:"kubeExternalIPs,omitempty"`
	KubeInternalIPs []netip.Addr `json:"kubeInternalIPs,omitempty"`
}

type claim struct {
	Node      string    `json:"node"`
	ClaimedAt time.Time `json:"claimedAt"`
}

// clusterInfo is fixed at the first start.
type clusterInfo struct {
	ClusterCIDRs []netip.Prefix `json:"clusterCIDRs"`
	CreatedAt    time.Time      `json:"createdAt"`
}

func nodeKey(name string) string { return prefixNodes + name }

func claimKey(p netip.Prefix) string {
	return prefixClaims + strings.ReplaceAll(p.String(), "/", "_")
}

func hashPassword(pw string) (string, error) {
	salt := make([]byte, 16)
	if _, err := rand.Read(salt); err != nil {
		return "", fmt.Errorf("hash node password: %w", err)
	}
	sum := sha256.Sum256(append(salt, pw...))
	return "sha256$" + hex.EncodeToString(salt) + "$" + hex.EncodeToString(sum[:]), nil
}

func passwordMatches(stored, pw string) bool {
	parts := strings.Split(stored, "$")
	if len(parts) != 3 || parts[0] != "sha256" {
		return false
	}
	salt, err := hex.DecodeString(parts[1])
	if err != nil {
		return false
	}
	want, err := hex.DecodeString(parts[2])
	if err != nil {
		return false
	}
	sum := sha256.Sum256(append(salt, pw...))
	return subtle.ConstantTimeCompare(sum[:], want) == 1
}

// registry keeps node records and pod CIDR claims in the store.
type registry struct {
	kv           kv
	clusterCIDRs []netip.Prefix
	now          func() time.Time
	// podCIDRsFromNodes: a join allocates no pod CIDR; the Kubernetes
	// controller gives the node its Node's (kube.go).
	podCIDRsFromNodes bool

	// claimsMu serialises this server's claims; claims caches the claim
	// keys (prefix → node) so that a join does not list them all. It is
	// only a hint: the store's compare-and-swap decides, and a lost race
	// (another server claimed) reloads it. nil means "load first".
	claimsMu sync.Mutex
	claims   map[netip.Prefix]string
}

// loadClaimsLocked reads every claim from the store into the cache.
func (r *registry) loadClaimsLocked(ctx context.Context) error {
	kvs, _, err := r.kv.List(ctx, prefixClaims)
	if err != nil {
		return fmt.Errorf("list pod CIDR claims: %w", err)
	}
	r.claims = make(map[netip.Prefix]string, len(kvs))
	for _, e := range kvs {
		p, err := netip.ParsePrefix(strings.ReplaceAll(strings.TrimPrefix(e.Key, prefixClaims), "_", "/"))
		if err != nil {
			continue
		}
		var c claim
		_ = json.Unmarshal(e.Value, &c)
		r.claims[p] = c.Node
	}
	return nil
}

// forgetClaims drops the cache after claims were deleted.
func (r *registry) forgetClaims() {
	r.claimsMu.Lock()
	r.claims = nil
	r.claimsMu.Unlock()
}

// ensureCluster records the cluster CIDRs at first start and refuses to
// run with different ones later: every node's pod CIDR was cut from them.
func (r *registry) ensureCluster(ctx context.Context) error {
	b, err := json.Marshal(clusterInfo{ClusterCIDRs: r.clusterCIDRs, CreatedAt: r.now().UTC()})
	if err != nil {
		return err
	}
	_, err = r.kv.Create(ctx, keyCluster, b)
	if err == nil {
		return nil
	}
	if !errors.Is(err, store.ErrExists) {
		return fmt.Errorf("record cluster settings: %w", err)
	}
	old, _, err := r.kv.Get(ctx, keyCluster)
	if err != nil {
		return fmt.Errorf("read cluster settings: %w", err)
	}
	var ci clusterInfo
	if err := json.Unmarshal(old, &ci); err != nil {
		return fmt.Errorf("read cluster settings: %w", err)
	}
	if !slices.Equal(ci.ClusterCIDRs, r.clusterCIDRs) {
		return fmt.Errorf("this cluster was created with --cluster-cidr=%s and cannot change it (nodes hold pod CIDRs from it); start with --cluster-cidr=%s",
			joinPrefixes(ci.ClusterCIDRs), joinPrefixes(ci.ClusterCIDRs))
	}
	return nil
}

func joinPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

func (r *registry) get(ctx context.Context, name string) (*record, int64, error) {
	b, rev, err := r.kv.Get(ctx, nodeKey(name))
	if err != nil {
		return nil, 0, err
	}
	var rec record
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, 0, fmt.Errorf("decode node %q: %w", name, err)
	}
	return &rec, rev, nil
}

func (r *registry) list(ctx context.Context) ([]record, int64, error) {
	kvs, rev, err := r.kv.List(ctx, prefixNodes)
	if err != nil {
		return nil, 0, fmt.Errorf("list nodes: %w", err)
	}
	out := make([]record, 0, len(kvs))
	for _, e := range kvs {
		var rec record
		if err := json.Unmarshal(e.Value, &rec); err != nil {
			continue // a record we cannot read is not a node we can serve
		}
		out = append(out, rec)
	}
	return out, rev, nil
}

// joinError is an error with an HTTP status and a code for the client.
type joinError struct {
	status int
	code   string
	msg    string
}

func (e *joinError) Error() string { return e.msg }

// upsert stores a join: a new node gets pod CIDRs; a known node must prove
// it is the same machine with its password, and keeps its CIDRs.
// update is called with the record to fill in before it is written.
func (r *registry) upsert(ctx context.Context, name, password string, fill func(*record)) (*record, error) {
	for range maxCASRetries {
		rec, rev, err := r.get(ctx, name)
		switch {
		case err == nil:
			if !passwordMatches(rec.PasswordHash, password) {
				return nil, &joinError{status: 409, code: api.ErrCodeNameTaken, msg: fmt.Sprintf(
					"node name %q is already used by another machine (its node password differs); give this machine another name with --node-name or --with-node-id, or, if it is the same machine and its data dir was lost, run 'trellis node delete %s' first",
					name, name)}
			}
			fill(rec)
			rec.UpdatedAt = r.now().UTC()
			b, err := json.Marshal(rec)
			if err != nil {
				return nil, err
			}
			if _, err := r.kv.Update(ctx, nodeKey(name), b, rev); errors.Is(err, store.ErrConflict) {
				continue
			} else if err != nil {
				return nil, fmt.Errorf("update node %q: %w", name, err)
			}
			return rec, nil
		case errors.Is(err, store.ErrNotFound):
			var cidrs []netip.Prefix
			if !r.podCIDRsFromNodes {
				if cidrs, err = r.claim(ctx, name, nil); err != nil {
					return nil, err
				}
			}
			hash, err := hashPassword(password)
			if err != nil {
				return nil, err
			}
			now := r.now().UTC()
			rec := &record{Node: api.Node{Name: name, PodCIDRs: cidrs, CreatedAt: now, UpdatedAt: now}, PasswordHash: hash}
			fill(rec)
			b, err := json.Marshal(rec)
			if err != nil {
				return nil, err
			}
			if _, err := r.kv.Create(ctx, nodeKey(name), b); errors.Is(err, store.ErrExists) {
				// Another join of this name won the race; its claims are
				// ours too (claims are by name), so try again as an update.
				continue
			} else if err != nil {
				return nil, fmt.Errorf("create node %q: %w", name, err)
			}
			return rec, nil
		default:
			return nil, fmt.Errorf("read node %q: %w", name, err)
		}
	}
	return nil, fmt.Errorf("join %q: too many concurrent changes, try again", name)
}

// claim returns one node prefix per cluster CIDR for name: claims it
// already holds (left by an interrupted join), else the lowest free ones.
// Prefixes inUse reports (if not nil) are passed over.
func (r *registry) claim(ctx context.Context, name string, inUse func(netip.Prefix) bool) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, cluster := range r.clusterCIDRs {
		p, err := r.claimIn(ctx, cluster, name, inUse)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

func (r *registry) claimIn(ctx context.Context, cluster netip.Prefix, name string, inUse func(netip.Prefix) bool) (netip.Prefix, error) {
	taken := func(p netip.Prefix) bool { return inUse != nil && inUse(p) }
	r.claimsMu.Lock()
	defer r.claimsMu.Unlock()
	for attempt := range maxCASRetries {
		if r.claims == nil || attempt > 0 {
			if err := r.loadClaimsLocked(ctx); err != nil {
				return netip.Prefix{}, err
			}
		}
		used := make(map[netip.Prefix]bool, len(r.claims))
		for p, node := range r.claims {
			if node == name && ipam.Contains(cluster, p) && !taken(p) {
				return p, nil // left by an interrupted join of this node
			}
			used[p] = true
		}
		// The lowest free prefix; after losing a race for it, start
		// where the name hashes to, so that concurrent joins spread out
		// instead of racing again for the same one.
		var start uint64
		if attempt > 0 {
			h := fnv.New64a()
			h.Write([]byte(name))
			start = h.Sum64() + uint64(attempt)
		}
		p, err := ipam.NextFrom(cluster, used, start)
		for err == nil && taken(p) {
			used[p] = true
			p, err = ipam.NextFrom(cluster, used, start)
		}
		if err != nil {
			return netip.Prefix{}, &joinError{status: 507, code: api.ErrCodeExhausted, msg: err.Error()}
		}
		b, _ := json.Marshal(claim{Node: name, ClaimedAt: r.now().UTC()})
		if _, err := r.kv.Create(ctx, claimKey(p), b); errors.Is(err, store.ErrExists) {
			continue
		} else if err != nil {
			return netip.Prefix{}, fmt.Errorf("claim %s: %w", p, err)
		}
		r.claims[p] = name
		return p, nil
	}
	return netip.Prefix{}, fmt.Errorf("claim a pod CIDR for %q: too many concurrent joins, try again", name)
}

// remove deletes a node and releases its pod CIDRs.
func (r *registry) remove(ctx context.Context, name string) (*record, error) {
	for range maxCASRetries {
		rec, rev, err := r.get(ctx, name)
		if err != nil {
			return nil, err
		}
		if err := r.kv.Delete(ctx, nodeKey(name), rev); errors.Is(err, store.ErrConflict) {
			continue
		} else if err != nil {
			return nil, fmt.Errorf("delete node %q: %w", name, err)
		}
		r.releaseClaims(ctx, name, nil)
		return rec, nil
	}
	return nil, fmt.Errorf("delete node %q: too many concurrent changes, try again", name)
}

// releaseClaims deletes the pod CIDR claims held by name, but those of
// the prefixes in keep.
func (r *registry) releaseClaims(ctx context.Context, name string, keep []netip.Prefix) {
	defer r.forgetClaims()
	kvs, _, err := r.kv.List(ctx, prefixClaims)
	if err != nil {
		return
	}
	for _, e := range kvs {
		var c claim
		if json.Unmarshal(e.Value, &c) == nil && c.Node == name && !slices.ContainsFunc(keep, func(p netip.Prefix) bool { return claimKey(p) == e.Key }) {
			_ = r.kv.Delete(ctx, e.Key, e.ModRevision)
		}
	}
}

// reclaimOrphans releases claims older than grace whose node does not
// exist: what an interrupted join leaves behind.
func (r *registry) reclaimOrphans(ctx context.Context, grace time.Duration) (int, error) {
	recs, _, err := r.list(ctx)
	if err != nil {
		return 0, err
	}
	exists := map[string]bool{}
	for _, rec := range recs {
		exists[rec.Name] = true
	}
	kvs, _, err := r.kv.List(ctx, prefixClaims)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, e := range kvs {
		var c claim
		if json.Unmarshal(e.Value, &c) != nil || exists[c.Node] || r.now().Sub(c.ClaimedAt) < grace {
			continue
		}
		if r.kv.Delete(ctx, e.Key, e.ModRevision) == nil {
			n++
		}
	}
	if n > 0 {
		r.forgetClaims()
	}
	return n, nil
}

// update applies fn to the record of name with compare-and-swap retries;
// fn reports whether it changed anything (nothing is written otherwise).
func (r *registry) update(ctx context.Context, name string, fn func(*record) bool) (bool, error) {
	for range maxCASRetries {
		rec, rev, err := r.get(ctx, name)
		if err != nil {
			return false, err
		}
		if !fn(rec) {
			return false, nil
		}
		rec.UpdatedAt = r.now().UTC()
		b, err := json.Marshal(rec)
		if err != nil {
			return false, err
		}
		if _, err := r.kv.Update(ctx, nodeKey(name), b, rev); errors.Is(err, store.ErrConflict) {
			continue
		} else if err != nil {
			return false, fmt.Errorf("update node %q: %w", name, err)
		}
		return true, nil
	}
	return false, fmt.Errorf("update node %q: too many concurrent changes, try again", name)
}
