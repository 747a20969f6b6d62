package api

import (
	"net/netip"
	"time"
)

// DefaultStatusPort is the loopback TCP port of an agent's status endpoint
// unless configured (--status-port).
const DefaultStatusPort = 10251

// DefaultKubeletPort is the kubelet's port unless the agent's
// --kubelet-port (or, to a server in Kubernetes mode, the Node) says
// otherwise: the egress reaches it through the node's tunnel.
const DefaultKubeletPort = 10250

// PathStatus is the path of the agent's status endpoint (GET, on
// 127.0.0.1:status port; reachable from the server through the tunnel).
const PathStatus = "/status"

// TunnelStatus is the state of a node's supervisor tunnel.
type TunnelStatus struct {
	Connected bool `json:"connected"`
	// Since is when the tunnel came up, or when it went down; zero if
	// unknown (not seen since the server started).
	Since time.Time `json:"since,omitzero"`
}

// NodeStatus is what an agent reports about itself.
type NodeStatus struct {
	Name      string `json:"name"`
	ServerURL string `json:"serverURL"`
	// Tunnel is the agent's view of its tunnel to ServerURL.
	Tunnel TunnelStatus `json:"tunnel"`
	// DataPlane is "kernel" or "userspace" (WireGuard), or "none".
	DataPlane  string       `json:"dataPlane"`
	Interface  string       `json:"interface,omitempty"`
	MTU        int          `json:"mtu,omitempty"`
	ListenPort int          `json:"listenPort,omitempty"`
	Peers      []PeerStatus `json:"peers"`
	// Time is when the agent produced this status (its clock).
	Time time.Time `json:"time"`
	// StatusPort is the agent's status endpoint port, where PathProbe is
	// served; 0 from agents that predate it (DefaultStatusPort).
	StatusPort int `json:"statusPort,omitempty"`
}

// PeerStatus is one WireGuard peer as the node's device reports it.
type PeerStatus struct {
	// Name is the peer's node name from the last netmap; empty if the key
	// is not in it.
	Name      string         `json:"name,omitempty"`
	PublicKey Key            `json:"publicKey"`
	Endpoint  netip.AddrPort `json:"endpoint,omitzero"`
	// LastHandshake is zero before the first handshake.
	LastHandshake time.Time `json:"lastHandshake,omitzero"`
	RxBytes       int64     `json:"rxBytes"`
	TxBytes       int64     `json:"txBytes"`
}

// Error codes of the tunnel endpoints.
const (
	// ErrCodeTunnelDown: the node has no tunnel to this server.
	ErrCodeTunnelDown = "tunnel-down"
	// ErrCodeTunnelRefused: the node refused the port, or nothing listens
	// on it.
	ErrCodeTunnelRefused = "tunnel-refused"
)
