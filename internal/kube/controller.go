package kube

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
)

const (
	// eventNamespace holds the Events about Nodes, as the kubelet's.
	eventNamespace = "default"
	// membersCoalesce gathers a burst of record changes (reports) into
	// one O(nodes) comparison.
	membersCoalesce = 50 * time.Millisecond
	// forbiddenEvery spaces the error logged for a denied permission.
	forbiddenEvery = time.Minute
)

var (
	permPatchNode   = permission{verb: "patch", resource: "nodes"}
	permPatchStatus = permission{verb: "patch", resource: "nodes", subresource: "status"}
	permEvents      = permission{verb: "create", resource: "events"}
	permPatchEvents = permission{verb: "patch", resource: "events"}
)

// Stats counts what the controller wrote to Kubernetes, and what it
// sees.
type Stats struct {
	// NodePatches counts patches of Nodes (annotations, pod CIDRs) and
	// StatusPatches of nodes/status (the condition); Events the Events
	// created or refreshed.
	NodePatches, StatusPatches, Events int64
	// Reachable: the last call to the API server reached it.
	Reachable bool
	// Refused counts the Nodes whose pod CIDRs are refused now.
	Refused int
}

// Controller follows the Nodes of one Kubernetes cluster and keeps the
// Trellis nodes of the same names in step. Start it with Start; stop it
// with Close.
type Controller struct {
	cfg    Config
	log    *slog.Logger
	mesh   Mesh
	http   *http.Client
	client clients
	user   string // as Kubernetes authenticates us; "" if unknown
	now    func() time.Time

	nodes  cache.SharedIndexInformer
	lister corelisters.NodeLister
	// queue holds the names of Nodes to bring into the mesh (pod CIDRs
	// and addresses into the records: the store, no API calls but
	// allocations and Events), writes those whose Node should show
	// something new (annotations and condition: API calls at cfg.QPS).
	// Two queues, so that the pod CIDRs of a thousand new Nodes do not
	// wait behind each other's Node writes.
	queue  workqueue.TypedRateLimitingInterface[string]
	writes workqueue.TypedRateLimitingInterface[string]
	// unreachable: the API server did not answer the last list or watch.
	unreachable atomic.Bool

	cancel    context.CancelFunc
	wg        sync.WaitGroup
	closeOnce sync.Once

	// loaded is closed once the Trellis nodes were read: until then a
	// missing one means nothing.
	loaded chan struct{}

	mu         sync.Mutex
	members    map[string]*Member   // guarded by mu; the last Members()
	gone       map[string]bool      // guarded by mu; Trellis nodes seen deleted while this controller ran
	emptySince map[string]time.Time // guarded by mu; when a Node was first seen without a pod CIDR
	refused    map[string]*refusal  // guarded by mu; refusals announced, by node
	badAddrs   map[string]string    // guarded by mu; last bad k3s annotation logged, by node
	forbidden  time.Time            // guarded by mu; when a denial was last logged

	nodePatches, statusPatches, events atomic.Int64
}

