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
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/cni"
	"github.com/trellis-mesh/trellis/internal/ipam"
	"github.com/trellis-mesh/trellis/internal/netconv"
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
	// vpnSetupTimeout bounds the VPN part of setting up the data plane.
	vpnSetupTimeout = 2 * time.Minute
	// vpnRouteProto marks the kernel routes the agent adds towards the VPN
	// interface (RTPROT_STATIC is what `ip route add` uses; this one is
	// ours).
	vpnRouteProto = netlink.RouteProtocol(0x54) // 'T'
	// mainTable is the kernel's main routing table (RT_TABLE_MAIN).
	mainTable = 254
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

// vpnCarrier is the agent's VPN state between netmaps and reports.
type vpnCarrier struct {
	p vpn.Provider

	mu        sync.Mutex
	routes    []netip.Prefix // guarded by mu; pod CIDRs advertised
	since     time.Time      // guarded by mu; when they were advertised
	next      time.Time      // guarded by mu; next check
	approved  bool           // guarded by mu
	warned    bool           // guarded by mu
	cidrs     []netip.Prefix // guarded by mu; cluster CIDRs
	loginName string         // guarded by mu
	status    *api.VPNStatus // guarded by mu; last status reported
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
// through it) and makes the node's VPN addresses its node IPs.
func (a *Agent) vpnUp(ctx context.Context) error {
	if a.cfg.VPN == nil {
		return nil
	}
	start := time.Now()
	st, err := a.cfg.VPN.Up(ctx)
	if err != nil {
		return fmt.Errorf("VPN %s: %w", a.cfg.VPN.Name(), err)
	}
	addrs := slices.Clone(st.Addrs)
	slices.SortFunc(addrs, func(x, y netip.Addr) int { return x.Compare(y) }) // IPv4 first
	if len(a.cfg.NodeIPs) > 0 && !slices.Equal(a.cfg.NodeIPs, addrs) {
		a.log.Warn("--node-ip is ignored: with --vpn-auth the node IPs are the node's VPN addresses", "nodeIP", a.cfg.NodeIPs, "vpnAddresses", addrs)
	}
	a.cfg.NodeIPs = addrs
	a.vpn = &vpnCarrier{p: a.cfg.VPN, loginName: st.LoginName}
	a.log.Info("VPN up; its addresses are the node IPs", "vpn", a.cfg.VPN.Name(), "addresses", addrs, "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// setupVPN makes the node carry pod traffic over the VPN: it refuses a
// cluster CIDR that another VPN node already routes, sets up the pod bridge
// and CNI config, routes the cluster CIDRs to the VPN interface and
// advertises the node's pod CIDRs. It runs after every join.
func (a *Agent) setupVPN() error {
	if a.vpn == nil {
		return nil // --flannel-backend=none
	}
	ctx, cancel := context.WithTimeout(context.Background(), vpnSetupTimeout)
	defer cancel()
	p := a.vpn.p
	st, err := p.State(ctx)
	if err != nil {
		return fmt.Errorf("VPN %s: %w", p.Name(), err)
	}
	if clash := foreignRoutes(st, a.cidrs, a.members); len(clash) > 0 {
		return fmt.Errorf("VPN %s: %s, which overlaps this cluster's CIDR %s: another cluster (or another subnet router) uses the same range on this tailnet. Choose another --cluster-cidr for this cluster (on a new server), or stop that node advertising it",
			p.Name(), strings.Join(clash, "; "), joinPrefixList(a.cidrs))
	}

	link, err := linkOfAddrs(st.Addrs)
	if err != nil {
		return fmt.Errorf("VPN %s: %w", p.Name(), err)
	}
	var gateways []netip.Prefix
	v4, v6 := false, false
	for _, pc := range a.self.PodCIDRs {
		gateways = append(gateways, ipam.Gateway(pc))
		v4 = v4 || pc.Addr().Is4()
		v6 = v6 || pc.Addr().Is6()
	}
	mtu := link.Attrs().MTU
	if err := cni.EnableForwarding(v4, v6); err != nil {
		return err
	}
	if err := cni.EnsureBridge(a.cfg.Bridge, gateways, mtu); err != nil {
		return err
	}
	if err := cni.Write(cni.Config{
		Dir:         a.cfg.CNIConfDir,
		Bridge:      a.cfg.Bridge,
		PodCIDRs:    a.self.PodCIDRs,
		MTU:         mtu,
		IPAMDataDir: a.cfg.dir("cni-ipam"),
	}); err != nil {
		return err
	}

	saved, err := loadVPNState(a.cfg.dir(vpnStateFile))
	if err != nil {
		return err
	}
	// Pod traffic for the cluster goes into the VPN even for nodes whose
	// routes the VPN does not know (yet): it is dropped there instead of
	// leaving in clear through the default route.
	if err := routeToLink(link, a.cidrs); err != nil {
		return fmt.Errorf("route the cluster CIDRs to %s: %w", link.Attrs().Name, err)
	}
	ours, stale := planAdvertise(saved.Advertised, st.Advertised, a.self.PodCIDRs)
	next := vpnState{Provider: p.Name(), Advertised: append(slices.Clone(ours), stale...), KernelRoutes: mergePrefixes(saved.KernelRoutes, a.cidrs)}
	if err := saveVPNState(a.cfg.dir(vpnStateFile), next); err != nil { // before the change: a crash must not orphan a route
		return err
	}
	if len(stale) > 0 {
		if err := p.WithdrawRoutes(ctx, stale); err != nil {
			return fmt.Errorf("VPN %s: withdraw the node's old pod CIDRs %v: %w", p.Name(), stale, err)
		}
	}
	if _, err := p.AdvertiseRoutes(ctx, a.self.PodCIDRs); err != nil {
		return fmt.Errorf("VPN %s: advertise the pod CIDRs %v: %w", p.Name(), a.self.PodCIDRs, err)
	}
	next.Advertised = ours
	if err := saveVPNState(a.cfg.dir(vpnStateFile), next); err != nil {
		return err
	}

	v := a.vpn
	v.mu.Lock()
	if !slices.Equal(v.routes, a.self.PodCIDRs) || !v.approved {
		v.routes, v.since, v.next, v.approved, v.warned = slices.Clone(a.self.PodCIDRs), time.Now(), time.Time{}, false, false
	}
	v.cidrs = slices.Clone(a.cidrs)
	if st.LoginName != "" {
		v.loginName = st.LoginName
	}
	v.mu.Unlock()
	a.log.Info("pods routed over the VPN", "vpn", p.Name(), "interface", link.Attrs().Name, "mtu", mtu, "podCIDRs", a.self.PodCIDRs, "clusterCIDRs", a.cidrs)
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
func (a *Agent) vpnReport(ctx context.Context, now time.Time) *api.VPNStatus {
	v := a.vpn
	if v == nil {
		return nil
	}
	v.mu.Lock()
	due := len(v.routes) > 0 && !now.Before(v.next)
	if due {
		v.next = now.Add(vpnCheckPending)
		if v.approved {
			v.next = now.Add(vpnCheckSettled)
		}
	}
	v.mu.Unlock()
	if due {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		st, err := v.p.State(cctx)
		cancel()
		if err != nil {
			a.log.Debug("asking the VPN about the routes failed; will retry", "err", err)
		} else {
			a.vpnObserve(st, now)
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.status
}

// vpnObserve folds a VPN state into the carrier's status.
func (a *Agent) vpnObserve(st vpn.State, now time.Time) {
	v := a.vpn
	v.mu.Lock()
	defer v.mu.Unlock()
	if st.LoginName != "" {
		v.loginName = st.LoginName
	}
	approved := len(v.routes) > 0
	for _, r := range v.routes {
		approved = approved && slices.Contains(st.Approved, r)
	}
	s := &api.VPNStatus{Provider: v.p.Name(), Routes: slices.Clone(v.routes), RoutesApproved: approved}
	switch {
	case approved && !v.approved:
		a.log.Info("the VPN approved the pod CIDR routes; pods on other nodes can reach this node's pods", "routes", v.routes, "after", now.Sub(v.since).Round(100*time.Millisecond))
	case !approved && v.approved:
		a.log.Warn("the VPN no longer routes this node's pod CIDRs to it", "routes", v.routes, "approved", st.Approved)
	}
	if !approved && now.Sub(v.since) >= a.cfg.RouteApprovalTimeout {
		s.Warning = unapprovedWarning(v.routes, now.Sub(v.since), v.cidrs, v.loginName)
		if !v.warned {
			a.log.Warn(s.Warning)
			v.warned = true
		}
	}
	v.approved = approved
	v.status = s
}

func unapprovedWarning(routes []netip.Prefix, after time.Duration, cidrs []netip.Prefix, owner string) string {
	return fmt.Sprintf("the tailnet has not approved this node's pod CIDR routes %s after %v, so other nodes cannot reach its pods. "+
		"Approve them in the admin console (Machines, this node, Edit route settings), or let the control server approve every node's routes by adding to the tailnet policy file (headscale: its ACL policy):\n%s",
		joinPrefixList(routes), after.Round(time.Second), AutoApproversStanza(cidrs, owner))
}

// AutoApproversStanza is the tailnet policy stanza that approves routes
// inside the cluster CIDRs automatically, as the K3s documentation shows
// it. owner is the user or tag the nodes log in as; empty gives a
// placeholder.
func AutoApproversStanza(cidrs []netip.Prefix, owner string) string {
	if owner == "" {
		owner = "your_account@xyz.com"
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
func (a *Agent) vpnLeave() {
	if a.vpn == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), vpnSetupTimeout)
	defer cancel()
	if err := CleanupVPN(ctx, a.cfg.DataDir, a.vpn.p, a.log); err != nil {
		a.log.Error("withdrawing this node's routes from the VPN failed; run 'trellis cleanup' on the node", "err", err)
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
	if err := unrouteFromLinks(st.KernelRoutes); err != nil {
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

// linkOfAddrs returns the interface that holds one of addrs.
func linkOfAddrs(addrs []netip.Addr) (netlink.Link, error) {
	list, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list interface addresses: %w", err)
	}
	for _, la := range list {
		ip, ok := netip.AddrFromSlice(la.IP)
		if !ok || !slices.Contains(addrs, ip.Unmap()) {
			continue
		}
		return netlink.LinkByIndex(la.LinkIndex)
	}
	return nil, fmt.Errorf("no interface holds the VPN addresses %s; is the VPN running in TUN mode (not userspace networking)?", joinAddrList(addrs))
}

// routeToLink routes each prefix to link in the main table, marked as the
// agent's.
func routeToLink(link netlink.Link, prefixes []netip.Prefix) error {
	for _, p := range prefixes {
		r := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: netconv.IPNet(p.Masked()), Protocol: vpnRouteProto, Scope: netlink.SCOPE_LINK}
		if err := netlink.RouteReplace(r); err != nil {
			return fmt.Errorf("route %s to %s: %w", p, link.Attrs().Name, err)
		}
	}
	return nil
}

// unrouteFromLinks removes the agent's routes of prefixes, wherever they
// point.
func unrouteFromLinks(prefixes []netip.Prefix) error {
	for _, p := range prefixes {
		family := netlink.FAMILY_V4
		if p.Addr().Is6() {
			family = netlink.FAMILY_V6
		}
		routes, err := netlink.RouteListFiltered(family, &netlink.Route{Dst: netconv.IPNet(p.Masked()), Protocol: vpnRouteProto, Table: mainTable},
			netlink.RT_FILTER_DST|netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
		if err != nil {
			return err
		}
		for i := range routes {
			if err := netlink.RouteDel(&routes[i]); err != nil && !errors.Is(err, syscall.ESRCH) {
				return err
			}
		}
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
