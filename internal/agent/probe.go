package agent

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/ipam"
	"github.com/trellis-mesh/trellis/internal/probe"
)

// probeTimeout bounds a whole probe request.
const probeTimeout = 20 * time.Second

// handleProbe pings the requested addresses of other nodes from inside this
// node (api.PathProbe) and answers an api.ProbeReport.
func (a *Agent) handleProbe(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	targets := q["target"]
	if len(targets) == 0 || len(targets) > api.MaxProbeTargets {
		http.Error(w, fmt.Sprintf("give 1-%d target=ADDR parameters", api.MaxProbeTargets), http.StatusBadRequest)
		return
	}
	count := probe.DefaultCount
	if s := q.Get("count"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > api.MaxProbeCount {
			http.Error(w, fmt.Sprintf("count=%q: give 1-%d", s, api.MaxProbeCount), http.StatusBadRequest)
			return
		}
		count = n
	}
	mtu := a.tunnelMTU()
	size := mtu
	if s := q.Get("size"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 || n > 65535 {
			http.Error(w, fmt.Sprintf("size=%q: give 0 (no large probe) to 65535", s), http.StatusBadRequest)
			return
		}
		size = n
	}
	var addrs []netip.Addr
	cidrs := a.clusterCIDRs()
	for _, t := range targets {
		ad, err := netip.ParseAddr(t)
		if err != nil || !slices.ContainsFunc(cidrs, func(p netip.Prefix) bool { return p.Contains(ad.Unmap()) }) {
			http.Error(w, fmt.Sprintf("target %q is not an address in the cluster CIDRs %s", t, joinPrefixList(cidrs)), http.StatusBadRequest)
			return
		}
		addrs = append(addrs, ad.Unmap())
	}
	ctx, cancel := context.WithTimeout(r.Context(), probeTimeout)
	defer cancel()
	rep := api.ProbeReport{Node: a.cfg.NodeName, MTU: mtu, Results: make([]api.ProbeResult, len(addrs))}
	var wg sync.WaitGroup
	for i, dst := range addrs {
		wg.Go(func() {
			res, err := probe.Ping(ctx, dst, probe.Options{Count: count, LargeSize: size, Source: a.probeSource(dst)})
			pr := api.ProbeResult{Target: dst, Sent: res.Sent, Received: res.Received, RTT: res.RTT, LargeSize: res.LargeSize, LargeOK: res.LargeOK}
			if err != nil {
				pr.Error = err.Error()
			}
			rep.Results[i] = pr
		})
	}
	wg.Wait()
	writeStatusJSON(w, rep)
}

// clusterCIDRs returns the cluster CIDRs of the last netmap.
func (a *Agent) clusterCIDRs() []netip.Prefix {
	return slices.Clone(a.loop.snapshot().clusterCIDRs)
}

// tunnelMTU is the MTU of the node's cluster traffic: the WireGuard
// interface's, or the VPN interface's; 0 if unknown.
func (a *Agent) tunnelMTU() int {
	if a.dev != nil {
		return a.dev.MTU()
	}
	return a.loop.snapshot().vpnMTU
}

// probeSource is the address probes of dst leave from: the node's tunnel
// address of dst's family (WireGuard), or its pod bridge address (VPN),
// so that the reply comes back through the mesh.
func (a *Agent) probeSource(dst netip.Addr) netip.Addr {
	for _, p := range a.loop.snapshot().self.PodCIDRs {
		if p.Addr().Is4() != dst.Is4() {
			continue
		}
		if a.dev != nil {
			return ipam.TunnelAddr(p).Addr()
		}
		return ipam.Gateway(p).Addr()
	}
	return netip.Addr{}
}
