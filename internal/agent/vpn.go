package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/hostnet"
	"github.com/trellis-mesh/trellis/internal/pki"
	"github.com/trellis-mesh/trellis/internal/vpn"
)

// DefaultRouteApprovalTimeout is how long the VPN's control server may take
// to approve a node's pod CIDR routes before the agent warns.
const DefaultRouteApprovalTimeout = 30 * time.Second

const (
	// vpnStateFile (in the agent's data dir) records the routes Trellis
	// added to the VPN and the routes it put on the VPN interface, so that
	// leaving withdraws exactly those, also after a restart.
	vpnStateFile = "vpn-routes.json"
	// vpnCheckPending and vpnCheckSettled are how often the agent asks the
	// VPN about its routes while approval is pending, and after.
	vpnCheckPending = time.Second
	vpnCheckSettled = 10 * time.Second
)

// vpnState is what the agent keeps in vpnStateFile.
type vpnState struct {
	Provider string `json:"provider"`
	// Advertised are routes Trellis added to the VPN's advertised routes;
	// routes the node advertised before are not listed.
	Advertised []netip.Prefix `json:"advertised,omitempty"`
	// KernelRoutes are the cluster CIDRs routed to the VPN interface.
	KernelRoutes []netip.Prefix `json:"kernelRoutes,omitempty"`
}

// vpnCarrier is the VPN part of the data plane: what the loop advertised
// through the VPN and what the VPN says about it. Only the loop touches
// it.
type vpnCarrier struct {
	p               vpn.Provider
	addrs           []netip.Addr // the node's VPN addresses (its node IPs)
	statePath       string       // vpnStateFile in the data dir
	approvalTimeout time.Duration

	advertised []netip.Prefix // pod CIDRs last advertised, with cidrs
	adDone     bool           // advertised is in force
	routes     []netip.Prefix // pod CIDRs whose approval is watched
	since      time.Time      // when they were advertised
	next       time.Time      // next check
	approved   bool
	warned     string         // the kind of warning logged last ("" none, "approval", "policy")
	cidrs      []netip.Prefix // cluster CIDRs
	loginName  string
	tags       []string       // the node's tags on the VPN (a tagged join key)
	status     *api.VPNStatus // last status reported
}

func (c *Config) validateVPN() error {
	if c.VPN == nil {
		return nil
	}
	if c.DataPlane {
		return errors.New("agent config: a VPN carrier (--vpn-auth) replaces the WireGuard data plane; DataPlane must be false")
	}
	if c.RouteApprovalTimeout == 0 {
		c.RouteApprovalTimeout = DefaultRouteApprovalTimeout
	}
	if c.RouteApprovalTimeout < 0 {
		return fmt.Errorf("route approval timeout %v is negative", c.RouteApprovalTimeout)
	}
	return nil
}

// vpnUp joins the VPN before the cluster (the server may be reachable only
// through it); the node's VPN addresses become its node IPs.
func vpnUp(ctx context.Context, cfg *Config, log *slog.Logger) (*vpnCarrier, error) {
	start := time.Now()
	st, err := cfg.VPN.Up(ctx)
	if err != nil {
		return nil, fmt.Errorf("VPN %s: %w", cfg.VPN.Name(), err)
	}
	addrs := slices.Clone(st.Addrs)
	slices.SortFunc(addrs, netip.Addr.Compare) // IPv4 first
	if len(cfg.NodeIPs) > 0 && !slices.Equal(cfg.NodeIPs, addrs) {
		log.Warn("--node-ip is ignored: with --vpn-auth the node IPs are the node's VPN addresses", "nodeIP", cfg.NodeIPs, "vpnAddresses", addrs)
	}
	cfg.NodeIPs = addrs
	log.Info("VPN up; its addresses are the node IPs", "vpn", cfg.VPN.Name(), "addresses", addrs, "took", time.Since(start).Round(time.Millisecond))
	v := &vpnCarrier{p: cfg.VPN, addrs: addrs, statePath: cfg.dir(vpnStateFile), approvalTimeout: cfg.RouteApprovalTimeout, loginName: st.LoginName, tags: slices.Clone(st.Tags)}
	if deniesAll(st) {
		log.Warn(denyAllWarning(stanzaOwner(st.LoginName, st.Tags)))
	}
	return v, nil
}

