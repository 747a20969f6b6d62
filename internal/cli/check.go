package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/client"
)

// ErrCheckFailed is returned by PrintCheck when a pair does not work: the
// command then exits non-zero.
var ErrCheckFailed = errors.New("some pairs of nodes cannot reach each other")

// checkTimeout bounds the whole check: statuses, then the probes.
const checkTimeout = 45 * time.Second

// handshakeStale is how old a WireGuard handshake may be while the
// session lives (WireGuard rejects sessions older than 180 s).
const handshakeStale = 180 * time.Second

// CheckOptions tune `trellis check`.
type CheckOptions struct {
	// Count is the number of small pings per pair (default 3).
	Count int
	// Now is the time of the report (default time.Now()).
	Now time.Time
}

// Check makes every node ping every other node across the mesh, from
// inside the nodes (through their tunnels), and explains each pair that
// does not work.
func (c *Client) Check(ctx context.Context, o CheckOptions) (*api.CheckReport, error) {
	if o.Count <= 0 {
		o.Count = 3
	}
	ctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	nodes, err := c.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	paths, err := c.Paths(ctx)
	if err != nil {
		return nil, err
	}
	in := CheckInput{Nodes: nodes, Paths: paths, Statuses: map[string]*api.NodeStatus{}, StatusErrs: map[string]error{}, Probes: map[string]*api.ProbeReport{}, ProbeErrs: map[string]error{}}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, n := range nodes {
		wg.Go(func() {
			sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			st, err := c.NodeStatus(sctx, n.Name)
			cancel()
			mu.Lock()
			in.Statuses[n.Name], in.StatusErrs[n.Name] = st, err
			mu.Unlock()
			if err != nil {
				return
			}
			var targets []netip.Addr
			for _, o := range nodes {
				if t, ok := ProbeTarget(o); ok && o.Name != n.Name {
					targets = append(targets, t)
				}
			}
			if len(targets) == 0 {
				return
			}
			rep, err := c.Probe(ctx, n.Name, st.StatusPort, client.ProbeRequest{Targets: targets, Count: o.Count, Size: -1})
			mu.Lock()
			in.Probes[n.Name], in.ProbeErrs[n.Name] = rep, err
			mu.Unlock()
		})
	}
	wg.Wait()
	now := o.Now
	if now.IsZero() {
		now = time.Now()
	}
	return Evaluate(in, now), nil
}

// CheckInput is everything `trellis check` learned, for Evaluate.
type CheckInput struct {
	Nodes      []api.Node
	Paths      []api.Path
	Statuses   map[string]*api.NodeStatus
	StatusErrs map[string]error
	Probes     map[string]*api.ProbeReport
	ProbeErrs  map[string]error
}

// Evaluate turns what the nodes saw into a verdict per ordered pair. It is
// pure, for tests.
func Evaluate(in CheckInput, now time.Time) *api.CheckReport {
	rep := &api.CheckReport{OK: true, Time: now, Nodes: []string{}, Pairs: []api.CheckPair{}}
	byName := map[string]api.Node{}
	for _, n := range in.Nodes {
		rep.Nodes = append(rep.Nodes, n.Name)
		byName[n.Name] = n
	}
	slices.Sort(rep.Nodes)
	paths := map[string]api.Path{}
	for _, p := range in.Paths {
		paths[p.From+"\x00"+p.To] = p
	}
	for _, a := range rep.Nodes {
		for _, b := range rep.Nodes {
			if a == b {
				continue
			}
			p := evaluatePair(in, byName, paths, byName[a], byName[b], now)
			rep.OK = rep.OK && p.OK
			rep.Pairs = append(rep.Pairs, p)
		}
	}
	return rep
}