// Start connects to Kubernetes, checks that Trellis may do what it needs
// there (a *ForbiddenError names what it may not) and starts following
// Nodes. When the API server cannot be reached it logs that and goes on:
// Trellis keeps serving the last known state, and the informer catches
// up once the API server answers. ctx bounds the start only.
func Start(ctx context.Context, cfg Config, mesh Mesh) (*Controller, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger.With("component", "kubernetes")
	rc, source, err := cfg.restConfig()
	if err != nil {
		return nil, err
	}
	rc = rest.CopyConfig(rc)
	rc.UserAgent = "trellis"
	rc.QPS, rc.Burst = cfg.QPS, int(2*cfg.QPS)
	// A dialer of our own gives this controller its own transport
	// (client-go shares cached ones): Close can close its connections.
	rc.Dial = (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	hc, err := rest.HTTPClientFor(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	client, err := newClients(rc, hc)
	if err != nil {
		hc.CloseIdleConnections()
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	c := &Controller{
		cfg: cfg, log: log, mesh: mesh, http: hc, client: client, now: time.Now,
		gone: map[string]bool{}, emptySince: map[string]time.Time{}, loaded: make(chan struct{}),
		refused: map[string]*refusal{}, badAddrs: map[string]string{},
	}
	actx, cancel := context.WithTimeout(ctx, cfg.RequestTimeout)
	c.user, err = checkAccess(actx, client)
	cancel()
	switch {
	case err != nil && apierrors.IsUnauthorized(err):
		hc.CloseIdleConnections()
		return nil, fmt.Errorf("the Kubernetes API server at %s does not accept the credentials of the %s (%w): renew its token or certificate", rc.Host, source, err)
	case err != nil && !unreachable(err):
		// The API server answered: a denial (*ForbiddenError), or
		// something else it refuses.
		hc.CloseIdleConnections()
		return nil, err
	case err != nil:
		c.unreachable.Store(true)
		log.Warn("the Kubernetes API server does not answer; serving the last known state and following Nodes once it does", "config", source, "server", rc.Host, "err", err)
	default:
		log.Info("Kubernetes mode: pod CIDRs come from Nodes", "config", source, "server", rc.Host, "user", c.user,
			"clusterCIDR", joinPrefixes(cfg.ClusterCIDRs), "allocateGrace", cfg.AllocateGrace)
	}

	runCtx, stop := context.WithCancel(context.Background())
	// client-go logs through the context where it can.
	runCtx = klog.NewContext(runCtx, logr.FromSlogHandler(log.Handler()))
	c.cancel = stop
	c.queue = workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](100*time.Millisecond, 30*time.Second),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "trellis-nodes"})
	c.writes = workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](100*time.Millisecond, 30*time.Second),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "trellis-node-writes"})
	c.nodes = cache.NewSharedIndexInformerWithOptions(c.listWatch(), &corev1.Node{}, cache.SharedIndexInformerOptions{ResyncPeriod: cfg.Resync})
	c.lister = corelisters.NewNodeLister(c.nodes.GetIndexer())
	if err := c.nodes.SetTransform(trimNode); err != nil {
		stop()
		return nil, err
	}
	if err := c.nodes.SetWatchErrorHandlerWithContext(c.watchError); err != nil {
		stop()
		return nil, err
	}
	if _, err := c.nodes.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { c.enqueue(obj) },
		UpdateFunc: func(old, obj any) { c.enqueueUpdate(old, obj) },
		DeleteFunc: func(obj any) { c.enqueue(obj) },
	}); err != nil {
		stop()
		return nil, err
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		c.nodes.RunWithContext(runCtx)
	}()
	c.wg.Add(2 + cfg.Workers)
	go func() {
		defer c.wg.Done()
		c.followMembers(runCtx)
	}()
	go func() {
		defer c.wg.Done()
		start := time.Now()
		if cache.WaitForCacheSync(runCtx.Done(), c.nodes.HasSynced) {
			log.Info("following Kubernetes Nodes", "nodes", len(c.nodes.GetStore().ListKeys()), "took", time.Since(start).Round(time.Millisecond))
		}
	}()
	c.wg.Add(cfg.Workers)
	for range cfg.Workers {
		go func() {
			defer c.wg.Done()
			c.work(runCtx, c.queue, c.sync)
		}()
		go func() {
			defer c.wg.Done()
			c.work(runCtx, c.writes, c.writeNode)
		}()
	}
	return c, nil
}

// Close stops following Nodes and waits for every goroutine. It is
// idempotent.
func (c *Controller) Close() error {
	c.closeOnce.Do(func() {
		c.cancel()
		c.queue.ShutDown()
		c.writes.ShutDown()
		c.wg.Wait()
		c.http.CloseIdleConnections()
	})
	return nil
}

// Stats returns what the controller wrote so far.
func (c *Controller) Stats() Stats {
	c.mu.Lock()
	refused := len(c.refused)
	c.mu.Unlock()
	return Stats{NodePatches: c.nodePatches.Load(), StatusPatches: c.statusPatches.Load(), Events: c.events.Load(),
		Reachable: !c.unreachable.Load(), Refused: refused}
}

