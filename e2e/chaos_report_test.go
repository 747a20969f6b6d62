//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
)

// The chaos suite's invariant checks and its report.

// invariants are the properties the suite checks, in report order.
var invariants = []string{
	"reachability", "cidr-overlap", "oracle", "stale-peer",
	"deleted-or-revoked-back", "resources", "secrets", "plaintext", "clock",
}

type chaosReport struct {
	seed          uint64
	duration      time.Duration
	gap           time.Duration // mean time between faults
	recs          []*faultRecord
	writer        *writer
	violations    []string
	perInvariant  map[string]int
	finalRecovery time.Duration
	recovery      map[string][]time.Duration
	overlapped    map[string]int
	unrecovered   map[string]int
	probesOK      int
	probesFailed  int
	listings      int
	listingErrs   int
	maxStale      time.Duration // longest a server under a fault listed a deleted node
	growth        []string
	slow          []string // faults whose recovery took long, and the pair that was last
}

// violation records a broken invariant.
func (r *chaosReport) violation(invariant, detail string) {
	if r.perInvariant == nil {
		r.perInvariant = map[string]int{}
	}
	r.perInvariant[invariant]++
	r.violations = append(r.violations, invariant+": "+detail)
}

// recoveries measures, for each healed fault, the time from its heal
// until every pod pair from or to a node in its scope (the node it hit,
// the nodes of the cloud it cut, every node for loss on the internet)
// answered again for chaosStable. A fault that healed while another fault
// was active, or that another fault followed before its pairs were whole,
// is counted as overlapped: its time is not its own (any two faults share
// pairs: those between the nodes they hit).
func (r *chaosReport) recoveries(tl *meshTimeline, kinds []faultKind, nodes []string) {
	r.recovery, r.overlapped, r.unrecovered = map[string][]time.Duration{}, map[string]int{}, map[string]int{}
	if tl == nil {
		return
	}
	scope := func(rec *faultRecord) []string {
		if k := kindByName(kinds, rec.kind); k.scope != nil {
			return k.scope(rec.target)
		}
		return nodes
	}
	for _, rec := range r.recs {
		if rec.injected.IsZero() || rec.healed.IsZero() || rec.err != nil {
			continue
		}
		sc := scope(rec)
		whole, ok, _ := tl.scoped(sc, nodes).wholeAfter(rec.healed, chaosStable)
		if !ok {
			r.unrecovered[rec.kind]++
			continue
		}
		overlapped := false
		for _, o := range r.recs {
			if o == rec || o.injected.IsZero() {
				continue
			}
			// An instant fault counts as active for chaosStable.
			oEnd := o.healed
			if oEnd.Before(o.injected.Add(chaosStable)) {
				oEnd = o.injected.Add(chaosStable)
			}
			if (!o.injected.After(rec.healed) && oEnd.After(rec.healed)) || (o.injected.After(rec.healed) && o.injected.Before(whole)) {
				overlapped = true
			}
		}
		if overlapped {
			r.overlapped[rec.kind]++
			continue
		}
		d := whole.Sub(rec.healed)
		r.recovery[rec.kind] = append(r.recovery[rec.kind], d)
		if d > 10*time.Second {
			r.slow = append(r.slow, fmt.Sprintf("- %s: whole %s after the heal; last up: %v", rec.plannedFault, secs(d), tl.upAt(whole)))
		}
	}
}

// percentile returns the p-th percentile (nearest rank) of ds.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(float64(len(s))*p/100+0.999999) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func secs(d time.Duration) string { return fmt.Sprintf("%.1fs", d.Seconds()) }

