//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// The nemesis: faults with inject and heal, a schedule drawn from a
// seeded generator, and a runner that injects and heals them on time,
// several at once.

// fault is one kind of trouble, aimed at one target.
type fault interface {
	// inject starts the trouble; it must not block for long.
	inject() error
	// heal ends it (a no-op for a fault that is over once injected).
	heal() error
}

// faultKind describes one kind of fault for the schedule.
type faultKind struct {
	name     string
	weight   int
	min, max time.Duration // how long it lasts; 0 for a fault over at once
	targets  []string      // what it may hit
	// server marks a kind that takes a server out of the etcd quorum
	// (killed, paused, cut off, full disk): one at a time, so that the
	// datastore keeps its majority.
	server bool
	make   func(target string) fault
	// scope names the nodes whose pod pairs a fault on target disturbs
	// (nil: every node).
	scope func(target string) []string
}

// plannedFault is one entry of the schedule.
type plannedFault struct {
	at     time.Duration // after the start of the chaos phase
	dur    time.Duration
	kind   string
	target string
}

func (p plannedFault) String() string {
	return fmt.Sprintf("%6.1fs %-10s %-8s for %4.1fs", p.at.Seconds(), p.kind, p.target, p.dur.Seconds())
}

// planFaults draws a schedule for a chaos phase of length d: faults
// start at random times (mean gap meanGap), last a random time of their
// kind, overlap (at most maxActive at once, never two on one target nor
// two on servers), and are all healed by d.
func planFaults(r *rand.Rand, d, meanGap time.Duration, maxActive int, kinds []faultKind) []plannedFault {
	total := 0
	for _, k := range kinds {
		total += k.weight
	}
	var plan []plannedFault
	at := 5 * time.Second
	for {
		at += time.Duration(r.ExpFloat64() * float64(meanGap))
		if at >= d {
			return plan
		}
		// Draw until a fault fits (or give this slot up).
		for try := 0; try < 10; try++ {
			w := r.IntN(total)
			var k faultKind
			for _, k = range kinds {
				if w < k.weight {
					break
				}
				w -= k.weight
			}
			target := k.targets[r.IntN(len(k.targets))]
			dur := k.min
			if k.max > k.min {
				dur += time.Duration(r.Int64N(int64(k.max - k.min)))
			}
			if at+dur > d {
				dur = d - at
				if dur < k.min {
					continue
				}
			}
			// An instant fault holds its target for a while, so that it
			// is not hit again before it settles.
			hold := max(dur, 10*time.Second)
			active, clash := 0, false
			for _, p := range plan {
				pk := kindByName(kinds, p.kind)
				pHold := max(p.dur, 10*time.Second)
				if p.at+pHold <= at || at+hold <= p.at {
					continue
				}
				active++
				if p.target == target || (pk.server && k.server) {
					clash = true
				}
			}
			if clash || active >= maxActive {
				continue
			}
			plan = append(plan, plannedFault{at: at, dur: dur, kind: k.name, target: target})
			break
		}
	}
}

func kindByName(kinds []faultKind, name string) faultKind {
	for _, k := range kinds {
		if k.name == name {
			return k
		}
	}
	return faultKind{}
}

// faultRecord is what happened to one planned fault.
type faultRecord struct {
	plannedFault
	injected, healed time.Time
	err              error  // injecting or healing failed
	note             string // something the heal noticed (a process that died)
}

// runFaults injects and heals every fault of plan relative to start, and
// returns when all are healed. A cancelled ctx heals the active faults at
// once and injects no more.
func runFaults(ctx context.Context, start time.Time, plan []plannedFault, kinds []faultKind, logf func(string, ...any)) []*faultRecord {
	recs := make([]*faultRecord, len(plan))
	var wg sync.WaitGroup
	for i, p := range plan {
		rec := &faultRecord{plannedFault: p}
		recs[i] = rec
		wg.Go(func() {
			if !sleepUntil(ctx, start.Add(p.at)) {
				return
			}
			f := kindByName(kinds, p.kind).make(p.target)
			rec.injected = time.Now()
			if err := f.inject(); err != nil {
				rec.err = fmt.Errorf("inject %s on %s: %w", p.kind, p.target, err)
				logf("chaos: %v", rec.err)
			} else {
				logf("chaos: +%.1fs injected %s on %s for %.1fs", time.Since(start).Seconds(), p.kind, p.target, p.dur.Seconds())
			}
			sleepUntil(ctx, start.Add(p.at+p.dur))
			err := f.heal()
			rec.healed = time.Now()
			if n, ok := f.(interface{ noted() string }); ok {
				rec.note = n.noted()
			}
			if err != nil && rec.err == nil {
				rec.err = fmt.Errorf("heal %s on %s: %w", p.kind, p.target, err)
				logf("chaos: %v", rec.err)
			} else {
				logf("chaos: +%.1fs healed %s on %s %s", time.Since(start).Seconds(), p.kind, p.target, rec.note)
			}
		})
	}
	wg.Wait()
	return recs
}

