// Package api defines the wire types shared by the Trellis server, agent and
// CLI. It depends on the standard library only.
package api

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"
)

// HTTP paths served by a Trellis server.
const (
	// PathCACerts serves the cluster CA certificate (PEM), unauthenticated.
	PathCACerts = "/cacerts"
	// PathPing answers "pong", unauthenticated.
	PathPing = "/ping"
	// PathJoin takes a JoinRequest authenticated by a join token.
	PathJoin = "/v1/join"
	// PathNetmap streams NetMapLine messages (one JSON object per line) to
	// a node authenticated by its node certificate.
	PathNetmap = "/v1/netmap"
	// PathNodes lists nodes (GET, admin). PathNodes+"/NAME" deletes one
	// (DELETE, admin).
	PathNodes = "/v1/nodes"
	// PathConnect takes the websocket tunnel of a node authenticated by its
	// node certificate (GET with a websocket upgrade). Through it the
	// server reaches PathNodes+"/NAME/status" (GET, admin: the node's
	// NodeStatus) and PathNodes+"/NAME/proxy/PORT" (GET, admin, upgraded to
	// a websocket of binary messages that carries one TCP connection to
	// 127.0.0.1:PORT on the node).
	PathConnect = "/v1/connect"
	// PathReport takes a Report from a node about itself (PUT, node).
	PathReport = "/v1/report"
	// PathPaths lists how every pair of nodes reaches each other (GET,
	// admin).
	PathPaths = "/v1/paths"
	// PathTokens creates (POST) and lists (GET) join tokens; PathTokens+
	// "/ID" revokes one (DELETE); PathTokensRotateServer replaces the
	// server token (POST). Admin only.
	PathTokens = "/v1/tokens"
	// PathTokensRotateServer replaces the server token (POST, admin).
	PathTokensRotateServer = PathTokens + "/rotate-server"
)

// Node roles.
const (
	RoleServer = "server"
	RoleAgent  = "agent"
)

// DefaultWireGuardPort is the UDP port WireGuard listens on unless configured.
const DefaultWireGuardPort = 51820

// Key is a WireGuard (Curve25519) public key. It is written as base64 text,
// the form `wg` uses.
type Key [32]byte

// ParseKey parses a base64 WireGuard key.
func ParseKey(s string) (Key, error) {
	var k Key
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return k, fmt.Errorf("parse key: %w", err)
	}
	if len(b) != len(k) {
		return k, fmt.Errorf("parse key: got %d bytes, want %d", len(b), len(k))
	}
	copy(k[:], b)
	return k, nil
}

// String returns the base64 form of k.
func (k Key) String() string { return base64.StdEncoding.EncodeToString(k[:]) }

// IsZero reports whether k is the all-zero key (no key).
func (k Key) IsZero() bool { return k == Key{} }