// markdown is the report.
func (r *chaosReport) markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "# Chaos run: seed %d, %v of faults\n\n", r.seed, r.duration)
	fmt.Fprintf(&b, "Run at %s. Replay: `TRELLIS_CHAOS_SEED=%d TRELLIS_CHAOS_DURATION=%v TRELLIS_CHAOS_GAP=%v go test -tags e2e -run 'TestChaos$' -timeout 0 -v ./e2e/`.\n\n",
		time.Now().UTC().Format("2006-01-02 15:04 UTC"), r.seed, r.duration, r.gap)
	fmt.Fprintf(&b, "Cluster: 3 servers (embedded etcd, one cloud), agents in an AWS-style 1:1 NAT cloud and in a second cloud (relay, public IP moved with SIGHUP), two homes behind NAT (one symmetric), a pod on each of the 7 nodes probing every other pod over TCP and UDP every %v.\n\n", chaosProbeInterval)
	fmt.Fprintf(&b, "Recovery = time from a fault's heal until every pod pair from or to a node in its scope (the node it hit; the nodes of the cloud it cut or capped; every node for loss on the internet) answered again over TCP and UDP for %v. A fault that healed while another fault was active, or that another fault followed before its pairs were whole, is counted as overlapped and has no time of its own (any two faults share pairs: those between the nodes they hit).\n\n", chaosStable)
	b.WriteString("| fault | injected | recovered alone | overlapped | not recovered | p50 | p99 | max |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
	injected := map[string]int{}
	var kinds []string
	for _, rec := range r.recs {
		if rec.injected.IsZero() {
			continue
		}
		if injected[rec.kind] == 0 {
			kinds = append(kinds, rec.kind)
		}
		injected[rec.kind]++
	}
	slices.Sort(kinds)
	total := 0
	for _, k := range kinds {
		ds := r.recovery[k]
		total += injected[k]
		fmt.Fprintf(&b, "| %s | %d | %d | %d | %d | %s | %s | %s |\n", k, injected[k], len(ds), r.overlapped[k], r.unrecovered[k],
			secs(percentile(ds, 50)), secs(percentile(ds, 99)), secs(percentile(ds, 100)))
	}
	fmt.Fprintf(&b, "| **all** | %d | | | | | | |\n\n", total)
	if r.finalRecovery >= 0 {
		fmt.Fprintf(&b, "Every pod pair up again %s after the last heal (bound %v).\n", secs(r.finalRecovery), chaosRecoveryBound)
	} else {
		fmt.Fprintf(&b, "**The mesh was not whole within %v of the last heal.**\n", chaosRecoveryBound)
	}
	if r.maxStale > 0 {
		fmt.Fprintf(&b, "A server cut off or paused listed a deleted node up to %s after the delete was acknowledged (allowed until %v after its fault healed).\n", secs(r.maxStale), chaosCatchUp)
	}
	fmt.Fprintf(&b, "Probes: %d answered, %d not (during faults); node listings checked: %d (%d requests failed during faults).\n\n", r.probesOK, r.probesFailed, r.listings, r.listingErrs)

	b.WriteString("| invariant | violations |\n|---|---:|\n")
	for _, inv := range invariants {
		fmt.Fprintf(&b, "| %s | %d |\n", inv, r.perInvariant[inv])
	}
	b.WriteString("\n")

	r.writer.mu.Lock()
	var ops []string
	for op := range r.writer.ops {
		ops = append(ops, op)
	}
	slices.Sort(ops)
	b.WriteString("| operator action | acknowledged | failed (refused or undecided) | skipped |\n|---|---:|---:|---:|\n")
	for _, op := range ops {
		c := r.writer.ops[op]
		fmt.Fprintf(&b, "| %s | %d | %d | %d |\n", op, c[0], c[1], c[2])
	}
	r.writer.mu.Unlock()
	b.WriteString("\n")

	if len(r.growth) > 0 {
		b.WriteString("| process | first → last RSS | first → last goroutines | max goroutines | run |\n|---|---:|---:|---:|---:|\n")
		for _, g := range r.growth {
			b.WriteString(g + "\n")
		}
		b.WriteString("\n")
	}
	var notes []string
	for _, rec := range r.recs {
		if rec.note != "" || rec.err != nil {
			notes = append(notes, fmt.Sprintf("- %s: %s %v", rec.plannedFault, rec.note, rec.err))
		}
	}
	if len(notes) > 0 {
		b.WriteString("Notes from the nemesis:\n\n" + strings.Join(notes, "\n") + "\n\n")
	}
	if len(r.slow) > 0 {
		b.WriteString("Slow recoveries (over 10 s) and the pairs that came up last:\n\n" + strings.Join(r.slow, "\n") + "\n\n")
	}
	if len(r.violations) > 0 {
		b.WriteString("Violations:\n\n")
		for _, v := range r.violations {
			b.WriteString("- " + v + "\n")
		}
		b.WriteString("\n")
	}
	r.writer.mu.Lock()
	b.WriteString("<details><summary>Operator actions</summary>\n\n```\n" + strings.Join(r.writer.history, "\n") + "\n```\n</details>\n\n")
	r.writer.mu.Unlock()
	b.WriteString("<details><summary>Schedule</summary>\n\n```\n")
	for _, rec := range r.recs {
		fmt.Fprintln(&b, rec.plannedFault)
	}
	b.WriteString("```\n</details>\n")
	return b.String()
}

