package main

import (
	"fmt"
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
		if len(r.Changes) == 0 {
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
	return b.String()
}

// reconnects renders the reconnect storms (deltas runs only): every agent
// opens its stream again, as after a server restart, for the whole
// netmap and then resuming from it.
func reconnects(rs []*loadgen.Result) string {
	var b strings.Builder
	b.WriteString("\nReconnect storm: every agent opens its netmap stream again (64 at a time), as after a server restart; first for the whole netmap, then resuming from the netmap it holds (nothing changed):\n\n")
	b.WriteString("| N agents | whole: to all | bytes | server CPU | resumed: to all | bytes | server CPU | agents resumed | bytes whole / resumed |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range rs {
		w, s := r.ReconnectWhole, r.ReconnectResumed
		if w == nil || s == nil {
			continue
		}
		ratio := "—"
		if s.Bytes > 0 {
			ratio = fmt.Sprintf("%.0f×", float64(w.Bytes)/float64(s.Bytes))
		}
		fmt.Fprintf(&b, "| %d | %s | %s | %s | %s | %s | %s | %d of %d | %s |\n", r.Agents, dur(w.All), size(w.Bytes), dur(w.ServerCPU),
			dur(s.All), size(s.Bytes), dur(s.ServerCPU), s.Resumed, r.Agents, ratio)
	}
	return b.String()
}

func mode(r *loadgen.Result) string {
	if r.WholeMaps {
		return "whole netmaps"
	}
	return "deltas"
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