// listWatch lists and watches Nodes, patiently: a call that cannot reach
// the API server is tried again every second until it does, instead of
// going back to the reflector, whose retry backoff grows to 30-60 s in an
// outage. So the informer catches up within about a second of the API
// server's return. Answers of the API server (a denial, an expired
// resource version) go back at once.
func (c *Controller) listWatch() cache.ListerWatcher {
	nodes := c.client.core.Nodes()
	return cache.ToListWatcherWithWatchListSemantics(&cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			return patiently(ctx, c, func(ctx context.Context) (runtime.Object, error) { return nodes.List(ctx, opts) })
		},
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			return patiently(ctx, c, func(ctx context.Context) (watch.Interface, error) { return nodes.Watch(ctx, opts) })
		},
	}, c.client.core)
}

// patiently calls call until it reaches the API server or ctx ends, and
// logs when the API server stops and starts answering.
func patiently[T any](ctx context.Context, c *Controller, call func(context.Context) (T, error)) (T, error) {
	for {
		v, err := call(ctx)
		if err == nil || !unreachable(err) || ctx.Err() != nil {
			if err == nil && c.unreachable.CompareAndSwap(true, false) {
				c.log.Info("the Kubernetes API server answers again; catching up with the Nodes")
			}
			return v, err
		}
		if !c.unreachable.Swap(true) {
			c.log.Warn("the Kubernetes API server does not answer; keeping the last known state (the mesh is unchanged) and trying every second", "err", err)
		}
		select {
		case <-ctx.Done():
			return v, err
		case <-time.After(time.Second):
		}
	}
}

// unreachable reports whether err means the API server was not reached
// or could not serve: no answer at all, or 429, 503 or 504.
func unreachable(err error) bool {
	var fe *ForbiddenError
	if errors.As(err, &fe) {
		return false
	}
	var st apierrors.APIStatus
	if errors.As(err, &st) {
		switch st.Status().Code {
		case http.StatusTooManyRequests, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
			return true
		}
		return false
	}
	return true
}

// trimNode drops what Trellis never reads from the cached Nodes (images
// are most of a Node's size).
func trimNode(obj any) (any, error) {
	if n, ok := obj.(*corev1.Node); ok {
		n.ManagedFields = nil
		n.Status.Images = nil
		n.Status.VolumesAttached = nil
		n.Status.VolumesInUse = nil
	}
	return obj, nil
}

func (c *Controller) enqueue(obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	if n, ok := obj.(*corev1.Node); ok {
		c.queue.Add(n.Name)
	}
}

// enqueueUpdate queues a Node whose update matters to Trellis: not the
// kubelet's status heartbeats. A resync (same version) always does.
func (c *Controller) enqueueUpdate(oldObj, obj any) {
	o, ok1 := oldObj.(*corev1.Node)
	n, ok2 := obj.(*corev1.Node)
	if !ok1 || !ok2 {
		c.enqueue(obj)
		return
	}
	if o.ResourceVersion == n.ResourceVersion || o.UID != n.UID || o.Spec.PodCIDR != n.Spec.PodCIDR ||
		!slices.Equal(o.Spec.PodCIDRs, n.Spec.PodCIDRs) || !sameAnnotations(o, n) || !sameNetworkCondition(o, n) {
		c.queue.Add(n.Name)
	}
}

func sameAnnotations(a, b *corev1.Node) bool {
	for _, k := range []string{AnnotationPublicKey, AnnotationEndpoints, AnnotationK3sExternalIP, AnnotationK3sInternalIP} {
		if a.Annotations[k] != b.Annotations[k] {
			return false
		}
	}
	return true
}

func sameNetworkCondition(a, b *corev1.Node) bool {
	x, _ := networkUnavailable(a)
	y, _ := networkUnavailable(b)
	return x.Status == y.Status && x.Reason == y.Reason && x.Message == y.Message
}

// followMembers keeps c.members in step with the Trellis nodes and queues
// the names whose record or readiness changed.
func (c *Controller) followMembers(ctx context.Context) {
	for {
		ms, changed := c.mesh.Members()
		c.updateMembers(ms)
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(membersCoalesce):
		}
	}
}