// deniesAll reports whether the VPN's packet filter, when known, lets no
// traffic at all reach the node's VPN addresses.
func deniesAll(st vpn.State) bool {
	if !st.FilterKnown {
		return false
	}
	for _, a := range st.Addrs {
		everyone := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		if a.Is6() {
			everyone = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
		if vpn.Admits(st.Filter, []netip.Prefix{everyone}, netip.PrefixFrom(a, a.BitLen())) {
			return false
		}
	}
	return true
}

func denyAllWarning(owner string) string {
	return "the tailnet policy lets no traffic at all reach this node: its packet filter (what the policy lets in; tailscale debug localapi POST 'debug?action=current-netmap' shows it as PacketFilter) is empty, so no other node, and no server reached over the tailnet, can reach it. " +
		"An empty acls list (\"acls\": []) denies everything. Allow the cluster's nodes in the policy's acls (headscale: its policy file, then SIGHUP; a policy with no acls key at all allows everything), e.g. the rule below, and their pods (the nodes print a rule with the cluster CIDRs once they have joined):\n" +
		aclRule(nil, owner)
}

// joinHint says, while the agent waits for its server, that the tailnet
// policy denies all traffic to this node, if it does now.
func (v *vpnCarrier) joinHint() string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := v.p.State(ctx)
	if err != nil || !deniesAll(st) {
		return ""
	}
	return "the tailnet policy lets no traffic reach this node (\"acls\": [] denies everything), so the server cannot answer over the tailnet; see the warning at start"
}

// recordKernelRoutes adds prefixes to the kernel routes the VPN record
// lists, before they are routed: a crash must not orphan a route.
func (v *vpnCarrier) recordKernelRoutes(prefixes []netip.Prefix) error {
	saved, err := loadVPNState(v.statePath)
	if err != nil {
		return err
	}
	merged := mergePrefixes(saved.KernelRoutes, prefixes)
	if saved.Provider == v.p.Name() && slices.Equal(merged, saved.KernelRoutes) {
		return nil
	}
	saved.Provider, saved.KernelRoutes = v.p.Name(), merged
	return saveVPNState(v.statePath, saved)
}

// advertise makes the VPN route the node's pod CIDRs to it: it refuses a
// cluster CIDR that another VPN node already routes (a fatalError: the
// operator must choose), withdraws pod CIDRs Trellis advertised before
// that are no longer the node's, and advertises the current ones. It asks
// the VPN only when the pod CIDRs changed or the last try failed.
func (l *loop) advertise(ctx context.Context, podCIDRs []netip.Prefix) error {
	v := l.vpn
	cidrs := l.nm.ClusterCIDRs
	if v.adDone && slices.Equal(v.advertised, podCIDRs) && slices.Equal(v.cidrs, cidrs) {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, vpnCallTimeout)
	defer cancel()
	p := v.p
	st, err := p.State(ctx)
	if err != nil {
		return fmt.Errorf("VPN %s: %w", p.Name(), err)
	}
	if clash := foreignRoutes(st, cidrs, l.members); len(clash) > 0 {
		return &fatalError{fmt.Errorf("VPN %s: %s, which overlaps this cluster's CIDR %s: another cluster (or another subnet router) uses the same range on this tailnet. Choose another --cluster-cidr for this cluster (on a new server), or stop that node advertising it",
			p.Name(), strings.Join(clash, "; "), joinPrefixList(cidrs))}
	}
	saved, err := loadVPNState(v.statePath)
	if err != nil {
		return err
	}
	ours, stale := planAdvertise(saved.Advertised, st.Advertised, podCIDRs)
	next := vpnState{Provider: p.Name(), Advertised: append(slices.Clone(ours), stale...), KernelRoutes: mergePrefixes(saved.KernelRoutes, cidrs)}
	if err := saveVPNState(v.statePath, next); err != nil { // before the change: a crash must not orphan a route
		return err
	}
	if len(stale) > 0 {
		if err := p.WithdrawRoutes(ctx, stale); err != nil {
			return fmt.Errorf("VPN %s: withdraw the node's old pod CIDRs %v: %w", p.Name(), stale, err)
		}
	}
	if _, err := p.AdvertiseRoutes(ctx, podCIDRs); err != nil {
		return fmt.Errorf("VPN %s: advertise the pod CIDRs %v: %w", p.Name(), podCIDRs, err)
	}
	next.Advertised = ours
	if err := saveVPNState(v.statePath, next); err != nil {
		return err
	}
	if !slices.Equal(v.routes, podCIDRs) || !v.approved {
		v.routes, v.since, v.next, v.approved, v.warned = slices.Clone(podCIDRs), time.Now(), time.Time{}, false, ""
	}
	v.cidrs = slices.Clone(cidrs)
	if st.LoginName != "" {
		v.loginName = st.LoginName
	}
	v.advertised, v.adDone = slices.Clone(podCIDRs), true
	l.log.Info("pods routed over the VPN", "vpn", p.Name(), "interface", l.vpnLink.Name, "mtu", l.vpnLink.MTU, "podCIDRs", podCIDRs, "clusterCIDRs", cidrs)
	return nil
}