// checkOracle compares what every server lists at the end with what the
// API acknowledged.
func checkOracle(rep *chaosReport, w *writer, baseline map[string]api.Node, final map[string]map[string]api.Node, servers []*member) {
	w.mu.Lock()
	defer w.mu.Unlock()
	joins := map[string]*joinRec{}
	for _, j := range w.joins {
		joins[j.name] = j
	}
	for _, s := range servers {
		nodes, ok := final[s.Name]
		if !ok {
			continue
		}
		for name, want := range baseline {
			got, ok := nodes[name]
			switch {
			case !ok:
				rep.violation("oracle", fmt.Sprintf("%s lost node %s", s.Name, name))
			case got.PublicKey != want.PublicKey || !slices.Equal(got.PodCIDRs, want.PodCIDRs):
				rep.violation("oracle", fmt.Sprintf("%s: node %s changed: key %s→%s, pod CIDRs %v→%v", s.Name, name, want.PublicKey, got.PublicKey, want.PodCIDRs, got.PodCIDRs))
			}
		}
		for name, got := range nodes {
			if _, base := baseline[name]; base {
				continue
			}
			j := joins[name]
			switch {
			case j == nil:
				rep.violation("oracle", fmt.Sprintf("%s lists node %s, which nobody joined", s.Name, name))
			case j.rejected:
				rep.violation("deleted-or-revoked-back", fmt.Sprintf("%s lists %s, which joined with a revoked token", s.Name, name))
			case j.deleted:
				rep.violation("deleted-or-revoked-back", fmt.Sprintf("%s lists %s, deleted (acknowledged) at %s", s.Name, name, j.deleteAt.Format("15:04:05.000")))
			case j.acked && (got.PublicKey.String() != j.key || !slices.Equal(got.PodCIDRs, j.cidrs)):
				rep.violation("oracle", fmt.Sprintf("%s: node %s changed: key %s→%s, pod CIDRs %v→%v", s.Name, name, j.key, got.PublicKey, j.cidrs, got.PodCIDRs))
			}
		}
		for _, j := range w.joins {
			if j.acked && !j.deleted && !j.rejected {
				if _, ok := nodes[j.name]; !ok {
					rep.violation("oracle", fmt.Sprintf("%s lost node %s (join acknowledged)", s.Name, j.name))
				}
			}
		}
		for _, o := range overlaps(apiNodesAsListed(nodes)) {
			rep.violation("cidr-overlap", fmt.Sprintf("%s at the end: %s", s.Name, o))
		}
	}
	w.mu.Unlock()
	list, err := w.tokenList()
	w.mu.Lock()
	if err != nil {
		rep.violation("oracle", fmt.Sprintf("no server lists the tokens at the end: %v", err))
		return
	}
	byDesc := map[string]api.TokenInfo{}
	for _, t := range list {
		byDesc[t.Description] = t
	}
	for _, t := range w.tokens {
		got, ok := byDesc[t.desc]
		switch {
		case t.revoked && ok:
			rep.violation("deleted-or-revoked-back", fmt.Sprintf("token %s (%s) is listed after its revocation was acknowledged", t.desc, t.id))
		case !t.revoked && !t.revokeUnsure && !ok:
			rep.violation("oracle", fmt.Sprintf("token %s (%s) was acknowledged and is not listed", t.desc, t.id))
		case ok && t.id != "" && got.ID != t.id:
			rep.violation("oracle", fmt.Sprintf("token %s has ID %s, want %s", t.desc, got.ID, t.id))
		}
	}
}