func evaluatePair(in CheckInput, byName map[string]api.Node, paths map[string]api.Path, a, b api.Node, now time.Time) api.CheckPair {
	cp := api.CheckPair{From: a.Name, To: b.Name}
	path, havePath := paths[a.Name+"\x00"+b.Name]
	if havePath {
		cp.Path, cp.Via = path.Kind, path.Via
	}
	fail := func(status, detail string) api.CheckPair {
		cp.Status, cp.Detail = status, detail
		return cp
	}
	if st := in.Statuses[a.Name]; st == nil {
		err := in.StatusErrs[a.Name]
		if err == nil {
			err = errors.New("no answer")
		}
		return fail(api.CheckUnreachable, fmt.Sprintf("%s cannot be asked through its supervisor tunnel (%v): is its agent running and connected? ('trellis nodes' shows TUNNEL)", a.Name, err))
	}
	target, ok := ProbeTarget(b)
	if !ok {
		return fail(api.CheckTargetUnknown, fmt.Sprintf("%s has no pod CIDR yet, so there is nothing to ping; wait for it to finish joining", b.Name))
	}
	cp.Target = target
	if (a.PublicKey.IsZero() && a.VPN == nil) || (b.PublicKey.IsZero() && b.VPN == nil) {
		return fail(api.CheckNoDataPlane, "one of the nodes runs without a data plane (--flannel-backend=none): there is no mesh between them")
	}
	var res *api.ProbeResult
	if pr := in.Probes[a.Name]; pr != nil {
		for i := range pr.Results {
			if pr.Results[i].Target == target {
				res = &pr.Results[i]
			}
		}
	}
	if res == nil {
		err := in.ProbeErrs[a.Name]
		if err == nil {
			err = errors.New("no result for this target")
		}
		return fail(api.CheckProbeFailed, fmt.Sprintf("%s could not probe: %v", a.Name, err))
	}
	if res.Error != "" {
		return fail(api.CheckProbeFailed, fmt.Sprintf("%s could not ping %s: %s", a.Name, target, res.Error))
	}
	if res.Received > 0 {
		cp.RTT = res.RTT
		if res.LargeSize > 0 && !res.LargeOK {
			return fail(api.CheckMTUBlackHole, fmt.Sprintf("small packets pass but a %d-byte packet that may not be fragmented does not: something between %s and %s has a smaller MTU and drops what does not fit without telling. Lower the tunnel MTU on both (--wireguard-mtu = path MTU - 80), or fix the underlay's MTU", res.LargeSize, a.Name, b.Name))
		}
		cp.OK, cp.Status = true, api.CheckOK
		return cp
	}
	// Nothing came back: find the most likely reason.
	for _, n := range []api.Node{b, a} {
		if n.VPN != nil && n.VPN.PolicyDenies {
			return fail(api.CheckPolicyDenies, fmt.Sprintf("the tailnet policy lets no traffic from the cluster reach %s's pod CIDRs %s (an empty \"acls\" list denies everything): allow it in the policy's acls; 'trellis nodes' prints a rule to add", n.Name, joinPrefixes(n.VPN.Routes)))
		}
	}
	for _, n := range []api.Node{b, a} {
		if n.VPN != nil && !n.VPN.RoutesApproved {
			return fail(api.CheckRouteNotAppr, fmt.Sprintf("the VPN has not approved %s's pod CIDR routes %s, so traffic for them goes nowhere: approve them, or add the autoApprovers stanza that 'trellis nodes' prints", n.Name, joinPrefixes(n.VPN.Routes)))
		}
	}
	if a.VPN != nil || b.VPN != nil {
		return fail(api.CheckNoReply, fmt.Sprintf("%s's pings to %s went unanswered over the VPN: check 'tailscale status' and 'tailscale ping' between them", a.Name, target))
	}
	switch {
	case havePath && path.Kind == api.PathRelayed:
		r, known := byName[path.Via]
		if !known || !r.Ready {
			return fail(api.CheckRelayDown, fmt.Sprintf("%s reaches %s through relay %s, which is not ready: start it again, or add a relay (--relay on a node with a public address)", a.Name, b.Name, path.Via))
		}
		if st := in.Statuses[a.Name]; st != nil {
			if ps, ok := peerNamed(st, path.Via); !ok || !fresh(st, ps) {
				return fail(api.CheckRelayDown, fmt.Sprintf("%s reaches %s through relay %s but has no working WireGuard session with the relay", a.Name, b.Name, path.Via))
			}
		}
		return fail(api.CheckNoReply, fmt.Sprintf("%s reaches %s through relay %s, which is up, but no reply came back: does %s forward (net.ipv4.ip_forward=1) and does a firewall drop ICMP?", a.Name, b.Name, path.Via, path.Via))
	case havePath && path.Kind == api.PathNone:
		relays := 0
		for _, n := range in.Nodes {
			if n.Name != a.Name && n.Name != b.Name && !n.PublicKey.IsZero() && (n.Relay || n.HasRole(api.RoleServer)) {
				relays++
			}
		}
		if relays > 0 {
			return fail(api.CheckRelayDown, fmt.Sprintf("%s and %s cannot reach each other directly (%s) and none of the %d relays is ready and reaches both: check the relays with 'trellis nodes'", a.Name, b.Name, path.Reason, relays))
		}
		if strings.Contains(path.Reason, "handshake") {
			return fail(api.CheckNoHandshake, fmt.Sprintf("no WireGuard handshake between %s and %s and no relay to fall back on: open UDP %d between them (firewall, security group), or run a node with a public address with --relay", a.Name, b.Name, listenPort(b)))
		}
		return fail(api.CheckNoPath, fmt.Sprintf("%s and %s have no path: %s", a.Name, b.Name, path.Reason))
	}
	if st := in.Statuses[a.Name]; st != nil {
		ps, ok := peerNamed(st, b.Name)
		if !ok || !fresh(st, ps) {
			ep := "<no endpoint>"
			if ok && ps.Endpoint.IsValid() {
				ep = ps.Endpoint.String()
			} else if havePath && path.Endpoint.IsValid() {
				ep = path.Endpoint.String()
			}
			return fail(api.CheckNoHandshake, fmt.Sprintf("%s has no WireGuard handshake with %s at %s: UDP %d must be open from %s to that address (firewall, security group, NAT)", a.Name, b.Name, ep, listenPort(b), a.Name))
		}
	}
	return fail(api.CheckNoReply, fmt.Sprintf("%s has a WireGuard session with %s but its pings to %s went unanswered: does a firewall on %s drop ICMP?", a.Name, b.Name, target, b.Name))
}

