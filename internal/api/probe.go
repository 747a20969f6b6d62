package api

import (
	"net/netip"
	"time"
)

// PathProbe is the agent's probe endpoint on its status port (GET, on
// 127.0.0.1; reachable from operators through the tunnel):
//
//	/probe?target=ADDR[&target=ADDR...][&count=N][&size=BYTES]
//
// For each target the node sends count ICMP echo requests of the usual
// small size and then one of size bytes (the whole IP packet; default the
// node's tunnel MTU) with fragmentation forbidden, and answers a
// ProbeReport. Targets are the other nodes' tunnel addresses (or pod
// bridge addresses on a VPN carrier); other addresses are refused.
const PathProbe = "/probe"

// Probe limits.
const (
	// MaxProbeTargets is the most targets one probe request takes.
	MaxProbeTargets = 1024
	// MaxProbeCount is the most small echo requests per target.
	MaxProbeCount = 10
)

// ProbeReport answers a probe request.
type ProbeReport struct {
	// Node is the probing node.
	Node string `json:"node"`
	// MTU is the node's tunnel MTU, the size of the large probe unless the
	// request set one.
	MTU     int           `json:"mtu"`
	Results []ProbeResult `json:"results"`
}

// ProbeResult is what one node saw probing one target.
type ProbeResult struct {
	Target netip.Addr `json:"target"`
	// Sent and Received count the small echo requests and their replies.
	Sent     int `json:"sent"`
	Received int `json:"received"`
	// RTT is the mean round trip of the replies; 0 without replies.
	RTT time.Duration `json:"rtt"`
	// LargeSize is the size of the large, unfragmentable probe (whole IP
	// packet); 0 if none was sent. LargeOK says whether it was answered.
	LargeSize int  `json:"largeSize,omitempty"`
	LargeOK   bool `json:"largeOK"`
	// Error says why the probe could not run (no socket, no route).
	Error string `json:"error,omitempty"`
}

// Reasons `trellis check` gives for a pair that does not work.
const (
	CheckOK            = "ok"
	CheckNoHandshake   = "no handshake"
	CheckRelayDown     = "relay down"
	CheckMTUBlackHole  = "MTU black hole"
	CheckRouteNotAppr  = "route not approved"
	CheckPolicyDenies  = "policy denies"
	CheckNoPath        = "no path"
	CheckUnreachable   = "node unreachable"
	CheckNoReply       = "no reply"
	CheckNoDataPlane   = "no data plane"
	CheckProbeFailed   = "probe failed"
	CheckTargetUnknown = "no address"
)

// CheckPair is the outcome of one node probing another.
type CheckPair struct {
	From string `json:"from"`
	To   string `json:"to"`
	// OK is true when small and large probes were answered.
	OK bool `json:"ok"`
	// Status is CheckOK or one of the other Check* reasons.
	Status string `json:"status"`
	// Detail explains Status in a sentence and says what to do.
	Detail string `json:"detail,omitempty"`
	// RTT is the mean round trip of the small probes.
	RTT time.Duration `json:"rtt,omitempty"`
	// Path is the kind of path (direct, relayed, none) and Via its relay.
	Path string `json:"path,omitempty"`
	Via  string `json:"via,omitempty"`
	// Target is the address probed.
	Target netip.Addr `json:"target,omitzero"`
}

// CheckReport is the result of `trellis check`.
type CheckReport struct {
	Nodes []string    `json:"nodes"`
	Pairs []CheckPair `json:"pairs"`
	// OK is true when every pair works.
	OK   bool      `json:"ok"`
	Time time.Time `json:"time"`
}