// checkListings checks every node listing the watchers logged: no two
// nodes with overlapping pod CIDRs, never a node that joined with a
// revoked token, and no deleted node from a server that was not itself
// under a fault, once chaosStaleGrace has passed after the delete.
func checkListings(rep *chaosReport, servers []*member, watchers []*Proc, recs []*faultRecord, kinds []faultKind, w *writer) {
	w.mu.Lock()
	rejected, deleted := map[string]bool{}, map[string]time.Time{}
	for _, j := range w.joins {
		if j.rejected {
			rejected[j.name] = true
		}
		if j.deleted {
			deleted[j.name] = j.deleteAt
		}
	}
	w.mu.Unlock()
	underFault := func(server string, at time.Time) bool {
		for _, rec := range recs {
			if rec.target == server && kindByName(kinds, rec.kind).server && !rec.injected.IsZero() &&
				!at.Before(rec.injected.Add(-5*time.Second)) && (rec.healed.IsZero() || at.Before(rec.healed.Add(chaosCatchUp))) {
				return true
			}
		}
		return false
	}
	seen := map[string]bool{}
	for i, s := range servers {
		ls, failed := parseWatchLog(s.Name, watchers[i].Log())
		rep.listings += len(ls)
		rep.listingErrs += failed
		for _, l := range ls {
			var msgs []string
			for _, o := range overlaps(l.nodes) {
				msgs = append(msgs, "cidr-overlap\x00"+o)
			}
			for _, n := range l.nodes {
				if rejected[n.name] {
					msgs = append(msgs, "deleted-or-revoked-back\x00"+n.name+" (joined with a revoked token) is listed")
				}
				if at, ok := deleted[n.name]; ok && l.at.After(at.Add(chaosStaleGrace)) {
					if !underFault(s.Name, l.at) {
						msgs = append(msgs, "deleted-or-revoked-back\x00"+n.name+" is listed after its delete was acknowledged")
					} else if d := l.at.Sub(at); d > rep.maxStale {
						rep.maxStale = d
					}
				}
			}
			for _, m := range msgs {
				inv, detail, _ := strings.Cut(m, "\x00")
				key := s.Name + m
				if seen[key] {
					continue // once per server and message
				}
				seen[key] = true
				rep.violation(inv, fmt.Sprintf("%s's listing at %s: %s", s.Name, l.at.Format("15:04:05.000"), detail))
			}
		}
	}
}

// checkPeers checks that every running node's WireGuard device has
// exactly the other listed nodes as peers: none deleted, none missing.
func checkPeers(rep *chaosReport, all []*member, nodes map[string]api.Node, w *writer) {
	if nodes == nil {
		return
	}
	w.mu.Lock()
	deleted := map[string]string{}
	for _, j := range w.joins {
		if j.deleted && j.key != "" {
			deleted[j.key] = j.name
		}
	}
	w.mu.Unlock()
	var last []string
	err := Poll(30*time.Second, func() error {
		last = nil
		for _, m := range all {
			dev, err := m.wgShow()
			if err != nil {
				return err
			}
			want := map[string]string{}
			for name, n := range nodes {
				if n.PublicKey.String() != dev.PublicKey {
					want[n.PublicKey.String()] = name
				}
			}
			for _, p := range dev.Peers {
				if name, ok := deleted[p.PublicKey]; ok {
					last = append(last, fmt.Sprintf("%s still has deleted node %s as a peer", m.Name, name))
				} else if _, ok := want[p.PublicKey]; !ok {
					last = append(last, fmt.Sprintf("%s has a peer %s that no node has", m.Name, p.PublicKey))
				}
				delete(want, p.PublicKey)
			}
			for _, name := range want {
				last = append(last, fmt.Sprintf("%s lacks peer %s", m.Name, name))
			}
		}
		if len(last) > 0 {
			return fmt.Errorf("%s", strings.Join(last, "; "))
		}
		return nil
	})
	if err != nil {
		for _, l := range last {
			rep.violation("stale-peer", l)
		}
		if len(last) == 0 {
			rep.violation("stale-peer", err.Error())
		}
	}
}