// planAdvertise returns the routes Trellis owns after advertising
// podCIDRs: those it recorded before that are still pod CIDRs, and the pod
// CIDRs the node does not advertise yet (a route the user advertised
// before stays the user's); and stale: routes it recorded that are no
// longer pod CIDRs, to withdraw.
func planAdvertise(recorded, advertised, podCIDRs []netip.Prefix) (ours, stale []netip.Prefix) {
	for _, p := range podCIDRs {
		if slices.Contains(recorded, p) || !slices.Contains(advertised, p) {
			ours = append(ours, p)
		}
	}
	for _, p := range recorded {
		if !slices.Contains(podCIDRs, p) {
			stale = append(stale, p)
		}
	}
	return ours, stale
}

// foreignRoutes describes the routes of VPN peers that are not cluster
// members (no member has one of their addresses) and overlap the cluster
// CIDRs.
func foreignRoutes(st vpn.State, cidrs []netip.Prefix, members []api.Member) []string {
	var out []string
	for _, peer := range st.Peers {
		member := slices.ContainsFunc(members, func(m api.Member) bool {
			return slices.ContainsFunc(peer.Addrs, func(a netip.Addr) bool { return slices.Contains(m.InternalIPs, a) })
		})
		if member {
			continue
		}
		for _, r := range peer.Routes {
			if slices.ContainsFunc(cidrs, r.Overlaps) {
				out = append(out, fmt.Sprintf("VPN node %q (%s, not a node of this cluster) routes %s", peer.Name, joinAddrList(peer.Addrs), r))
			}
		}
	}
	return out
}

