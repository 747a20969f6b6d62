package main

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/loadgen"
)

// markdown renders results as the tables of docs/benchmarks.md.
func markdown(rs []*loadgen.Result) string {
	var b strings.Builder
	b.WriteString("| N agents | streams | joins/s | join p50 / p99 | join retries (503) | first netmap to all | settle | fan-out p50 / p99 | fan-out to all (max) | server CPU per change | netmap bytes per change | one netmap | one peer entry | server RSS idle / peak in changes / max | agent heap per peer |\n")
	b.WriteString("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range rs {
		if r.Joined < r.Agents {
			fmt.Fprintf(&b, "| %d | %s | only %d joined in %s (%.1f/s); nothing further measured | | %d | | | | | | | | | | |\n",
				r.Agents, mode(r), r.Joined, dur(r.JoinTime), float64(r.Joined)/r.JoinTime.Seconds(), r.JoinRetries)
			continue
		}
		fmt.Fprintf(&b, "| %d | %s | %.0f | %s / %s | %d | %s | %s | %s / %s | %s | %s | %s | %s | %d B | %s / %s / %s | %.0f B |\n",
			r.Agents, mode(r), r.JoinsPerSec, dur(r.JoinP50), dur(r.JoinP99), r.JoinRetries, dur(r.StreamsTime), dur(r.SettleTime),
			dur(r.FanoutP50), dur(r.FanoutP99), dur(r.FanoutAllMax), dur(r.CPUPerChange),
			size(r.BytesPerChange), size(r.MapBytes), r.PeerBytes, size(r.ServerRSSIdle), size(r.ServerRSSPeak), size(r.ServerRSSMax), r.AgentBytesPerPeer)
	}
	b.WriteString("\nPer change (fan-out to all agents, stream bytes, server CPU):\n\n")
	b.WriteString("| N agents | streams | change | delivered | to all | p50 | p99 | bytes | server CPU | server RSS peak |\n")
	b.WriteString("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range rs {
		for i, c := range r.Changes {
			fmt.Fprintf(&b, "| %d | %s | %d | %d | %s | %s | %s | %s | %s | %s |\n",
				r.Agents, mode(r), i+1, c.Delivered, dur(c.All), dur(c.P50), dur(c.P99), size(c.StreamBytes), dur(c.ServerCPU), size(c.ServerPeakRSS))
		}
	}
	b.WriteString("\nBytes and server CPU per change, whole netmaps against deltas (both measured; one peer entry × N is the least a change of one peer can cost):\n\n")
	b.WriteString("| N agents | whole netmaps | deltas | one peer entry × N | whole / deltas | CPU whole | CPU deltas |\n|---:|---:|---:|---:|---:|---:|---:|\n")
	byN := map[int][2]*loadgen.Result{}
	var ns []int
	for _, r := range rs {
		if len(r.Changes) == 0 || r.Kube {
			continue
		}
		pair, seen := byN[r.Agents]
		if !seen {
			ns = append(ns, r.Agents)
		}
		if r.WholeMaps {
			pair[0] = r
		} else {
			pair[1] = r
		}
		byN[r.Agents] = pair
	}
	for _, n := range ns {
		whole, deltas := byN[n][0], byN[n][1]
		cell := func(r *loadgen.Result, f func(*loadgen.Result) string) string {
			if r == nil {
				return "not run"
			}
			return f(r)
		}
		bytesOf := func(r *loadgen.Result) string { return size(r.BytesPerChange) }
		cpuOf := func(r *loadgen.Result) string { return dur(r.CPUPerChange) }
		ratio := "—"
		if whole != nil && deltas != nil && deltas.BytesPerChange > 0 {
			ratio = fmt.Sprintf("%.0f×", float64(whole.BytesPerChange)/float64(deltas.BytesPerChange))
		}
		var entry int64
		for _, r := range byN[n] {
			if r != nil && r.PeerBytes > 0 {
				entry = r.PeerBytes * int64(n)
			}
		}
		fmt.Fprintf(&b, "| %d | %s | %s | %s | %s | %s | %s |\n", n, cell(whole, bytesOf), cell(deltas, bytesOf), size(entry), ratio, cell(whole, cpuOf), cell(deltas, cpuOf))
	}
	b.WriteString(reconnects(rs))
	b.WriteString(kubernetes(rs))
	return b.String()
}