func (c *Controller) updateMembers(ms []Member) {
	c.mu.Lock()
	next := make(map[string]*Member, len(ms))
	var dirty []string
	released := false
	for i := range ms {
		m := &ms[i]
		next[m.Name] = m
		old := c.members[m.Name]
		if old == nil || !old.equal(m) {
			dirty = append(dirty, m.Name)
			released = released || (old != nil && len(old.PodCIDRs) > 0 && !slices.Equal(old.PodCIDRs, m.PodCIDRs))
		}
	}
	for name, old := range c.members {
		if next[name] == nil {
			dirty = append(dirty, name)
			c.gone[name] = true
			released = released || len(old.PodCIDRs) > 0
		}
	}
	for name := range next {
		delete(c.gone, name)
	}
	first := c.members == nil
	if released {
		// A prefix may have come free: look again at the Nodes refused
		// for holding one that another node held.
		for name, r := range c.refused {
			if r.overlap {
				dirty = append(dirty, name)
			}
		}
	}
	c.members = next
	c.mu.Unlock()
	for _, name := range dirty {
		c.queue.Add(name)
	}
	if first {
		close(c.loaded)
	}
}

// member returns a copy of the Trellis node name, nil if there is none.
func (c *Controller) member(name string) *Member {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := c.members[name]
	if m == nil {
		return nil
	}
	cp := *m
	return &cp
}

// work syncs the names in queue with sync, one at a time, until the
// queue shuts down; a failed sync is retried with backoff.
func (c *Controller) work(ctx context.Context, queue workqueue.TypedRateLimitingInterface[string], sync func(context.Context, string) error) {
	if !cache.WaitForCacheSync(ctx.Done(), c.nodes.HasSynced) {
		return
	}
	select {
	case <-ctx.Done():
		return
	case <-c.loaded:
	}
	for {
		name, quit := queue.Get()
		if quit {
			return
		}
		err := sync(ctx, name)
		switch {
		case err == nil:
			queue.Forget(name)
		case ctx.Err() != nil:
		default:
			var fe *ForbiddenError
			if errors.As(err, &fe) {
				c.logForbidden(fe)
			} else {
				c.log.Warn("syncing a Node failed; retrying", "node", name, "err", err, "retries", queue.NumRequeues(name))
			}
			queue.AddRateLimited(name)
		}
		queue.Done(name)
	}
}

// sync brings the Node of name into the mesh: pod CIDRs from the Node
// into the record (or refused, or allocated), addresses from the Node's
// k3s annotations. It queues the Node for writeNode, which shows the
// node's key, endpoints and network condition on it.
func (c *Controller) sync(ctx context.Context, name string) error {
	node, err := c.lister.Get(name)
	if apierrors.IsNotFound(err) {
		node = nil
	} else if err != nil {
		return err
	}
	m := c.member(name)
	switch {
	case m == nil:
		c.forget(name)
		if node != nil && c.wasDeleted(name) {
			c.writes.Add(name) // trellis node delete: the Node no longer speaks for Trellis
		}
		return nil // else not a Trellis node, or one this server has not seen yet
	case node == nil:
		c.forget(name)
		if m.NodeUID == "" || len(m.PodCIDRs) == 0 {
			return nil // no pod CIDRs from a Node (none yet, or from before Kubernetes mode): no change
		}
		// The informer may lag a Node another server already saw: ask.
		gctx, cancel := context.WithTimeout(ctx, c.cfg.RequestTimeout)
		live, err := c.client.core.Nodes().Get(gctx, name, metav1.GetOptions{})
		cancel()
		switch {
		case err == nil && string(live.UID) == m.NodeUID:
			return nil // the informer brings it
		case err != nil && !apierrors.IsNotFound(err):
			return explain(err, c.user, permission{verb: "get", resource: "nodes"})
		}
		c.log.Info("Node deleted: the node leaves the mesh (its Trellis record stays; 'trellis node delete' revokes it)", "node", name, "podCIDRs", joinPrefixes(m.PodCIDRs))
		return c.mesh.ClearPodCIDRs(ctx, name, m.NodeUID)
	}
	err = c.syncPodCIDRs(ctx, node, m)
	moved, aerr := c.syncAddresses(ctx, node, m)
	if !moved {
		// (With new addresses the endpoints change too: the Node is
		// written when the record is seen, in one patch.)
		c.writes.Add(name)
	}
	return errors.Join(err, aerr)
}

