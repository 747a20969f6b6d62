package server

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/store"
)

// serverMetrics are the server's Prometheus metrics, in a registry of
// their own (Server.Metrics): cluster figures are read from the hub at
// scrape time; latencies are recorded as requests happen.
type serverMetrics struct {
	s     *Server
	reg   *prometheus.Registry
	join  *prometheus.HistogramVec
	store *prometheus.HistogramVec
	// streams counts netmap streams by their first line: the whole
	// netmap, or an empty delta to an agent that had it (resumed).
	streams *prometheus.CounterVec
	// connects counts egress CONNECTs (egress.go) by HTTP status.
	connects *prometheus.CounterVec
}

var (
	descNodes         = prometheus.NewDesc("trellis_server_nodes", "Nodes in the cluster, by readiness (a netmap stream is open).", []string{"ready"}, nil)
	descPaths         = prometheus.NewDesc("trellis_server_paths", "Ordered node pairs by how they reach each other (direct, relayed, none).", []string{"kind"}, nil)
	descTunnels       = prometheus.NewDesc("trellis_server_tunnels_connected", "Nodes whose supervisor tunnel to this server is up.", nil, nil)
	descSrvNetmapVer  = prometheus.NewDesc("trellis_server_netmap_version", "Version (store revision) of the cluster state the server serves.", nil, nil)
	descSrvNetmapLag  = prometheus.NewDesc("trellis_server_netmap_version_lag", "Versions the node's netmap stream is behind the cluster state (non-zero while a stream is stuck sending).", []string{"node"}, nil)
	descSrvPeerHSOK   = prometheus.NewDesc("trellis_server_handshakes", "Handshake states nodes report about their peers (ok, failing, pending).", []string{"state"}, nil)
	descKubeWrites    = prometheus.NewDesc("trellis_server_kube_writes_total", "Writes to Kubernetes (Kubernetes mode), by kind: node (annotations, a pod CIDR), status (the NetworkUnavailable condition), event.", []string{"kind"}, nil)
	descKubeReachable = prometheus.NewDesc("trellis_server_kube_api_reachable", "1 if the last call to the Kubernetes API server reached it (Kubernetes mode).", nil, nil)
	descKubeRefused   = prometheus.NewDesc("trellis_server_kube_refused_nodes", "Nodes whose pod CIDRs Trellis refuses (Kubernetes mode): they are out of the mesh.", nil, nil)
	storeLatencyOpsKV = []string{"get", "list", "create", "update", "delete"}
)

func newServerMetrics(s *Server) *serverMetrics {
	m := &serverMetrics{
		s:   s,
		reg: prometheus.NewRegistry(),
		join: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "trellis_server_join_duration_seconds",
			Help:    "Time the server took to answer join requests, by HTTP status.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}, []string{"code"}),
		store: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "trellis_server_store_duration_seconds",
			Help:    "Latency of datastore operations, by operation and outcome.",
			Buckets: prometheus.ExponentialBuckets(0.0002, 2, 16),
		}, []string{"op", "result"}),
		streams: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trellis_server_netmap_streams_total",
			Help: "Netmap streams started, by their first line: whole (the whole netmap) or resumed (the agent had it already).",
		}, []string{"first"}),
		connects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trellis_server_egress_connects_total",
			Help: "HTTP CONNECTs of the egress (kube-apiserver to kubelets and pods through the tunnels), by answer: 200, or why not (403 not a node or pod, 502 no tunnel or nothing listening, ...).",
		}, []string{"code"}),
	}
	m.reg.MustRegister(m.join, m.store, m.streams, m.connects, m)
	m.connects.WithLabelValues("200")
	m.streams.WithLabelValues("whole")
	m.streams.WithLabelValues("resumed")
	for _, op := range storeLatencyOpsKV {
		m.store.WithLabelValues(op, "ok") // present from the start
	}
	return m
}

// egress counts an egress CONNECT answered with status.
func (m *serverMetrics) egress(status int) {
	m.connects.WithLabelValues(strconv.Itoa(status)).Inc()
}

// Metrics returns the server's Prometheus metrics (trellis_server_*), for
// a /metrics endpoint (--metrics-address).
func (s *Server) Metrics() prometheus.Gatherer { return s.metrics.reg }

