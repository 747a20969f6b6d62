//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
)

// The chaos suite's writer and oracle: the writer does what operators do
// (create and revoke join tokens, join nodes with them and delete them,
// try a revoked token) through the CLI of a random server while faults
// go on, and records each operation the API acknowledged, refused or left
// undecided. At the end the oracle checks the cluster against the record,
// the way Jepsen checks acknowledged writes.

// spare is a machine the writer joins nodes on, one at a time.
type spare struct {
	node *Node
	busy bool
}

type tokenRec struct {
	desc, token, id string
	revoked         bool // the API acknowledged the revocation
	revokeUnsure    bool // a revocation failed: it may or may not have happened
	usedBy          []string
}

type joinRec struct {
	name     string
	token    *tokenRec
	proc     *Proc
	sp       *spare
	acked    bool // listed and ready: the join was acknowledged
	unsure   bool // not acknowledged in time; then deleted (maybe)
	key      string
	cidrs    []netip.Prefix
	deleted  bool // the API acknowledged the delete
	deleteAt time.Time
	// rejected: a join with a revoked token, which must never be listed.
	rejected bool
	started  time.Time
	dataDir  string
	// restarted: after its delete and its token's revocation, its agent
	// was started again with its data directory; it must stay out.
	restarted bool
}

// writer is the operator under chaos.
type writer struct {
	lab     *Lab
	bin     string
	servers []*member
	r       *rand.Rand
	spares  []*spare
	logf    func(string, ...any)

	mu      sync.Mutex
	seq     int
	tokens  []*tokenRec
	joins   []*joinRec
	ops     map[string][3]int // op → acknowledged, refused or undecided, other
	history []string
}

func newWriter(lab *Lab, bin string, servers []*member, seed uint64, spares []*Node, logf func(string, ...any)) *writer {
	w := &writer{lab: lab, bin: bin, servers: servers, r: rand.New(rand.NewPCG(seed, 0x0c0ffee)), logf: logf, ops: map[string][3]int{}}
	for _, n := range spares {
		w.spares = append(w.spares, &spare{node: n})
	}
	return w
}

// record notes the outcome of an operation: 0 acknowledged, 1 failed
// (refused or undecided), 2 not possible now.
func (w *writer) record(op string, outcome int, detail string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	c := w.ops[op]
	c[outcome]++
	w.ops[op] = c
	w.history = append(w.history, fmt.Sprintf("%s %s %s %s", time.Now().Format("15:04:05.000"), op, []string{"ack", "fail", "skip"}[outcome], detail))
}

// cliOn runs the trellis CLI on server s.
func (w *writer) cliOn(s *member, args ...string) (string, error) {
	if !s.proc.Running() {
		return "", fmt.Errorf("%s is not running", s.Name)
	}
	admin := filepath.Join(s.dataDir, "server", "admin.yaml")
	return w.lab.Output(s.NS, append(append([]string{w.bin}, args...), "--admin-config", admin)...)
}

// mutate runs a changing command on one random server: no retry, so that
// a failure leaves at most one undecided write.
func (w *writer) mutate(args ...string) (string, error) {
	return w.cliOn(w.servers[w.r.IntN(len(w.servers))], args...)
}

// read runs a reading command on each server in turn until one answers.
func (w *writer) read(args ...string) (string, error) {
	var err error
	for _, i := range w.r.Perm(len(w.servers)) {
		var out string
		if out, err = w.cliOn(w.servers[i], args...); err == nil {
			return out, nil
		}
	}
	return "", err
}

func (w *writer) nodes() (map[string]api.Node, error) {
	out, err := w.read("nodes", "-o", "json")
	if err != nil {
		return nil, err
	}
	var list []api.Node
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		return nil, fmt.Errorf("trellis nodes -o json: %w", err)
	}
	m := map[string]api.Node{}
	for _, n := range list {
		m[n.Name] = n
	}
	return m, nil
}

func (w *writer) tokenList() ([]api.TokenInfo, error) {
	out, err := w.read("token", "list", "-o", "json")
	if err != nil {
		return nil, err
	}
	var list []api.TokenInfo
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		return nil, fmt.Errorf("trellis token list -o json: %w; output %q", err, out)
	}
	return list, nil
}