// reconnects renders the reconnect storms (deltas runs only): every agent
// opens its stream again, as after a server restart, for the whole
// netmap and then resuming from it.
func reconnects(rs []*loadgen.Result) string {
	var b strings.Builder
	b.WriteString("\nReconnect storm: every agent opens its netmap stream again (64 at a time), as after a server restart; first for the whole netmap, then resuming from the netmap it holds (nothing changed):\n\n")
	b.WriteString("| N agents | streams | whole: to all | bytes | server CPU | resumed: to all | bytes | server CPU | agents resumed | bytes whole / resumed |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range rs {
		w, s := r.ReconnectWhole, r.ReconnectResumed
		if w == nil || s == nil {
			continue
		}
		ratio := "—"
		if s.Bytes > 0 {
			ratio = fmt.Sprintf("%.0f×", float64(w.Bytes)/float64(s.Bytes))
		}
		fmt.Fprintf(&b, "| %d | %s | %s | %s | %s | %s | %s | %s | %d of %d | %s |\n", r.Agents, mode(r), dur(w.All), size(w.Bytes), dur(w.ServerCPU),
			dur(s.All), size(s.Bytes), dur(s.ServerCPU), s.Resumed, r.Agents-len(r.NodeDeletes), ratio)
	}
	return b.String()
}

func mode(r *loadgen.Result) string {
	switch {
	case r.WholeMaps:
		return "whole netmaps"
	case r.Kube:
		return "deltas, Kubernetes"
	}
	return "deltas"
}

// kubernetes renders the runs in Kubernetes mode: the Nodes, their pod
// CIDRs in the netmaps, the annotations, Node deletions, and the figures
// against a run of as many agents without Kubernetes, if there was one.
func kubernetes(rs []*loadgen.Result) string {
	var b strings.Builder
	plain := map[int]*loadgen.Result{}
	for _, r := range rs {
		if !r.Kube && !r.WholeMaps && len(r.Changes) > 0 {
			plain[r.Agents] = r
		}
	}
	for _, r := range rs {
		if !r.Kube {
			continue
		}
		if b.Len() == 0 {
			b.WriteString("\nKubernetes mode: a Node per agent created through the API (pod CIDR set, as node IPAM leaves it), the server following them; then Node deletions (`kubectl delete node`), each until every other agent's netmap dropped the node:\n\n")
			b.WriteString("| N agents | create N Nodes | pod CIDRs in every netmap | annotations on every Node (after the joins) | Node deletion p50 / p99 | deletion to all (max) | fan-out p99 / without Kubernetes | server RSS max / without Kubernetes |\n")
			b.WriteString("|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		}
		var p50s []time.Duration
		var all time.Duration
		for _, c := range r.NodeDeletes {
			p50s = append(p50s, c.P50)
			all = max(all, c.All)
		}
		p99Ratio, rssRatio := "no run without Kubernetes", "—"
		if p := plain[r.Agents]; p != nil && p.FanoutP99 > 0 && p.ServerRSSMax > 0 {
			p99Ratio = fmt.Sprintf("%s / %s = %.2f×", dur(r.FanoutP99), dur(p.FanoutP99), float64(r.FanoutP99)/float64(p.FanoutP99))
			rssRatio = fmt.Sprintf("%s / %s = %.2f×", size(r.ServerRSSMax), size(p.ServerRSSMax), float64(r.ServerRSSMax)/float64(p.ServerRSSMax))
		}
		fmt.Fprintf(&b, "| %d | %s | %s | %s | %s / %s | %s | %s | %s |\n", r.Agents, dur(r.NodesTime), dur(r.PodCIDRsTime), dur(r.AnnotatedTime),
			dur(median(p50s)), dur(r.NodeDeleteP99), dur(all), p99Ratio, rssRatio)
	}
	return b.String()
}

// median returns the middle of ds (the upper one of an even count).
func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

func dur(d time.Duration) string {
	switch {
	case d == 0:
		return "0"
	case d < time.Millisecond:
		return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
	case d < time.Second:
		return fmt.Sprintf("%.0f ms", float64(d)/float64(time.Millisecond))
	}
	return fmt.Sprintf("%.2f s", d.Seconds())
}

func size(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
