package main

import (
	"crypto/tls"
	"fmt"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/loadgen"
)

// insecureTLS is for the liveness probe of the server only: nothing is
// sent on it and nothing read from it is trusted.
func insecureTLS() *tls.Config {
	return &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12} //nolint:gosec
}

// markdown renders results as the tables of docs/benchmarks.md.
func markdown(rs []*loadgen.Result) string {
	var b strings.Builder
	b.WriteString("| N agents | joins/s | join p50 / p99 | join retries (503) | first netmap to all | settle | fan-out p50 / p99 | fan-out to all (max) | server CPU per change | netmap bytes per change | one netmap | one peer entry | server RSS idle / peak | agent heap per peer |\n")
	b.WriteString("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range rs {
		if r.Joined < r.Agents {
			fmt.Fprintf(&b, "| %d | only %d joined in %s (%.1f/s); nothing further measured | | %d | | | | | | | | | | |\n",
				r.Agents, r.Joined, dur(r.JoinTime), float64(r.Joined)/r.JoinTime.Seconds(), r.JoinRetries)
			continue
		}
		fmt.Fprintf(&b, "| %d | %.0f | %s / %s | %d | %s | %s | %s / %s | %s | %s | %s | %s | %d B | %s / %s | %.0f B |\n",
			r.Agents, r.JoinsPerSec, dur(r.JoinP50), dur(r.JoinP99), r.JoinRetries, dur(r.StreamsTime), dur(r.SettleTime),
			dur(r.FanoutP50), dur(r.FanoutP99), dur(r.FanoutAllMax), dur(r.CPUPerChange),
			size(r.BytesPerChange), size(r.MapBytes), r.PeerBytes, size(r.ServerRSSIdle), size(r.ServerRSSPeak), r.AgentBytesPerPeer)
	}
	b.WriteString("\nPer change (fan-out to all agents, stream bytes, server CPU):\n\n")
	b.WriteString("| N agents | change | delivered | to all | p50 | p99 | bytes | server CPU | server RSS peak |\n")
	b.WriteString("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range rs {
		for i, c := range r.Changes {
			fmt.Fprintf(&b, "| %d | %d | %d | %s | %s | %s | %s | %s | %s |\n",
				r.Agents, i+1, c.Delivered, dur(c.All), dur(c.P50), dur(c.P99), size(c.StreamBytes), dur(c.ServerCPU), size(c.ServerPeakRSS))
		}
	}
	b.WriteString("\nIncremental updates, for comparison (computed, not measured): one changed peer is one peer entry per agent, N × entry bytes per change.\n\n")
	b.WriteString("| N agents | full maps per change (measured) | one peer entry × N | ratio |\n|---:|---:|---:|---:|\n")
	for _, r := range rs {
		inc := r.PeerBytes * int64(r.Agents)
		ratio := 0.0
		if inc > 0 {
			ratio = float64(r.BytesPerChange) / float64(inc)
		}
		fmt.Fprintf(&b, "| %d | %s | %s | %.0f× |\n", r.Agents, size(r.BytesPerChange), size(inc), ratio)
	}
	return b.String()
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