// run does an operation every few seconds until ctx ends, then stops the
// processes it started that should not outlive the run.
func (w *writer) run(ctx context.Context) {
	for ctx.Err() == nil {
		w.step(ctx)
		sleepUntil(ctx, time.Now().Add(time.Duration(3000+w.r.IntN(4000))*time.Millisecond))
	}
}

func (w *writer) step(ctx context.Context) {
	w.mu.Lock()
	var live, revoked []*tokenRec
	for _, t := range w.tokens {
		switch {
		case t.revoked:
			revoked = append(revoked, t)
		case !t.revokeUnsure:
			live = append(live, t)
		}
	}
	var joined []*joinRec
	for _, j := range w.joins {
		if (j.acked || j.unsure) && !j.deleted && !j.rejected {
			joined = append(joined, j)
		}
	}
	var free *spare
	for _, s := range w.spares {
		if !s.busy {
			free = s
			break
		}
	}
	var comeback *joinRec
	for _, j := range w.joins {
		if j.deleted && j.token.revoked && !j.restarted && !j.rejected && !j.sp.busy {
			comeback = j
			break
		}
	}
	w.mu.Unlock()
	if comeback != nil && w.r.IntN(2) == 0 {
		w.restartDeleted(ctx, comeback)
		return
	}

	switch x := w.r.IntN(100); {
	case x < 25 || len(live) == 0:
		w.createToken()
	case x < 50 && free != nil:
		w.join(ctx, free, live[w.r.IntN(len(live))], false)
	case x < 65 && len(joined) > 0:
		w.deleteNode(ctx, joined[w.r.IntN(len(joined))])
	case x < 80:
		w.revoke(live[w.r.IntN(len(live))])
	case free != nil && len(revoked) > 0:
		w.join(ctx, free, revoked[w.r.IntN(len(revoked))], true)
	default:
		w.createToken()
	}
}

func (w *writer) createToken() {
	w.mu.Lock()
	w.seq++
	desc := fmt.Sprintf("chaos-%d", w.seq)
	w.mu.Unlock()
	out, err := w.mutate("token", "create", "--description", desc)
	if err != nil {
		w.record("token create", 1, fmt.Sprintf("%s: %v", desc, err))
		return
	}
	rec := &tokenRec{desc: desc, token: strings.TrimSpace(out)}
	// The ID is in the listing.
	err = Poll(30*time.Second, func() error {
		list, err := w.tokenList()
		if err != nil {
			return err
		}
		for _, t := range list {
			if t.Description == desc {
				rec.id = t.ID
				return nil
			}
		}
		return fmt.Errorf("token %s not listed", desc)
	})
	if err != nil {
		// Acknowledged but not listed: the oracle's final check says so.
		w.logf("chaos: writer: token %s acknowledged but not listed yet: %v", desc, err)
	}
	w.mu.Lock()
	w.tokens = append(w.tokens, rec)
	w.mu.Unlock()
	w.record("token create", 0, desc+" "+rec.id)
}

func (w *writer) revoke(t *tokenRec) {
	if t.id == "" {
		w.record("token revoke", 2, t.desc+" has no known ID")
		return
	}
	_, err := w.mutate("token", "revoke", t.id)
	w.mu.Lock()
	if err != nil {
		t.revokeUnsure = true
	} else {
		t.revoked = true
	}
	w.mu.Unlock()
	if err != nil {
		w.record("token revoke", 1, fmt.Sprintf("%s: %v", t.desc, err))
		return
	}
	w.record("token revoke", 0, t.desc)
}