// vpnReport returns the VPN status for the next report, asking the VPN
// whether the pod CIDR routes are approved when it is time to, and warning
// once when they are not within the approval timeout.
func (l *loop) vpnReport(ctx context.Context, now time.Time) *api.VPNStatus {
	v := l.vpn
	if len(v.routes) > 0 && !now.Before(v.next) {
		v.next = now.Add(vpnCheckPending)
		if v.approved {
			v.next = now.Add(vpnCheckSettled)
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		st, err := v.p.State(cctx)
		cancel()
		if err != nil {
			l.log.Debug("asking the VPN about the routes failed; will retry", "err", err)
		} else {
			l.vpnObserve(st, now)
		}
	}
	return v.status
}

// vpnObserve folds a VPN state into the carrier's status.
func (l *loop) vpnObserve(st vpn.State, now time.Time) {
	v := l.vpn
	if st.LoginName != "" {
		v.loginName = st.LoginName
	}
	approved := len(v.routes) > 0
	for _, r := range v.routes {
		approved = approved && slices.Contains(st.Approved, r)
	}
	s := &api.VPNStatus{Provider: v.p.Name(), Routes: slices.Clone(v.routes), RoutesApproved: approved, ServedRoutes: servedRoutes(st, v.cidrs)}
	switch {
	case approved && !v.approved:
		l.log.Info("the VPN approved the pod CIDR routes; pods on other nodes can reach this node's pods", "routes", v.routes, "after", now.Sub(v.since).Round(100*time.Millisecond))
	case !approved && v.approved:
		l.log.Warn("the VPN no longer routes this node's pod CIDRs to it", "routes", v.routes, "approved", st.Approved)
	}
	v.tags = slices.Clone(st.Tags)
	kind := ""
	if after := now.Sub(v.since); after >= v.approvalTimeout {
		if denied := policyDenied(st, v.routes, v.cidrs); len(denied) > 0 {
			kind, s.Warning, s.PolicyDenies = "policy", policyWarning(denied, v.cidrs, stanzaOwner(v.loginName, v.tags)), true
		} else if !approved {
			kind, s.Warning = "approval", unapprovedWarning(v.routes, after, v.cidrs, v.loginName, v.tags)
		}
	}
	if kind != "" && kind != v.warned {
		l.log.Warn(s.Warning)
	}
	v.warned = kind
	v.approved = approved
	v.status = s
}

// servedRoutes returns the routes inside the cluster CIDRs that the VPN
// routes to other nodes as this node sees it (its peers' routes), sorted
// and without duplicates.
func servedRoutes(st vpn.State, cidrs []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range st.Peers {
		for _, r := range p.Routes {
			inside := slices.ContainsFunc(cidrs, func(c netip.Prefix) bool { return c.Bits() <= r.Bits() && c.Contains(r.Addr()) })
			if inside && !slices.Contains(out, r) {
				out = append(out, r)
			}
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return out
}

// policyDenied returns the routes (pod CIDRs) that the VPN's packet filter
// lets no traffic from the cluster (a cluster CIDR of the route's family)
// reach: the tailnet policy denies them. Nothing when the filter is
// unknown.
func policyDenied(st vpn.State, routes, cidrs []netip.Prefix) []netip.Prefix {
	if !st.FilterKnown {
		return nil
	}
	var denied []netip.Prefix
	for _, r := range routes {
		var srcs []netip.Prefix
		for _, c := range cidrs {
			if c.Addr().Is4() == r.Addr().Is4() {
				srcs = append(srcs, c)
			}
		}
		if len(srcs) == 0 {
			srcs = []netip.Prefix{r}
		}
		if !vpn.Admits(st.Filter, srcs, r) {
			denied = append(denied, r)
		}
	}
	return denied
}

func policyWarning(denied, cidrs []netip.Prefix, owner string) string {
	return fmt.Sprintf("the tailnet policy lets no traffic from the cluster reach this node's pod CIDRs %s: the node's packet filter (what the policy lets in; tailscale debug localapi POST 'debug?action=current-netmap' shows it as PacketFilter) has no rule for them, so pods on other nodes can never reach its pods. "+
		"An empty acls list (\"acls\": []) denies everything. Allow the cluster's nodes and pods in the policy's acls (headscale: its policy file, then SIGHUP; a policy with no acls key at all allows everything), e.g.:\n%s",
		joinPrefixList(denied), aclRule(cidrs, owner))
}

// aclRule is a tailnet policy ACL rule that lets the cluster's nodes (those
// of owner, a user or tag) and pods (the cluster CIDRs) reach each other.
func aclRule(cidrs []netip.Prefix, owner string) string {
	var src, dst []string
	if owner != "" {
		src, dst = append(src, fmt.Sprintf("%q", owner)), append(dst, fmt.Sprintf("%q", owner+":*"))
	}
	for _, c := range cidrs {
		src = append(src, fmt.Sprintf("%q", c.String()))
		dst = append(dst, fmt.Sprintf("%q", c.String()+":*"))
	}
	return fmt.Sprintf(`{"action": "accept", "src": [%s], "dst": [%s]}`, strings.Join(src, ", "), strings.Join(dst, ", "))
}

// stanzaOwner is who a policy stanza names for this node: its first tag
// if it is tagged, else its login name with '@' added where it has none
// (headscale's policy names a user as "name@"); empty if unknown.
func stanzaOwner(login string, tags []string) string {
	switch {
	case len(tags) > 0:
		return tags[0]
	case login == "":
		return ""
	case !strings.Contains(login, "@") && !strings.Contains(login, ":"):
		return login + "@"
	}
	return login
}

func unapprovedWarning(routes []netip.Prefix, after time.Duration, cidrs []netip.Prefix, owner string, tags []string) string {
	tagged := ""
	if len(tags) > 0 {
		tagged = fmt.Sprintf("This node joined with a tagged key (%s): the control server approves a tagged node's routes only for an approver that names its tag (headscale: a user approver never matches a tagged node), so the stanza names the tag; the policy's tagOwners must list it too. ",
			strings.Join(tags, ","))
	}
	return fmt.Sprintf("the tailnet has not approved this node's pod CIDR routes %s after %v, so other nodes cannot reach its pods. %s"+
		"Approve them in the admin console (Machines, this node, Edit route settings; headscale: headscale nodes approve-routes), or let the control server approve every node's routes by adding to the tailnet policy file (headscale: its policy file, then reload it with SIGHUP):\n%s",
		joinPrefixList(routes), after.Round(time.Second), tagged, AutoApproversStanza(cidrs, stanzaOwner(owner, tags)))
}

// AutoApproversStanza is the tailnet policy stanza that approves routes
// inside the cluster CIDRs automatically, as the K3s documentation shows
// it. owner is the user or tag the nodes log in as; empty gives a
// placeholder. A user name without '@' (a headscale user created without
// an e-mail) gets one: headscale's policy names users as "name@".
func AutoApproversStanza(cidrs []netip.Prefix, owner string) string {
	switch {
	case owner == "":
		owner = "your_account@xyz.com"
	case !strings.Contains(owner, "@") && !strings.Contains(owner, ":"):
		owner += "@" // not tag:x, group:x, autogroup:x
	}
	var b strings.Builder
	b.WriteString("\"autoApprovers\": {\n\"routes\": {\n")
	for _, c := range cidrs {
		fmt.Fprintf(&b, "%q: [%q],\n", c.String(), owner)
	}
	b.WriteString("},\n},")
	return b.String()
}

// vpnLeave withdraws the routes Trellis added to the VPN and to the kernel
// (the node was deleted from the cluster).
func vpnLeave(ctx context.Context, dataDir string, p vpn.Provider, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(ctx, vpnCallTimeout)
	defer cancel()
	if err := CleanupVPN(ctx, dataDir, p, log); err != nil {
		log.Error("withdrawing this node's routes from the VPN failed; run 'trellis cleanup' on the node", "err", err)
	}
}

// CleanupVPN withdraws what the agent with data dir dataDir added: the
// routes it advertised through VPN provider p (and no other route the node
// advertises) and its kernel routes to the VPN interface. Without a record
// of them it does nothing.
func CleanupVPN(ctx context.Context, dataDir string, p vpn.Provider, log *slog.Logger) error {
	c := Config{DataDir: dataDir}
	path := c.dir(vpnStateFile)
	st, err := loadVPNState(path)
	if err != nil {
		return err
	}
	if st.Provider == "" {
		log.Info("no VPN routes of Trellis recorded; nothing to withdraw", "file", path)
		return nil
	}
	if st.Provider != p.Name() {
		return fmt.Errorf("%s records routes of VPN %q, not %q", path, st.Provider, p.Name())
	}
	if len(st.Advertised) > 0 {
		if err := p.WithdrawRoutes(ctx, st.Advertised); err != nil {
			return fmt.Errorf("withdraw %v from VPN %s: %w", st.Advertised, p.Name(), err)
		}
	}
	if err := hostnet.UnrouteFromLinks(st.KernelRoutes); err != nil {
		return fmt.Errorf("remove the routes of %v to the VPN interface: %w", st.KernelRoutes, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	log.Info("withdrew the routes Trellis added to the VPN", "vpn", p.Name(), "routes", st.Advertised, "kernelRoutes", st.KernelRoutes)
	return nil
}

func loadVPNState(path string) (vpnState, error) {
	var st vpnState
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return st, nil
	}
	if err != nil {
		return st, fmt.Errorf("read VPN route record: %w", err)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("VPN route record %s is damaged (%v); withdraw the pod CIDR routes by hand with 'tailscale set --advertise-routes', then remove it", path, err)
	}
	return st, nil
}

func saveVPNState(path string, st vpnState) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	if err := pki.WriteFileAtomic(path, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("save VPN route record: %w", err)
	}
	return nil
}

func mergePrefixes(a, b []netip.Prefix) []netip.Prefix {
	out := slices.Clone(a)
	for _, p := range b {
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}

func joinPrefixList(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

func joinAddrList(as []netip.Addr) string {
	s := make([]string, len(as))
	for i, a := range as {
		s[i] = a.String()
	}
	return strings.Join(s, ",")
}
