package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/vpn"
)

// fakeVPN is a vpn.Provider whose control server approves what it is told.
type fakeVPN struct {
	mu         sync.Mutex
	advertised []netip.Prefix
	approve    bool       // approve advertised routes at once
	peers      []vpn.Peer // other nodes of the VPN
	calls      int
}

func (f *fakeVPN) Name() string { return "fake" }

func (f *fakeVPN) Up(ctx context.Context) (vpn.State, error) { return f.State(ctx) }

func (f *fakeVPN) State(context.Context) (vpn.State, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	st := vpn.State{Running: true, Addrs: []netip.Addr{netip.MustParseAddr("100.64.0.5")}, LoginName: "ops@example.com", Advertised: slices.Clone(f.advertised), Peers: f.peers}
	if f.approve {
		st.Approved = slices.Clone(f.advertised)
	}
	return st, nil
}

func (f *fakeVPN) AdvertiseRoutes(_ context.Context, routes []netip.Prefix) ([]netip.Prefix, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var added []netip.Prefix
	for _, r := range routes {
		if !slices.Contains(f.advertised, r) {
			f.advertised = append(f.advertised, r)
			added = append(added, r)
		}
	}
	return added, nil
}

func (f *fakeVPN) WithdrawRoutes(_ context.Context, routes []netip.Prefix) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.advertised = slices.DeleteFunc(f.advertised, func(r netip.Prefix) bool { return slices.Contains(routes, r) })
	return nil
}

func TestLoopVPNCarrier(t *testing.T) {
	p := &fakeVPN{approve: true}
	n := startNode(t, withVPN(p))
	n.src.netmaps <- netmapOf(1, "10.42.0.0/24")
	n.waitFor("pods routed over the VPN", func() error {
		if got := n.host.VPNRoutes(); got[cluster] != "tailscale0" {
			return fmt.Errorf("VPN routes %v", got)
		}
		if b, ok := n.host.Bridge("cni0"); !ok || b.MTU != 1280 || !slices.Equal(b.Gateways, pfxs("10.42.0.1/24")) {
			return fmt.Errorf("bridge %+v", b)
		}
		if _, ok := n.host.File(n.conflistPath()); !ok {
			return errors.New("no CNI config")
		}
		p.mu.Lock()
		defer p.mu.Unlock()
		if !slices.Equal(p.advertised, pfxs("10.42.0.0/24")) {
			return fmt.Errorf("advertised %v", p.advertised)
		}
		return nil
	})
	n.waitFor("the approval reported", func() error {
		r := n.src.lastReport()
		if r.VPN == nil || !r.VPN.RoutesApproved {
			return fmt.Errorf("VPN status %+v", r.VPN)
		}
		return nil
	})
	st, err := loadVPNState(n.cfg.dir(vpnStateFile))
	if err != nil || !slices.Equal(st.Advertised, pfxs("10.42.0.0/24")) || !slices.Equal(st.KernelRoutes, []netip.Prefix{cluster}) {
		t.Errorf("VPN record %+v, %v", st, err)
	}
	// Settled: the VPN is asked about approval now and then, not about
	// advertising on every pass.
	p.mu.Lock()
	before := p.calls
	p.mu.Unlock()
	time.Sleep(200 * time.Millisecond)
	p.mu.Lock()
	after := p.calls
	p.mu.Unlock()
	if after-before > 1 {
		t.Errorf("%d VPN calls in 200 ms while settled", after-before)
	}
	if got := n.a.status(time.Now()); got.DataPlane != "vpn:fake" || got.MTU != 1280 {
		t.Errorf("status %+v", got)
	}
}

// TestLoopVPNClash stops the node when another VPN node routes the
// cluster's CIDR: the operator must choose another one.
func TestLoopVPNClash(t *testing.T) {
	p := &fakeVPN{peers: []vpn.Peer{{Name: "other-cluster", Addrs: []netip.Addr{netip.MustParseAddr("100.64.0.9")}, Routes: pfxs("10.42.7.0/24")}}}
	n := startNode(t, withVPN(p))
	n.src.netmaps <- netmapOf(1, "10.42.0.0/24")
	select {
	case err := <-n.done:
		n.done <- nil // for the clean-up
		if err == nil || !strings.Contains(err.Error(), `"other-cluster"`) || !strings.Contains(err.Error(), "--cluster-cidr") {
			t.Fatalf("run ended with %v, want the clash named", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the node did not stop for a clash")
	}
}