// checkUsage prints each process's growth over its last run and flags
// one that grew without bound: goroutines more than doubled (plus 150) or
// resident memory more than doubled (plus 100 MiB).
func checkUsage(rep *chaosReport, usages map[string][]usage, since time.Time) {
	var names []string
	for n := range usages {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		us := usages[n]
		if len(us) == 0 {
			continue
		}
		lastPid := us[len(us)-1].pid
		var run []usage
		for _, u := range us {
			if u.pid == lastPid {
				run = append(run, u)
			}
		}
		first, last := run[0], run[len(run)-1]
		maxG := 0
		for _, u := range run {
			maxG = max(maxG, u.goroutines)
		}
		span := last.at.Sub(first.at)
		rep.growth = append(rep.growth, fmt.Sprintf("| %s | %d → %d MiB | %d → %d | %d | %s |", n, first.rssKB/1024, last.rssKB/1024, first.goroutines, last.goroutines, maxG, secs(span)))
		if span < time.Minute {
			continue
		}
		if last.goroutines > 2*first.goroutines+150 {
			rep.violation("resources", fmt.Sprintf("%s: goroutines %d → %d over %v", n, first.goroutines, last.goroutines, span.Round(time.Second)))
		}
		if last.rssKB > 2*first.rssKB+100*1024 {
			rep.violation("resources", fmt.Sprintf("%s: RSS %d → %d MiB over %v", n, first.rssKB/1024, last.rssKB/1024, span.Round(time.Second)))
		}
	}
}

// checkSecrets looks for the join tokens' secrets, node passwords and
// WireGuard private keys in what the trellis processes logged (the
// harness's own "=== start" lines, which echo the command line, aside).
func checkSecrets(rep *chaosReport, c *cluster, all []*member, w *writer) {
	secrets := map[string]string{"server token secret": c.token[strings.LastIndex(c.token, ":")+1:]}
	dirs := map[string]string{}
	for _, m := range all {
		dirs[m.Name] = m.dataDir
	}
	procs := []*Proc{}
	for _, m := range all {
		procs = append(procs, m.proc)
	}
	w.mu.Lock()
	for _, t := range w.tokens {
		// K10<ca>::node:<id>.<secret>: the secret alone must not show.
		sec := t.token[strings.LastIndex(t.token, ":")+1:]
		secrets["token "+t.desc] = sec[strings.LastIndex(sec, ".")+1:]
	}
	for _, j := range w.joins {
		dirs[j.name] = j.dataDir
		procs = append(procs, j.proc)
	}
	w.mu.Unlock()
	for name, dir := range dirs {
		for _, f := range []string{"node-password", "wireguard.key"} {
			if b, err := os.ReadFile(filepath.Join(dir, "agent", f)); err == nil && len(strings.TrimSpace(string(b))) >= 8 {
				secrets[name+"'s "+f] = strings.TrimSpace(string(b))
			}
		}
	}
	for _, p := range procs {
		for _, line := range strings.Split(p.Log(), "\n") {
			if strings.HasPrefix(line, "=== ") {
				continue
			}
			for what, sec := range secrets {
				if len(sec) >= 8 && strings.Contains(line, sec) {
					rep.violation("secrets", fmt.Sprintf("the log of %s has %s: %.200s", p.Name, what, line))
				}
			}
		}
	}
}