// writeNode shows on the Node of name what Trellis knows of the node:
// its key and endpoints (annotations) and whether it is in the mesh (the
// NetworkUnavailable condition); or, for a node deleted from Trellis,
// that the Node no longer speaks for it. It writes only what differs.
func (c *Controller) writeNode(ctx context.Context, name string) error {
	node, err := c.lister.Get(name)
	if apierrors.IsNotFound(err) {
		return nil
	} else if err != nil {
		return err
	}
	m := c.member(name)
	if m == nil {
		if !c.wasDeleted(name) {
			return nil
		}
		errs := []error{c.patchAnnotations(ctx, node, wantAnnotations(&Member{}))}
		if cond, ok := networkUnavailable(node); ok && cond.Reason == ConditionReasonUp {
			errs = append(errs, c.patchCondition(ctx, node, removedCondition()))
		}
		return errors.Join(errs...)
	}
	errs := []error{c.patchAnnotations(ctx, node, wantAnnotations(m))}
	if cond := c.wantCondition(node, m); cond != nil {
		errs = append(errs, c.patchCondition(ctx, node, *cond))
	}
	return errors.Join(errs...)
}

// wantCondition returns the NetworkUnavailable condition the Node should
// show, nil to leave it: refused while its pod CIDRs are refused, up once
// the node holds the Node's pod CIDRs and is in the mesh.
func (c *Controller) wantCondition(node *corev1.Node, m *Member) *condition {
	c.mu.Lock()
	r := c.refused[node.Name]
	c.mu.Unlock()
	if r != nil {
		rc := refusedCondition(r)
		return &rc
	}
	uid := string(node.UID)
	cidrs, ref := nodePodCIDRs(&node.Spec, c.cfg.ClusterCIDRs)
	if ref == nil && cidrs != nil && slices.Equal(m.PodCIDRs, cidrs) && m.NodeUID == uid && m.inMesh(uid) {
		up := upCondition()
		return &up
	}
	return nil
}

// wasDeleted reports whether the Trellis node name was deleted while
// this controller ran.
func (c *Controller) wasDeleted(name string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gone[name]
}

// forget drops what the controller remembers of a node.
func (c *Controller) forget(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.emptySince, name)
	delete(c.refused, name)
	delete(c.badAddrs, name)
}

// syncPodCIDRs brings the Node's pod CIDRs into the record, or refuses
// them (remembered in c.refused: wantCondition shows it), or (after the
// grace) writes Trellis's own into the Node.
func (c *Controller) syncPodCIDRs(ctx context.Context, node *corev1.Node, m *Member) error {
	uid := string(node.UID)
	if uid == m.GoneUID {
		return nil // a deletion another server saw first: this cache lags it
	}
	cidrs, ref := nodePodCIDRs(&node.Spec, c.cfg.ClusterCIDRs)
	if ref == nil && cidrs != nil {
		if slices.Equal(m.PodCIDRs, cidrs) && m.NodeUID == uid {
			c.accepted(node.Name)
			return nil
		}
		var oe *OverlapError
		switch err := c.mesh.AdoptPodCIDRs(ctx, node.Name, uid, cidrs); {
		case errors.As(err, &oe):
			ref = overlapRefusal(oe)
		case errors.Is(err, ErrNoMember):
			return nil
		case err != nil:
			return err
		default:
			c.accepted(node.Name)
			c.log.Info("node joins the mesh with the pod CIDRs of its Node", "node", node.Name, "podCIDRs", joinPrefixes(cidrs))
			return nil // the condition follows when the record is seen
		}
	}
	if ref != nil {
		if len(m.PodCIDRs) > 0 {
			if err := c.mesh.ClearPodCIDRs(ctx, node.Name, ""); err != nil {
				return err
			}
		}
		c.announceRefusal(ctx, node, ref)
		return nil
	}
	// The Node has no pod CIDR yet.
	if m.NodeUID != "" && m.NodeUID != uid {
		// Its Node was deleted and registered again: the pod CIDRs are
		// the old Node's.
		c.log.Info("Node registered again: the node waits for the new Node's pod CIDR", "node", node.Name)
		return c.mesh.ClearPodCIDRs(ctx, node.Name, m.NodeUID)
	}
	if wait := c.graceLeft(node.Name); wait > 0 {
		c.queue.AddAfter(node.Name, wait)
		return nil
	}
	return c.allocate(ctx, node)
}

