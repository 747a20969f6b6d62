package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/client"
	"github.com/trellis-mesh/trellis/internal/ipam"
)

// Output formats of the listing commands.
const (
	FormatTable = "table"
	FormatWide  = "wide"
	FormatJSON  = "json"
	FormatYAML  = "yaml"
)

// wideTimeout bounds the per-node calls of `trellis nodes -o wide`: an
// unreachable node must not hold up the listing.
const wideTimeout = 3 * time.Second

// Unknown is shown for a value that could not be fetched (the node is
// unreachable through its tunnel).
const Unknown = "<unknown>"

// NodeListOptions say how PrintNodeList writes nodes.
type NodeListOptions struct {
	// Format is FormatTable (or ""), FormatWide, FormatJSON or FormatYAML.
	Format string
	// Colour paints the table's state columns; only for terminals.
	Colour bool
	// Now is the time ages are measured to.
	Now time.Time
	// Wide holds the extra columns of FormatWide by node name (see
	// Client.Wide); a node missing from it shows Unknown.
	Wide map[string]WideInfo
}

// WideInfo is what `trellis nodes -o wide` adds to a node's row: how the
// reference node (a server's node, the server's view of the mesh) reaches
// it.
type WideInfo struct {
	// Known is false when neither the reference node nor the node itself
	// answered: the other fields are then unknown.
	Known bool
	// Self marks the reference node's own row.
	Self bool
	// Endpoint is where the reference node sends the node's packets.
	Endpoint netip.AddrPort
	// Path is direct, relayed or none; Via is the relay.
	Path, Via string
	// Handshake is the age of the last handshake; HasHandshake is false
	// before the first.
	Handshake    time.Duration
	HasHandshake bool
	// RTT of a ping from the reference node; zero if none was answered.
	RTT time.Duration
	// Rx and Tx are the bytes the reference node received from and sent
	// to the node.
	Rx, Tx int64
}