// join starts an agent on sp with t. A join with a revoked token must be
// refused: the node must never be listed.
func (w *writer) join(ctx context.Context, sp *spare, t *tokenRec, revoked bool) {
	w.mu.Lock()
	w.seq++
	name := fmt.Sprintf("w%d", w.seq)
	if revoked {
		name = fmt.Sprintf("rv%d", w.seq)
	}
	sp.busy = true
	w.mu.Unlock()
	srv := w.servers[w.r.IntN(len(w.servers))]
	data, cni := w.lab.TempDir(name+"-data"), w.lab.TempDir(name+"-cni")
	args := []string{w.bin, "agent", "--server", "https://" + netip.AddrPortFrom(srv.PublicIP, serverPort).String(), "--token", t.token,
		"--data-dir", data, "--node-name", name, "--node-ip", sp.node.LANIP.String(), "--node-external-ip", sp.node.PublicIP.String(),
		"--cni-conf-dir", cni}
	args = append(args, logArgs()...)
	p, err := w.lab.TryStart(sp.node.NS, args...)
	if err != nil {
		w.record("node join", 1, err.Error())
		w.mu.Lock()
		sp.busy = false
		w.mu.Unlock()
		return
	}
	j := &joinRec{name: name, token: t, proc: p, sp: sp, rejected: revoked, started: time.Now(), dataDir: data}
	w.mu.Lock()
	w.joins = append(w.joins, j)
	t.usedBy = append(t.usedBy, name)
	w.mu.Unlock()
	if revoked {
		// Give it time to try (and be refused), then stop it.
		sleepUntil(ctx, time.Now().Add(15*time.Second))
		_ = p.Stop()
		w.mu.Lock()
		sp.busy = false
		w.mu.Unlock()
		w.record("join with revoked token", 0, name+" with "+t.desc)
		return
	}
	deadline := 90 * time.Second
	err = Poll(deadline, func() error {
		if ctx.Err() != nil {
			return Permanent(ctx.Err())
		}
		if err := p.Err(); err != nil {
			return err
		}
		nodes, err := w.nodes()
		if err != nil {
			return err
		}
		n, ok := nodes[name]
		if !ok || !n.Ready || len(n.PodCIDRs) == 0 {
			return fmt.Errorf("%s not listed ready", name)
		}
		w.mu.Lock()
		j.acked, j.key, j.cidrs = true, n.PublicKey.String(), slices.Clone(n.PodCIDRs)
		w.mu.Unlock()
		return nil
	})
	if err == nil {
		w.record("node join", 0, fmt.Sprintf("%s with %s via %s in %.1fs", name, t.desc, srv.Name, time.Since(j.started).Seconds()))
		return
	}
	// Not acknowledged: stop it and delete what may have been written.
	w.record("node join", 1, fmt.Sprintf("%s: %v", name, err))
	_ = p.Stop()
	w.mu.Lock()
	j.unsure = true
	w.mu.Unlock()
	w.deleteNode(ctx, j)
}

// deleteNode deletes j's node and, once acknowledged, stops its agent
// (which must stay out) after a while and frees the spare.
func (w *writer) deleteNode(ctx context.Context, j *joinRec) {
	_, err := w.mutate("node", "delete", j.name)
	if err != nil {
		w.record("node delete", 1, fmt.Sprintf("%s: %v", j.name, err))
		if j.unsure {
			// Its agent is stopped: the spare is free; the node may exist,
			// and a later step tries the delete again.
			w.mu.Lock()
			j.sp.busy = false
			w.mu.Unlock()
		}
		return
	}
	w.mu.Lock()
	j.deleted, j.deleteAt = true, time.Now()
	w.mu.Unlock()
	w.record("node delete", 0, j.name)
	// Half the time the operator also revokes the token the node joined
	// with: restartDeleted then checks that the node stays out.
	if w.r.IntN(2) == 0 && !j.token.revoked && !j.token.revokeUnsure {
		w.revoke(j.token)
	}
	sleepUntil(ctx, time.Now().Add(10*time.Second))
	_ = j.proc.Stop()
	w.mu.Lock()
	j.sp.busy = false
	w.mu.Unlock()
}

// restartDeleted starts the agent of deleted node j again, with its data
// directory (its node password and keys) and its revoked token: it must
// not get back in.
func (w *writer) restartDeleted(ctx context.Context, j *joinRec) {
	w.mu.Lock()
	j.sp.busy, j.restarted = true, true
	w.mu.Unlock()
	if err := j.proc.Start(); err != nil {
		w.record("restart deleted node", 1, fmt.Sprintf("%s: %v", j.name, err))
	} else {
		sleepUntil(ctx, time.Now().Add(15*time.Second))
		_ = j.proc.Stop()
		w.record("restart deleted node", 0, j.name+" (its token "+j.token.desc+" revoked)")
	}
	w.mu.Lock()
	j.sp.busy = false
	w.mu.Unlock()
}