// accepted forgets a refusal and the wait for a pod CIDR.
func (c *Controller) accepted(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.refused, name)
	delete(c.emptySince, name)
}

// graceLeft returns how long the Node of name may still wait for
// something else to allocate its pod CIDR.
func (c *Controller) graceLeft(name string) time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	t, ok := c.emptySince[name]
	if !ok {
		t = c.now()
		c.emptySince[name] = t
	}
	return c.cfg.AllocateGrace - c.now().Sub(t)
}

// allocate writes pod CIDRs of Trellis's own into a Node nothing
// allocated for, while it has none, and adopts them.
func (c *Controller) allocate(ctx context.Context, node *corev1.Node) error {
	inUse := map[netip.Prefix]bool{}
	all, err := c.lister.List(labels.Everything())
	if err != nil {
		return err
	}
	for _, n := range all {
		if n.Name == node.Name {
			continue
		}
		for _, s := range append([]string{n.Spec.PodCIDR}, n.Spec.PodCIDRs...) {
			if p, err := netip.ParsePrefix(s); err == nil {
				inUse[p.Masked()] = true
			}
		}
	}
	cidrs, err := c.mesh.AllocatePodCIDRs(ctx, node.Name, func(p netip.Prefix) bool { return inUse[p] })
	if errors.Is(err, ErrNoMember) {
		return nil
	} else if err != nil {
		return fmt.Errorf("allocate a pod CIDR for Node %s: %w", node.Name, err)
	}
	patch, err := podCIDRPatch(node.ResourceVersion, cidrs)
	if err != nil {
		return err
	}
	pctx, cancel := context.WithTimeout(ctx, c.cfg.RequestTimeout)
	defer cancel()
	updated, err := c.client.core.Nodes().Patch(pctx, node.Name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: FieldManager})
	switch {
	case apierrors.IsConflict(err), apierrors.IsInvalid(err), apierrors.IsNotFound(err):
		// The Node changed meanwhile (an allocator was quicker, or it
		// was deleted): the informer brings the new version.
		c.log.Debug("the Node changed before Trellis could write its pod CIDR; looking again", "node", node.Name, "err", err)
		return nil
	case err != nil:
		return explain(err, c.user, permPatchNode)
	}
	c.nodePatches.Add(1)
	c.log.Info("nothing allocated a pod CIDR for the Node: Trellis wrote its own into spec.podCIDRs", "node", node.Name,
		"podCIDRs", joinPrefixes(cidrs), "after", c.cfg.AllocateGrace)
	if got, ref := nodePodCIDRs(&updated.Spec, c.cfg.ClusterCIDRs); ref == nil && got != nil {
		// Adopt now rather than when the informer brings the update.
		if err := c.mesh.AdoptPodCIDRs(ctx, node.Name, string(updated.UID), got); err == nil {
			c.accepted(node.Name)
		}
	}
	return nil
}

// syncAddresses stores the addresses of the Node's k3s.io annotations,
// and reports whether they changed.
func (c *Controller) syncAddresses(ctx context.Context, node *corev1.Node, m *Member) (bool, error) {
	ext, err1 := ParseAddressList(node.Annotations[AnnotationK3sExternalIP])
	in, err2 := ParseAddressList(node.Annotations[AnnotationK3sInternalIP])
	if err := errors.Join(err1, err2); err != nil {
		c.mu.Lock()
		first := c.badAddrs[node.Name] != err.Error()
		c.badAddrs[node.Name] = err.Error()
		c.mu.Unlock()
		if first {
			c.log.Warn("ignoring addresses in the Node's k3s.io annotations", "node", node.Name, "err", err)
		}
	}
	if slices.Equal(ext, m.KubeExternalIPs) && slices.Equal(in, m.KubeInternalIPs) {
		return false, nil
	}
	err := c.mesh.SetKubeAddresses(ctx, node.Name, ext, in)
	if errors.Is(err, ErrNoMember) {
		return false, nil
	}
	return err == nil, err
}