// Describe implements prometheus.Collector.
func (m *serverMetrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descNodes, descPaths, descTunnels, descSrvNetmapVer, descSrvNetmapLag, descSrvPeerHSOK, descKubeWrites, descKubeReachable, descKubeRefused} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (m *serverMetrics) Collect(ch chan<- prometheus.Metric) {
	s := m.s
	nodes := s.hub.nodesWithStatus()
	ready, hs := 0, map[string]int{api.HandshakeOK: 0, api.HandshakeFailing: 0, "pending": 0}
	tunnels := 0
	for _, n := range nodes {
		if n.Ready {
			ready++
		}
		for _, o := range n.Observations {
			st := o.Handshake
			if st == "" {
				st = "pending"
			}
			hs[st]++
		}
		if s.tunnels != nil && s.tunnels.State(n.Name).Connected {
			tunnels++
		}
	}
	ch <- prometheus.MustNewConstMetric(descNodes, prometheus.GaugeValue, float64(ready), "true")
	ch <- prometheus.MustNewConstMetric(descNodes, prometheus.GaugeValue, float64(len(nodes)-ready), "false")
	for st, n := range hs {
		ch <- prometheus.MustNewConstMetric(descSrvPeerHSOK, prometheus.GaugeValue, float64(n), st)
	}
	kinds := map[string]int{api.PathDirect: 0, api.PathRelayed: 0, api.PathNone: 0}
	for _, p := range s.hub.paths() {
		kinds[p.Kind]++
	}
	for k, n := range kinds {
		ch <- prometheus.MustNewConstMetric(descPaths, prometheus.GaugeValue, float64(n), k)
	}
	ch <- prometheus.MustNewConstMetric(descTunnels, prometheus.GaugeValue, float64(tunnels))
	version, lags := s.hub.streamLags()
	ch <- prometheus.MustNewConstMetric(descSrvNetmapVer, prometheus.GaugeValue, float64(version))
	for node, lag := range lags {
		ch <- prometheus.MustNewConstMetric(descSrvNetmapLag, prometheus.GaugeValue, float64(lag), node)
	}
	if k := s.kube.Load(); k != nil {
		st := k.Stats()
		ch <- prometheus.MustNewConstMetric(descKubeWrites, prometheus.CounterValue, float64(st.NodePatches), "node")
		ch <- prometheus.MustNewConstMetric(descKubeWrites, prometheus.CounterValue, float64(st.StatusPatches), "status")
		ch <- prometheus.MustNewConstMetric(descKubeWrites, prometheus.CounterValue, float64(st.Events), "event")
		reachable := 0.0
		if st.Reachable {
			reachable = 1
		}
		ch <- prometheus.MustNewConstMetric(descKubeReachable, prometheus.GaugeValue, reachable)
		ch <- prometheus.MustNewConstMetric(descKubeRefused, prometheus.GaugeValue, float64(st.Refused))
	}
}

// instrument times join requests.
func (m *serverMetrics) instrument(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != api.PathJoin {
			h.ServeHTTP(w, r)
			return
		}
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		h.ServeHTTP(sw, r)
		m.join.WithLabelValues(strconv.Itoa(sw.code)).Observe(time.Since(start).Seconds())
	})
}

// statusWriter remembers the status code of a response.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	w.code = code
	w.ResponseWriter.WriteHeader(code)
}

// Unwrap lets http.ResponseController reach the real writer.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// timedKV records the latency of every store operation.
type timedKV struct {
	kv kv
	h  *prometheus.HistogramVec
}

// timed wraps k to record the latency of its operations.
func (m *serverMetrics) timed(k kv) kv {
	return &timedKV{kv: k, h: m.store}
}

func (t *timedKV) observe(op string, start time.Time, err error) {
	res := "ok"
	switch {
	case err == nil:
	case errors.Is(err, store.ErrNotFound), errors.Is(err, store.ErrExists), errors.Is(err, store.ErrConflict):
		res = "miss"
	default:
		res = "error"
	}
	t.h.WithLabelValues(op, res).Observe(time.Since(start).Seconds())
}

func (t *timedKV) Get(ctx context.Context, key string) ([]byte, int64, error) {
	start := time.Now()
	v, rev, err := t.kv.Get(ctx, key)
	t.observe("get", start, err)
	return v, rev, err
}

func (t *timedKV) List(ctx context.Context, prefix string) ([]store.KV, int64, error) {
	start := time.Now()
	v, rev, err := t.kv.List(ctx, prefix)
	t.observe("list", start, err)
	return v, rev, err
}

func (t *timedKV) Create(ctx context.Context, key string, value []byte) (int64, error) {
	start := time.Now()
	rev, err := t.kv.Create(ctx, key, value)
	t.observe("create", start, err)
	return rev, err
}

func (t *timedKV) Update(ctx context.Context, key string, value []byte, prevRev int64) (int64, error) {
	start := time.Now()
	rev, err := t.kv.Update(ctx, key, value, prevRev)
	t.observe("update", start, err)
	return rev, err
}

func (t *timedKV) Delete(ctx context.Context, key string, prevRev int64) error {
	start := time.Now()
	err := t.kv.Delete(ctx, key, prevRev)
	t.observe("delete", start, err)
	return err
}