func fresh(st *api.NodeStatus, p api.PeerStatus) bool {
	return !p.LastHandshake.IsZero() && st.Time.Sub(p.LastHandshake) < handshakeStale
}

func listenPort(n api.Node) int {
	if n.ListenPort != 0 {
		return int(n.ListenPort)
	}
	return api.DefaultWireGuardPort
}

// PrintCheck writes a check report: an N×N matrix of round trips or
// reasons, and one line per failing pair saying what to do (table), or
// the report as JSON or YAML. It returns ErrCheckFailed when a pair does
// not work, after writing.
func PrintCheck(w io.Writer, rep *api.CheckReport, format string, colour bool) error {
	var err error
	switch format {
	case FormatJSON:
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		err = enc.Encode(rep)
	case FormatYAML:
		var b []byte
		if b, err = yaml.Marshal(rep); err == nil {
			_, err = w.Write(b)
		}
	case "", FormatTable:
		err = printCheckTable(w, rep, painter(colour))
	default:
		return fmt.Errorf("unknown output format %q: use table, json or yaml", format)
	}
	if err != nil {
		return err
	}
	if !rep.OK {
		return ErrCheckFailed
	}
	return nil
}

func printCheckTable(w io.Writer, rep *api.CheckReport, p painter) error {
	if len(rep.Nodes) < 2 {
		_, err := fmt.Fprintf(w, "%d node(s): no pairs to check\n", len(rep.Nodes))
		return err
	}
	cell := map[string]api.CheckPair{}
	for _, cp := range rep.Pairs {
		cell[cp.From+"\x00"+cp.To] = cp
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	hdr := []string{"FROM \\ TO"}
	for _, n := range rep.Nodes {
		hdr = append(hdr, p.paint(colDefault, n))
	}
	fmt.Fprintln(tw, strings.Join(hdr, "\t"))
	for _, a := range rep.Nodes {
		row := []string{a}
		for _, b := range rep.Nodes {
			if a == b {
				row = append(row, p.paint(colDefault, "-"))
				continue
			}
			cp := cell[a+"\x00"+b]
			if cp.OK {
				s := formatRTT(cp.RTT)
				if cp.Path == api.PathRelayed {
					s += " via " + cp.Via
				}
				row = append(row, p.paint(colGreen, s))
				continue
			}
			row = append(row, p.paint(colRed, cp.Status))
		}
		fmt.Fprintln(tw, strings.Join(row, "\t"))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	failed := 0
	for _, cp := range rep.Pairs {
		if !cp.OK {
			failed++
		}
	}
	if failed == 0 {
		_, err := fmt.Fprintf(w, "\nall %d pairs of %d nodes work (small pings and full-MTU pings that may not be fragmented)\n", len(rep.Pairs), len(rep.Nodes))
		return err
	}
	fmt.Fprintf(w, "\n%d of %d pairs fail:\n", failed, len(rep.Pairs))
	for _, cp := range rep.Pairs {
		if !cp.OK {
			fmt.Fprintf(w, "  %s → %s: %s: %s\n", cp.From, cp.To, p.paint(colRed, cp.Status), cp.Detail)
		}
	}
	_, err := fmt.Fprintln(w, "\nSee docs/troubleshooting.md for each reason.")
	return err
}
