package agent

import (
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// agentMetrics are the agent's Prometheus metrics (Config.Metrics). A
// scrape reads what the loop last published (its snapshot, at most a
// status tick old) and never the device itself, so it is safe at any
// time, also while the node joins. A nil *agentMetrics records nothing.
type agentMetrics struct {
	a    *Agent
	join prometheus.Histogram
}

var (
	descPeers         = prometheus.NewDesc("trellis_agent_peers", "WireGuard peers of this node.", nil, nil)
	descHandshakeAge  = prometheus.NewDesc("trellis_agent_peer_handshake_age_seconds", "Time since the last WireGuard handshake with the peer (absent before the first).", []string{"peer"}, nil)
	descPeerRx        = prometheus.NewDesc("trellis_agent_peer_receive_bytes_total", "Bytes received from the peer over WireGuard.", []string{"peer"}, nil)
	descPeerTx        = prometheus.NewDesc("trellis_agent_peer_transmit_bytes_total", "Bytes sent to the peer over WireGuard.", []string{"peer"}, nil)
	descRelayed       = prometheus.NewDesc("trellis_agent_relayed_peers", "Peers the last netmap reaches through a relay.", nil, nil)
	descTunnelUp      = prometheus.NewDesc("trellis_agent_tunnel_up", "1 while the supervisor tunnel to the server is up.", nil, nil)
	descTunnelReconn  = prometheus.NewDesc("trellis_agent_tunnel_reconnects_total", "Times the supervisor tunnel came up again after it was down.", nil, nil)
	descNetmapVersion = prometheus.NewDesc("trellis_agent_netmap_version", "Version of the last netmap applied.", nil, nil)
	descNetmapAge     = prometheus.NewDesc("trellis_agent_netmap_age_seconds", "Time since the last netmap arrived.", nil, nil)
)

// newAgentMetrics returns the agent's metrics for registry r (nil r gives
// nil); register registers them once the agent is built.
func newAgentMetrics(r prometheus.Registerer) *agentMetrics {
	if r == nil {
		return nil
	}
	return &agentMetrics{join: prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "trellis_agent_join_duration_seconds",
		Help:    "Time a successful join request took (CSR, registration, pod CIDR).",
		Buckets: prometheus.ExponentialBuckets(0.005, 2, 12),
	})}
}

// register registers the metrics of a (whose loop exists) with r.
func (m *agentMetrics) register(a *Agent, r prometheus.Registerer) error {
	if m == nil {
		return nil
	}
	m.a = a
	for _, c := range []prometheus.Collector{m.join, m} {
		if err := r.Register(c); err != nil {
			return fmt.Errorf("agent metrics: %w", err)
		}
	}
	return nil
}

func (m *agentMetrics) joined(d time.Duration) {
	if m != nil {
		m.join.Observe(d.Seconds())
	}
}

// Describe implements prometheus.Collector.
func (m *agentMetrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPeers, descHandshakeAge, descPeerRx, descPeerTx, descRelayed, descTunnelUp, descTunnelReconn, descNetmapVersion, descNetmapAge} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (m *agentMetrics) Collect(ch chan<- prometheus.Metric) {
	now := time.Now()
	a := m.a
	st := a.status(now)
	ch <- prometheus.MustNewConstMetric(descPeers, prometheus.GaugeValue, float64(len(st.Peers)))
	for _, p := range st.Peers {
		name := p.Name
		if name == "" {
			name = p.PublicKey.String()
		}
		if !p.LastHandshake.IsZero() {
			ch <- prometheus.MustNewConstMetric(descHandshakeAge, prometheus.GaugeValue, now.Sub(p.LastHandshake).Seconds(), name)
		}
		ch <- prometheus.MustNewConstMetric(descPeerRx, prometheus.CounterValue, float64(p.RxBytes), name)
		ch <- prometheus.MustNewConstMetric(descPeerTx, prometheus.CounterValue, float64(p.TxBytes), name)
	}
	up, reconnects := 0.0, 0.0
	if tc := a.tunnelState.Load(); tc != nil {
		if c, _ := tc.State(); c {
			up = 1
		}
		reconnects = float64(max(tc.Connects()-1, 0))
	}
	ch <- prometheus.MustNewConstMetric(descTunnelUp, prometheus.GaugeValue, up)
	ch <- prometheus.MustNewConstMetric(descTunnelReconn, prometheus.CounterValue, reconnects)
	snap := a.loop.snapshot()
	version, at, relayed := snap.netmapVersion, snap.netmapAt, snap.relayed
	ch <- prometheus.MustNewConstMetric(descRelayed, prometheus.GaugeValue, float64(relayed))
	ch <- prometheus.MustNewConstMetric(descNetmapVersion, prometheus.GaugeValue, float64(version))
	if !at.IsZero() {
		ch <- prometheus.MustNewConstMetric(descNetmapAge, prometheus.GaugeValue, now.Sub(at).Seconds())
	}
}