// sleepUntil sleeps until t and reports whether ctx is still live.
func sleepUntil(ctx context.Context, t time.Time) bool {
	d := time.Until(t)
	if d <= 0 {
		return ctx.Err() == nil
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-timer.C:
		return true
	}
}

// funcFault is a fault made of two functions.
type funcFault struct {
	in, out func() error
	note    string
}

func (f *funcFault) inject() error { return f.in() }
func (f *funcFault) heal() error {
	if f.out == nil {
		return nil
	}
	return f.out()
}
func (f *funcFault) noted() string { return f.note }

// killFault kills m's process with SIGKILL and starts it again at heal.
func killFault(m *member) fault {
	return &funcFault{
		in:  func() error { m.proc.Kill(); return nil },
		out: func() error { return m.proc.Start() },
	}
}

// pauseFault stops m's process with SIGSTOP and continues it at heal.
func pauseFault(m *member) fault {
	var pid int
	return &funcFault{
		in: func() error {
			if !m.proc.Running() {
				return fmt.Errorf("%s is not running", m.proc.Name)
			}
			pid = m.proc.Pid()
			return syscall.Kill(pid, syscall.SIGSTOP)
		},
		out: func() error {
			if pid == 0 {
				return nil
			}
			return syscall.Kill(pid, syscall.SIGCONT)
		},
	}
}

// nftFault loads an nftables table (named in script) into namespace ns,
// and deletes it at heal.
func nftFault(l *Lab, ns, table, script string) fault {
	return &funcFault{
		in:  func() error { return nftIn(ns, script) },
		out: func() error { _, err := l.Exec(ns, "nft", "delete", "table", "inet", table); return err },
	}
}

// partitionScript cuts the namespace it is loaded in off from addrs.
func partitionScript(table string, addrs []netip.Addr) string {
	var set []string
	for _, a := range addrs {
		set = append(set, a.String())
	}
	s := strings.Join(set, ", ")
	return fmt.Sprintf(`add table inet %[1]s
add chain inet %[1]s chaos_in { type filter hook input priority -10; policy accept; }
add chain inet %[1]s chaos_out { type filter hook output priority -10; policy accept; }
add rule inet %[1]s chaos_in ip saddr { %[2]s } drop
add rule inet %[1]s chaos_out ip daddr { %[2]s } drop
`, table, s)
}

// cutScript makes a router drop what it forwards to or from subnet p.
func cutScript(table string, p netip.Prefix) string {
	return fmt.Sprintf(`add table inet %[1]s
add chain inet %[1]s chaos_fw { type filter hook forward priority -10; policy accept; }
add rule inet %[1]s chaos_fw ip saddr %[2]s drop
add rule inet %[1]s chaos_fw ip daddr %[2]s drop
`, table, p)
}

// lossScript makes a router drop pct percent of what it forwards, at
// random.
func lossScript(table string, pct int) string {
	return fmt.Sprintf(`add table inet %[1]s
add chain inet %[1]s chaos_fw { type filter hook forward priority -10; policy accept; }
add rule inet %[1]s chaos_fw numgen random mod 100 < %[2]d drop
`, table, pct)
}

// bwFault caps what the router sends out of ports at rate (tc tbf).
func bwFault(l *Lab, ns string, ports []string, rate string) fault {
	return &funcFault{
		in: func() error {
			for _, p := range ports {
				if _, err := l.Exec(ns, "tc", "qdisc", "replace", "dev", p, "root", "tbf", "rate", rate, "burst", "16kb", "latency", "300ms"); err != nil {
					return err
				}
			}
			return nil
		},
		out: func() error {
			var errs []string
			for _, p := range ports {
				if _, err := l.Exec(ns, "tc", "qdisc", "del", "dev", p, "root"); err != nil {
					errs = append(errs, err.Error())
				}
			}
			if len(errs) > 0 {
				return fmt.Errorf("%s", strings.Join(errs, "; "))
			}
			return nil
		},
	}
}