// IsTerminal reports whether w is a terminal (a character device), where
// colour is wanted. NO_COLOR in the environment turns colour off.
func IsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok || os.Getenv("NO_COLOR") != "" {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// ANSI colours. Every cell of a coloured column carries a code of the same
// length, so tabwriter's alignment holds.
const (
	colGreen   = "\x1b[32m"
	colRed     = "\x1b[31m"
	colYellow  = "\x1b[33m"
	colDefault = "\x1b[39m"
	colReset   = "\x1b[0m"
)

type painter bool

func (p painter) paint(colour, s string) string {
	if !p {
		return s
	}
	return colour + s + colReset
}

// PrintNodeList writes nodes in the chosen format.
func PrintNodeList(w io.Writer, nodes []api.Node, o NodeListOptions) error {
	if nodes == nil {
		nodes = []api.Node{}
	}
	switch o.Format {
	case FormatJSON:
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(nodes)
	case FormatYAML:
		b, err := yaml.Marshal(nodes)
		if err != nil {
			return err
		}
		_, err = w.Write(b)
		return err
	case "", FormatTable, FormatWide:
	default:
		return fmt.Errorf("unknown output format %q: use table, wide, json or yaml", o.Format)
	}
	wide := o.Format == FormatWide
	p := painter(o.Colour)
	tw := tabwriter.NewWriter(w, 0, 4, 3, ' ', 0)
	hdr := []string{"NAME", "ROLES", p.paint(colDefault, "READY"), p.paint(colDefault, "TUNNEL"), "INTERNAL-IP", "EXTERNAL-IP", "POD-CIDR", "AGE"}
	if wide {
		hdr = append(hdr, "ENDPOINT", p.paint(colDefault, "PATH"), "HANDSHAKE", "RTT", "RX", "TX")
	}
	fmt.Fprintln(tw, strings.Join(hdr, "\t"))
	for _, n := range nodes {
		ready, rc := "False", colRed
		if n.Ready {
			ready, rc = "True", colGreen
		}
		tun := TunnelColumn(n.Tunnel, o.Now)
		tc := colDefault
		switch {
		case strings.HasPrefix(tun, "up"):
			tc = colGreen
		case strings.HasPrefix(tun, "down"):
			tc = colRed
		}
		row := []string{n.Name, orNone(strings.Join(n.Roles, ",")), p.paint(rc, ready), p.paint(tc, tun),
			orNone(joinAddrs(n.InternalIPs)), orNone(joinAddrs(n.ExternalIPs)), orNone(joinPrefixes(n.PodCIDRs)), Age(o.Now.Sub(n.CreatedAt))}
		if wide {
			row = append(row, wideCells(p, o.Wide[n.Name])...)
		}
		fmt.Fprintln(tw, strings.Join(row, "\t"))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	return printVPN(w, nodes)
}

// wideCells are the extra cells of a wide row.
func wideCells(p painter, wi WideInfo) []string {
	switch {
	case wi.Self:
		return []string{"-", p.paint(colDefault, "self"), "-", "-", "-", "-"}
	case !wi.Known:
		return []string{Unknown, p.paint(colDefault, Unknown), Unknown, Unknown, Unknown, Unknown}
	}
	ep := "<none>"
	if wi.Endpoint.IsValid() {
		ep = wi.Endpoint.String()
	}
	path, pc := orNone(wi.Path), colDefault
	switch wi.Path {
	case api.PathDirect:
		pc = colGreen
	case api.PathRelayed:
		path, pc = "relayed:"+wi.Via, colYellow
	case api.PathNone:
		pc = colRed
	}
	hs := "never"
	if wi.HasHandshake {
		hs = Age(wi.Handshake) + " ago"
	}
	rtt := "-"
	if wi.RTT > 0 {
		rtt = formatRTT(wi.RTT)
	}
	return []string{ep, p.paint(pc, path), hs, rtt, bytesString(wi.Rx), bytesString(wi.Tx)}
}

// formatRTT writes a round trip as 0.42ms or 12ms.
func formatRTT(d time.Duration) string {
	ms := float64(d) / float64(time.Millisecond)
	if ms < 10 {
		return fmt.Sprintf("%.2fms", ms)
	}
	return fmt.Sprintf("%.0fms", ms)
}

// ProbeTarget is the address other nodes ping to reach node n across the
// mesh: its tunnel address (WireGuard) or its pod bridge address (VPN
// carrier), IPv4 first.
func ProbeTarget(n api.Node) (netip.Addr, bool) {
	var best netip.Prefix
	for _, p := range n.PodCIDRs {
		if !best.IsValid() || (p.Addr().Is4() && !best.Addr().Is4()) {
			best = p
		}
	}
	if !best.IsValid() {
		return netip.Addr{}, false
	}
	if n.PublicKey.IsZero() {
		return ipam.Gateway(best).Addr(), true
	}
	return ipam.TunnelAddr(best).Addr(), true
}

// referenceNode picks the node whose view `-o wide` shows: a ready server
// node with its tunnel up, else any ready node with its tunnel up.
func referenceNode(nodes []api.Node) (api.Node, bool) {
	var fallback *api.Node
	for i, n := range nodes {
		if !n.Ready || n.Tunnel == nil || !n.Tunnel.Connected {
			continue
		}
		if n.HasRole(api.RoleServer) {
			return n, true
		}
		if fallback == nil {
			fallback = &nodes[i]
		}
	}
	if fallback != nil {
		return *fallback, true
	}
	return api.Node{}, false
}

// Wide gathers the wide columns for nodes: the paths, and every node's
// status through its tunnel, all at once, each bounded by a short timeout;
// the reference node also pings every other node once for the RTT.
func (c *Client) Wide(ctx context.Context, nodes []api.Node) map[string]WideInfo {
	ctx, cancel := context.WithTimeout(ctx, wideTimeout+2*time.Second)
	defer cancel()
	ref, haveRef := referenceNode(nodes)
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		paths    = map[string]api.Path{}
		statuses = map[string]*api.NodeStatus{}
		probes   *api.ProbeReport
	)
	wg.Go(func() {
		pctx, cancel := context.WithTimeout(ctx, wideTimeout)
		defer cancel()
		ps, err := c.Paths(pctx)
		if err != nil {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		for _, p := range ps {
			paths[p.From+"\x00"+p.To] = p
		}
	})
	for _, n := range nodes {
		if n.Tunnel != nil && !n.Tunnel.Connected {
			continue // unreachable: no need to wait for the timeout
		}
		wg.Go(func() {
			sctx, cancel := context.WithTimeout(ctx, wideTimeout)
			defer cancel()
			st, err := c.NodeStatus(sctx, n.Name)
			if err != nil {
				return
			}
			mu.Lock()
			statuses[n.Name] = st
			mu.Unlock()
			if !haveRef || n.Name != ref.Name {
				return
			}
			var targets []netip.Addr
			for _, o := range nodes {
				if t, ok := ProbeTarget(o); ok && o.Name != ref.Name {
					targets = append(targets, t)
				}
			}
			if len(targets) == 0 {
				return
			}
			rep, err := c.Probe(sctx, n.Name, st.StatusPort, client.ProbeRequest{Targets: targets, Count: 1, Size: 0})
			if err == nil {
				mu.Lock()
				probes = rep
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	out := make(map[string]WideInfo, len(nodes))
	for _, n := range nodes {
		if haveRef && n.Name == ref.Name {
			out[n.Name] = WideInfo{Self: true}
			continue
		}
		wi := WideInfo{}
		// The reference node's view of n, else n's view of the reference
		// (the same WireGuard session seen from the other end).
		if st := statuses[ref.Name]; haveRef && st != nil {
			if ps, ok := peerNamed(st, n.Name); ok {
				wi = fromPeer(st, ps)
			}
		} else if st := statuses[n.Name]; haveRef && st != nil {
			if ps, ok := peerNamed(st, ref.Name); ok {
				wi = fromPeer(st, ps)
				wi.Rx, wi.Tx = ps.TxBytes, ps.RxBytes
			}
		}
		if p, ok := paths[ref.Name+"\x00"+n.Name]; ok {
			wi.Path, wi.Via = p.Kind, p.Via
			if !wi.Endpoint.IsValid() {
				wi.Endpoint = p.Endpoint
			}
		}
		if t, ok := ProbeTarget(n); ok && probes != nil {
			for _, r := range probes.Results {
				if r.Target == t && r.Received > 0 {
					wi.RTT = r.RTT
				}
			}
		}
		out[n.Name] = wi
	}
	return out
}

func peerNamed(st *api.NodeStatus, name string) (api.PeerStatus, bool) {
	for _, p := range st.Peers {
		if p.Name == name {
			return p, true
		}
	}
	return api.PeerStatus{}, false
}

func fromPeer(st *api.NodeStatus, p api.PeerStatus) WideInfo {
	wi := WideInfo{Known: true, Endpoint: p.Endpoint, Rx: p.RxBytes, Tx: p.TxBytes}
	if !p.LastHandshake.IsZero() {
		wi.HasHandshake, wi.Handshake = true, st.Time.Sub(p.LastHandshake)
	}
	return wi
}

// WatchKey is what `trellis nodes --watch` compares to decide whether to
// print again. For tables it is what the table shows, without what moves
// every second (ages, traffic counters, handshake ages, round trips); for
// JSON and YAML it is the data.
func WatchKey(nodes []api.Node, wide map[string]WideInfo, format string) string {
	var b bytes.Buffer
	if format != FormatJSON && format != FormatYAML {
		still := make(map[string]WideInfo, len(wide))
		for k, wi := range wide {
			wi.Handshake, wi.Rx, wi.Tx, wi.RTT = 0, 0, 0, 0
			still[k] = wi
		}
		_ = PrintNodeList(&b, nodes, NodeListOptions{Format: format, Wide: still})
		return b.String()
	}
	_ = json.NewEncoder(&b).Encode(nodes)
	return b.String()
}