// patchAnnotations gives the Node the annotations want, if it lacks them.
func (c *Controller) patchAnnotations(ctx context.Context, node *corev1.Node, want map[string]string) error {
	patch := annotationPatch(node, want)
	if patch == nil {
		return nil
	}
	pctx, cancel := context.WithTimeout(ctx, c.cfg.RequestTimeout)
	defer cancel()
	_, err := c.client.core.Nodes().Patch(pctx, node.Name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: FieldManager})
	if apierrors.IsNotFound(err) {
		return nil
	} else if err != nil {
		return explain(err, c.user, permPatchNode)
	}
	c.nodePatches.Add(1)
	return nil
}

// patchCondition sets the Node's NetworkUnavailable condition, if it
// differs.
func (c *Controller) patchCondition(ctx context.Context, node *corev1.Node, want condition) error {
	patch := conditionPatch(node, want, func() string { return c.now().UTC().Format(time.RFC3339) })
	if patch == nil {
		return nil
	}
	pctx, cancel := context.WithTimeout(ctx, c.cfg.RequestTimeout)
	defer cancel()
	_, err := c.client.core.Nodes().Patch(pctx, node.Name, types.StrategicMergePatchType, patch, metav1.PatchOptions{FieldManager: FieldManager}, "status")
	if apierrors.IsNotFound(err) {
		return nil
	} else if err != nil {
		return explain(err, c.user, permPatchStatus)
	}
	c.statusPatches.Add(1)
	if want.status == corev1.ConditionFalse {
		c.log.Info("node is in the mesh: NetworkUnavailable=False", "node", node.Name)
	}
	return nil
}

// announceRefusal logs a refusal and puts an Event on the Node, once per
// reason. Several servers name the Event alike, so they make one.
func (c *Controller) announceRefusal(ctx context.Context, node *corev1.Node, r *refusal) {
	c.mu.Lock()
	prev := c.refused[node.Name]
	c.refused[node.Name] = r
	c.mu.Unlock()
	if prev != nil && prev.message == r.message {
		return
	}
	c.log.Warn("Node's pod CIDR refused: the node stays out of the mesh", "node", node.Name, "reason", r.message)
	sum := sha256.Sum256([]byte(string(node.UID) + "\x00" + r.message))
	now := metav1.NewTime(c.now())
	ev := &corev1.Event{
		ObjectMeta:          metav1.ObjectMeta{Name: fmt.Sprintf("%s.trellis-%x", node.Name, sum[:6]), Namespace: eventNamespace},
		InvolvedObject:      corev1.ObjectReference{Kind: "Node", APIVersion: "v1", Name: node.Name, UID: node.UID},
		Reason:              EventReasonRefused,
		Message:             r.message,
		Type:                corev1.EventTypeWarning,
		Source:              corev1.EventSource{Component: "trellis", Host: c.cfg.Instance},
		FirstTimestamp:      now,
		LastTimestamp:       now,
		Count:               1,
		ReportingController: "trellis-mesh.io/trellis",
		ReportingInstance:   c.cfg.Instance,
	}
	pctx, cancel := context.WithTimeout(ctx, c.cfg.RequestTimeout)
	defer cancel()
	events := c.client.core.Events(eventNamespace)
	_, err := events.Create(pctx, ev, metav1.CreateOptions{FieldManager: FieldManager})
	perm := permEvents
	if apierrors.IsAlreadyExists(err) {
		// Another server (or this one before a restart) made it.
		patch, _ := json.Marshal(map[string]any{"lastTimestamp": now})
		_, err = events.Patch(pctx, ev.Name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: FieldManager})
		perm = permPatchEvents
	}
	if err = explain(err, c.user, perm); err != nil {
		c.log.Warn("could not put the Event on the Node", "node", node.Name, "err", err)
		return
	}
	c.events.Add(1)
}

// watchError reports a list or watch of Nodes that failed; a denial in
// words that say what to grant.
func (c *Controller) watchError(ctx context.Context, r *cache.Reflector, err error) {
	if apierrors.IsForbidden(err) {
		c.logForbidden(&ForbiddenError{User: c.user, Permission: "list and watch nodes", Err: err})
		return
	}
	cache.DefaultWatchErrorHandler(ctx, r, err)
}

func (c *Controller) logForbidden(fe *ForbiddenError) {
	c.mu.Lock()
	due := c.now().Sub(c.forbidden) >= forbiddenEvery
	if due {
		c.forbidden = c.now()
	}
	c.mu.Unlock()
	if due {
		c.log.Error(fe.Error())
	}
}