// homeNAT is a home's NAT router, whose public address moves between two.
type homeNAT struct {
	ns      string
	addrs   [2]netip.Prefix
	gateway netip.Addr
	mu      sync.Mutex
	current int
	changes int
}

// newIPFault gives the home's NAT router its other public address and
// flushes its connection tracking (every NAT mapping), as an ISP's new
// lease does.
func (h *homeNAT) newIPFault(l *Lab) fault {
	return &funcFault{in: func() error {
		h.mu.Lock()
		defer h.mu.Unlock()
		old, next := h.addrs[h.current], h.addrs[1-h.current]
		steps := [][]string{
			// Deleting the old (primary) address first: deleting it
			// after adding the new one would take the new one along.
			{"ip", "addr", "del", old.String(), "dev", "eth0"},
			{"ip", "addr", "add", next.String(), "dev", "eth0"},
			{"ip", "route", "replace", "default", "via", h.gateway.String()},
			{"conntrack", "-F"},
		}
		for _, s := range steps {
			if _, err := l.Exec(h.ns, s...); err != nil {
				return err
			}
		}
		h.current = 1 - h.current
		h.changes++
		return nil
	}}
}

// movingNode is a node whose public address moves between two: its fault
// moves the address on eth0, writes it as node-external-ip to the node's
// config file and sends SIGHUP, as an operator does after a provider
// moved the address.
type movingNode struct {
	m       *member
	config  string
	addrs   [2]netip.Prefix
	gateway netip.Addr
	mu      sync.Mutex
	current int
}

func (n *movingNode) writeConfig() error {
	return os.WriteFile(n.config, []byte(fmt.Sprintf("node-external-ip: %s\n", n.addrs[n.current].Addr())), 0o600)
}

// externalIP is the node's public address now.
func (n *movingNode) externalIP() netip.Addr {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.addrs[n.current].Addr()
}

func (n *movingNode) fault() fault {
	return &funcFault{in: func() error {
		n.mu.Lock()
		defer n.mu.Unlock()
		if !n.m.proc.Running() {
			return fmt.Errorf("%s is not running", n.m.proc.Name)
		}
		old, next := n.addrs[n.current], n.addrs[1-n.current]
		for _, s := range [][]string{
			// Deleting the old (primary) address first: deleting it
			// after adding the new one would take the new one along.
			{"ip", "addr", "del", old.String(), "dev", "eth0"},
			{"ip", "addr", "add", next.String(), "dev", "eth0"},
			{"ip", "route", "replace", "default", "via", n.gateway.String()},
		} {
			if _, err := n.m.Exec(s...); err != nil {
				return err
			}
		}
		n.current = 1 - n.current
		if err := n.writeConfig(); err != nil {
			return err
		}
		return syscall.Kill(n.m.proc.Pid(), syscall.SIGHUP)
	}}
}

// diskFault fills the tmpfs that holds m's data directory and empties it
// again at heal. A server that exited meanwhile is started again, as its
// service manager would, and the heal notes it.
func diskFault(m *member) fault {
	fill := filepath.Join(m.dataDir, "chaos-fill")
	f := &funcFault{}
	f.in = func() error {
		var st syscall.Statfs_t
		if err := syscall.Statfs(m.dataDir, &st); err != nil {
			return fmt.Errorf("statfs %s: %w", m.dataDir, err)
		}
		free := int64(st.Bavail) * st.Bsize
		if _, err := run("fallocate", "-l", fmt.Sprint(free), fill); err != nil {
			return err
		}
		return nil
	}
	f.out = func() error {
		if err := os.Remove(fill); err != nil && !os.IsNotExist(err) {
			return err
		}
		if !m.proc.Running() {
			lines, _ := m.proc.LogLinesSince(max(0, m.proc.LogSize()-4096))
			f.note = fmt.Sprintf("(%s had exited; started again; its last line: %q)", m.Name, lastOf(lines))
			return m.proc.Start()
		}
		return nil
	}
	return f
}

func lastOf(lines []string) string {
	lines = slices.DeleteFunc(lines, func(s string) bool { return strings.TrimSpace(s) == "" })
	if len(lines) == 0 {
		return ""
	}
	return lines[len(lines)-1]
}