// MarshalText implements encoding.TextMarshaler.
func (k Key) MarshalText() ([]byte, error) { return []byte(k.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (k *Key) UnmarshalText(b []byte) error {
	p, err := ParseKey(string(b))
	if err != nil {
		return err
	}
	*k = p
	return nil
}

// JoinRequest is sent by an agent to PathJoin. The join token travels in the
// Authorization header ("Bearer <token>"), never in the body.
type JoinRequest struct {
	// NodeName is the name the node wants; unique in the cluster.
	NodeName string `json:"nodeName"`
	// NodePassword is a random secret kept by the node. The first join stores
	// its hash; later joins with the same name must present the same secret.
	NodePassword string `json:"nodePassword"`
	// PublicKey is the node's WireGuard public key.
	PublicKey Key `json:"publicKey"`
	// CSR is a PEM certificate request for the node's client certificate.
	CSR []byte `json:"csr"`
	// InternalIPs are the node's private addresses.
	InternalIPs []netip.Addr `json:"internalIPs,omitempty"`
	// Networks are the subnets the internal addresses belong to (masked).
	Networks []netip.Prefix `json:"networks,omitempty"`
	// ExternalIPs are the addresses other networks reach the node at.
	ExternalIPs []netip.Addr `json:"externalIPs,omitempty"`
	// ListenPort is the node's WireGuard UDP port; 0 means no data plane.
	ListenPort uint16 `json:"listenPort,omitempty"`
	// Relay asks to relay traffic for nodes that cannot reach each other
	// (--relay). Servers relay anyway.
	Relay bool `json:"relay,omitempty"`
	// Members asks for JoinResponse.Members: a node on a VPN carrier
	// (--vpn-auth) needs them. Others do not: the list is O(nodes) per
	// join.
	Members bool `json:"members,omitempty"`
}

// JoinResponse answers a successful join.
type JoinResponse struct {
	// Node is the node's record as stored.
	Node Node `json:"node"`
	// Certificate is the node's client certificate (PEM), signed by the CA.
	Certificate []byte `json:"certificate"`
	// ClusterCIDRs are the cluster's pod address ranges.
	ClusterCIDRs []netip.Prefix `json:"clusterCIDRs"`
	// Members are the cluster's nodes at the time of the join (see
	// Member), when JoinRequest.Members asked for them.
	Members []Member `json:"members,omitempty"`
	// Servers are every server of the cluster: an agent fails over to
	// another when the one it uses is lost.
	Servers []Server `json:"servers,omitempty"`
	// ServerName is the name of the server that answered.
	ServerName string `json:"serverName,omitempty"`
}

// Node is a node as the server knows it.
type Node struct {
	Name        string         `json:"name"`
	Roles       []string       `json:"roles"`
	PublicKey   Key            `json:"publicKey"`
	InternalIPs []netip.Addr   `json:"internalIPs"`
	Networks    []netip.Prefix `json:"networks,omitempty"`
	ExternalIPs []netip.Addr   `json:"externalIPs"`
	// ObservedIP is the source address the server saw the node's last join
	// from.
	ObservedIP netip.Addr     `json:"observedIP,omitzero"`
	ListenPort uint16         `json:"listenPort,omitempty"`
	PodCIDRs   []netip.Prefix `json:"podCIDRs"`
	// Relay marks a node that relays traffic between nodes that cannot
	// reach each other (servers relay by default).
	Relay bool `json:"relay,omitempty"`
	// Observations are what the node last reported about its peers.
	Observations []Observation `json:"observations,omitempty"`
	CreatedAt    time.Time     `json:"createdAt"`
	UpdatedAt    time.Time     `json:"updatedAt"`
	// Ready is computed by the server: the node holds a netmap stream open.
	Ready bool `json:"ready"`
	// Tunnel is computed by the server in node listings: the state of the
	// node's supervisor tunnel. Nil elsewhere.
	Tunnel *TunnelStatus `json:"tunnel,omitempty"`
	// VPN is what a node on a VPN carrier (--vpn-auth) last reported
	// about it; nil for WireGuard nodes.
	VPN *VPNStatus `json:"vpn,omitempty"`
}

// HasRole reports whether n has role r.
func (n *Node) HasRole(r string) bool {
	for _, x := range n.Roles {
		if x == r {
			return true
		}
	}
	return false
}

// NetMap is what a node needs to configure its data plane. A stream starts
// with a complete NetMap; then it sends a complete one on every change,
// or, to agents that ask for them (NetmapDeltasParam), a NetMapDelta.
type NetMap struct {
	// Version increases with every change of the cluster state.
	Version int64 `json:"version"`
	// Self is the receiving node's own record.
	Self Node `json:"self"`
	// ClusterCIDRs are the cluster's pod address ranges.
	ClusterCIDRs []netip.Prefix `json:"clusterCIDRs"`
	// Peers are the WireGuard peers the node must have, sorted by name.
	Peers []Peer `json:"peers"`
	// Servers are every server of the cluster (see
	// JoinResponse.Servers).
	Servers []Server `json:"servers,omitempty"`
	// ServerName is the name of the server that sent the netmap.
	ServerName string `json:"serverName,omitempty"`
}

// NetmapDeltasParam, set to "1" in the query of a PathNetmap request, asks
// for deltas: after the first line, the stream sends what changed
// (NetMapLine.Delta) instead of whole netmaps. In a cluster of N nodes a
// change then costs O(N) bytes across all streams instead of O(N²).
const NetmapDeltasParam = "deltas"

// NetmapHaveParam, in the query of a PathNetmap request that asks for
// deltas, tells the server the netmap the agent already has (FormatHave:
// its version and Digest). When the netmap the server would send first is
// the same, the stream starts with a delta from that version instead of
// the whole netmap: an agent that reconnects (a server restart, another
// server, a network blip) with nothing changed gets a line of a few
// hundred bytes instead of O(nodes) of them.
const NetmapHaveParam = "have"

// Digest identifies a netmap's content apart from its version and its
// server list (which every delta carries): SHA-256 of its JSON encoding
// from the comma after the "version" member to the end of "peers" (the
// server hashes the same bytes of the line it encodes).
func (nm NetMap) Digest() ([sha256.Size]byte, error) {
	nm.Servers, nm.ServerName = nil, ""
	if nm.Peers == nil {
		nm.Peers = []Peer{} // the server always writes a list
	}
	b, err := json.Marshal(nm)
	if err != nil {
		return [sha256.Size]byte{}, err
	}
	i := bytes.IndexByte(b, ',')
	if i < 0 || !bytes.HasSuffix(b, []byte("]}")) {
		return [sha256.Size]byte{}, errors.New("netmap digest: unexpected encoding")
	}
	return sha256.Sum256(b[i : len(b)-1]), nil
}

// FormatHave is the NetmapHaveParam value for a netmap of version with
// digest: "<version>.<hex digest>".
func FormatHave(version int64, digest [sha256.Size]byte) string {
	return strconv.FormatInt(version, 10) + "." + hex.EncodeToString(digest[:])
}

// ParseHave parses a NetmapHaveParam value.
func ParseHave(s string) (version int64, digest [sha256.Size]byte, err error) {
	v, d, ok := strings.Cut(s, ".")
	if !ok {
		return 0, digest, fmt.Errorf("%s=%.80q: want <version>.<hex SHA-256>", NetmapHaveParam, s)
	}
	version, err = strconv.ParseInt(v, 10, 64)
	if err != nil || version < 0 {
		return 0, digest, fmt.Errorf("%s=%.80q: the version must be a non-negative integer", NetmapHaveParam, s)
	}
	if len(d) != hex.EncodedLen(sha256.Size) {
		return 0, digest, fmt.Errorf("%s=%.80q: the digest must be %d hex digits", NetmapHaveParam, s, hex.EncodedLen(sha256.Size))
	}
	if _, err := hex.Decode(digest[:], []byte(d)); err != nil {
		return 0, digest, fmt.Errorf("%s=%.80q: the digest is not hex", NetmapHaveParam, s)
	}
	return version, digest, nil
}

// NetMapLine is one line of a netmap stream: a whole netmap, or, with
// Delta set, a change to the last one.
type NetMapLine struct {
	NetMap
	Delta *NetMapDelta `json:"delta,omitempty"`
}

// MarshalJSON writes a delta line as {"delta":...} alone.
func (l NetMapLine) MarshalJSON() ([]byte, error) {
	if l.Delta != nil {
		return json.Marshal(struct {
			Delta *NetMapDelta `json:"delta"`
		}{l.Delta})
	}
	return json.Marshal(l.NetMap)
}

// NetMapDelta turns the netmap a stream sent last (of version Base) into
// the netmap of Version.
type NetMapDelta struct {
	Version int64 `json:"version"`
	// Base is the version of the netmap the delta applies to.
	Base int64 `json:"base"`
	// Self is the node's own record, when it changed.
	Self *Node `json:"self,omitempty"`
	// PeersChanged are new or changed peers, sorted by name.
	PeersChanged []Peer `json:"peersChanged,omitempty"`
	// PeersRemoved are names of peers that are gone.
	PeersRemoved []string `json:"peersRemoved,omitempty"`
	// Servers and ServerName are as in NetMap: always present.
	Servers    []Server `json:"servers,omitempty"`
	ServerName string   `json:"serverName,omitempty"`
}

// Apply returns nm changed by d. It fails when d is not based on nm: the
// stream lost a line, and the agent must reconnect for a whole netmap.
// nm is not modified.
func (nm NetMap) Apply(d NetMapDelta) (NetMap, error) {
	if d.Base != nm.Version || d.Version < d.Base {
		return NetMap{}, fmt.Errorf("netmap delta from version %d to %d does not apply to version %d", d.Base, d.Version, nm.Version)
	}
	out := nm
	out.Version = d.Version
	if d.Self != nil {
		out.Self = *d.Self
	}
	out.Servers, out.ServerName = d.Servers, d.ServerName
	if len(d.PeersChanged) == 0 && len(d.PeersRemoved) == 0 {
		return out, nil
	}
	gone := make(map[string]bool, len(d.PeersRemoved)+len(d.PeersChanged))
	for _, name := range d.PeersRemoved {
		gone[name] = true
	}
	changed := slices.Clone(d.PeersChanged)
	slices.SortStableFunc(changed, func(a, b Peer) int { return strings.Compare(a.Name, b.Name) })
	changed = slices.CompactFunc(changed, func(a, b Peer) bool { return a.Name == b.Name })
	for _, p := range changed {
		gone[p.Name] = true
	}
	// Merge the kept peers (sorted) with the changed ones (sorted).
	peers := make([]Peer, 0, len(nm.Peers)+len(changed))
	i := 0
	for _, p := range nm.Peers {
		if gone[p.Name] {
			continue
		}
		for i < len(changed) && changed[i].Name < p.Name {
			peers = append(peers, changed[i])
			i++
		}
		peers = append(peers, p)
	}
	peers = append(peers, changed[i:]...)
	out.Peers = peers
	return out, nil
}

// Peer is one WireGuard peer of a node.
type Peer struct {
	Name      string `json:"name"`
	PublicKey Key    `json:"publicKey"`
	// Endpoint is where to send packets; the zero value means none is known
	// and the peer must reach us first.
	Endpoint netip.AddrPort `json:"endpoint,omitzero"`
	// AllowedIPs are the addresses routed to this peer.
	AllowedIPs []netip.Prefix `json:"allowedIPs"`
	// PersistentKeepalive in seconds; 0 disables it.
	PersistentKeepalive int `json:"persistentKeepalive,omitempty"`
	// Via names the relay that carries traffic to this peer. The peer is
	// then kept with no allowed IPs, as a probe of the direct path, and
	// its pod CIDRs are among the relay's allowed IPs.
	Via string `json:"via,omitempty"`
	// Reason says why the path is relayed.
	Reason string `json:"reason,omitempty"`
}

// Handshake states a node reports about a peer.
const (
	// HandshakeOK: a handshake completed recently; the direct path works.
	HandshakeOK = "ok"
	// HandshakeFailing: the peer has been configured for a while and no
	// handshake completed.
	HandshakeFailing = "failing"
)

// Observation is what a node sees of one peer on its WireGuard device.
type Observation struct {
	// Peer is the peer's node name.
	Peer string `json:"peer"`
	// Endpoint is where the peer's packets come from (after any NAT).
	Endpoint netip.AddrPort `json:"endpoint,omitzero"`
	// Handshake is HandshakeOK, HandshakeFailing or empty (too early to
	// tell).
	Handshake string `json:"handshake,omitempty"`
}

// Report is what an agent tells the server about itself when it changes:
// its addresses and what it sees of its peers.
type Report struct {
	InternalIPs  []netip.Addr   `json:"internalIPs,omitempty"`
	Networks     []netip.Prefix `json:"networks,omitempty"`
	ExternalIPs  []netip.Addr   `json:"externalIPs,omitempty"`
	Observations []Observation  `json:"observations,omitempty"`
	VPN          *VPNStatus     `json:"vpn,omitempty"`
}

// Path is how one node reaches another.
type Path struct {
	From string `json:"from"`
	To   string `json:"to"`
	// Kind is PathDirect, PathRelayed or PathNone.
	Kind string `json:"kind"`
	// Via is the relay of a relayed path.
	Via string `json:"via,omitempty"`
	// Endpoint is where From sends packets for To (direct paths).
	Endpoint netip.AddrPort `json:"endpoint,omitzero"`
	// Reason explains a relayed or missing path.
	Reason string `json:"reason,omitempty"`
}

// Path kinds.
const (
	PathDirect  = "direct"
	PathRelayed = "relayed"
	PathNone    = "none"
)

// Error is the JSON body of every error response.
type Error struct {
	// Code is stable and meant for programs, e.g. ErrCodeNameTaken.
	Code string `json:"code,omitempty"`
	// Message is a sentence for a person: what is wrong and what to do.
	Message string `json:"message"`
}

// Error codes.
const (
	ErrCodeBadRequest   = "bad-request"
	ErrCodeUnauthorized = "unauthorized"
	ErrCodeForbidden    = "forbidden"
	ErrCodeNameTaken    = "name-taken"
	ErrCodeNodeDeleted  = "node-deleted"
	ErrCodeNotFound     = "not-found"
	ErrCodeExhausted    = "cluster-cidr-exhausted"
	ErrCodeInternal     = "internal"
)

// Error implements error.
func (e *Error) Error() string { return e.Message }
