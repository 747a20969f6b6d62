// Command trellis-loadgen measures a Trellis server process with many
// virtual agents: for each N it starts a fresh `trellis server` on
// loopback, joins N agents, opens their netmap streams, makes changes and
// measures the fan-out, and writes the results as JSON, a Markdown table
// and a PNG plot.
//
//	trellis-loadgen -trellis bin/trellis -agents 100,1000,5000 -out docs/bench
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/trellis-mesh/trellis/internal/client"
	"github.com/trellis-mesh/trellis/internal/loadgen"
	"github.com/trellis-mesh/trellis/internal/pki"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "trellis-loadgen:", err)
		}
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("trellis-loadgen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	bin := fs.String("trellis", "bin/trellis", "trellis binary to run as the server")
	agentsFlag := fs.String("agents", "100,1000,5000", "comma-separated numbers of virtual agents, one server run each")
	changes := fs.Int("changes", 5, "changes measured per run")
	out := fs.String("out", "", "directory for loadgen.json, loadgen.md and loadgen.png (empty: print the table only)")
	timeout := fs.Duration("phase-timeout", 15*time.Minute, "bound on each phase (joins, first netmaps, one fan-out, settling)")
	wholeFlag := fs.String("whole", "", "comma-separated numbers of agents to run again with whole netmaps on every change (as before deltas), to compare")
	kubeFlag := fs.String("kube-agents", "", "comma-separated numbers of agents to run again in Kubernetes mode (needs -kubeconfig)")
	kubeconfig := fs.String("kubeconfig", "", "for -kube-agents: the server follows the Nodes of this kubeconfig's API server, and every agent's Node is created there first (its user must create, delete and list Nodes); Node deletions are measured too")
	nodeDeletes := fs.Int("node-deletes", 3, "Node deletions measured in Kubernetes mode")
	serverFlags := fs.String("server-flags", "", "more flags for each server, space-separated (e.g. \"--metrics-address=127.0.0.1:9099 --enable-pprof\" to profile it)")
	replot := fs.String("replot", "", "measure nothing: read the results from this loadgen.json and write the table and plot to -out")
	if err := fs.Parse(args); err != nil {
		return err
	}
	type runSpec struct {
		n           int
		whole, kube bool
	}
	if (*kubeFlag != "") != (*kubeconfig != "") {
		return errors.New("-kube-agents and -kubeconfig go together: the numbers of agents to run in Kubernetes mode, and the API server to run them against")
	}
	var runs []runSpec
	for _, fl := range []struct {
		name, value string
		whole, kube bool
	}{{"-agents", *agentsFlag, false, false}, {"-whole", *wholeFlag, true, false}, {"-kube-agents", *kubeFlag, false, true}} {
		if fl.value == "" {
			continue
		}
		for f := range strings.SplitSeq(fl.value, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n < 1 {
				return fmt.Errorf("%s: %q is not a positive number", fl.name, f)
			}
			runs = append(runs, runSpec{n, fl.whole, fl.kube})
		}
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	var results []*loadgen.Result
	if *replot != "" {
		b, err := os.ReadFile(*replot)
		if err != nil {
			return err
		}
		if err := json.Unmarshal(b, &results); err != nil {
			return fmt.Errorf("%s: %w", *replot, err)
		}
		runs = nil
	} else if err := raiseFileLimit(log); err != nil {
		return err
	}
	var nodes loadgen.Nodes
	if *kubeconfig != "" {
		var err error
		if nodes, err = loadgen.KubeNodes(*kubeconfig); err != nil {
			return err
		}
	}
	var failed []string
	for _, r := range runs {
		log.Info("=== run", "agents", r.n, "wholeMaps", r.whole, "kube", r.kube)
		var kr kubeRun
		if r.kube {
			kr = kubeRun{*kubeconfig, nodes, *nodeDeletes}
		}
		res, err := runOnce(ctx, log, *bin, strings.Fields(*serverFlags), r.n, *changes, *timeout, r.whole, kr)
		if res != nil {
			results = append(results, res)
		}
		if err != nil {
			log.Error("run failed; reporting what was measured", "agents", r.n, "wholeMaps", r.whole, "kube", r.kube, "err", err)
			failed = append(failed, fmt.Sprintf("%d agents: %v", r.n, err))
		}
	}
	if err := report(results, stdout, *out); err != nil {
		return err
	}
	if len(failed) > 0 {
		return fmt.Errorf("%d of %d runs failed: %s", len(failed), len(runs), strings.Join(failed, "; "))
	}
	return nil
}

// report prints the tables of results and, if out is not "", writes
// loadgen.json, loadgen.md and loadgen.png there.
func report(results []*loadgen.Result, stdout io.Writer, out string) error {
	table := markdown(results)
	fmt.Fprint(stdout, table)
	if out == "" {
		return nil
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	jf, err := os.Create(filepath.Join(out, "loadgen.json"))
	if err != nil {
		return err
	}
	if err := loadgen.WriteJSON(jf, results); err != nil {
		jf.Close()
		return err
	}
	if err := jf.Close(); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(out, "loadgen.md"), []byte(table), 0o644); err != nil {
		return err
	}
	return writePlot(filepath.Join(out, "loadgen.png"), results)
}

// raiseFileLimit lifts the soft limit on open files to the hard limit:
// each agent holds a connection, and so does the server (a child inherits
// the limit).
func raiseFileLimit(log *slog.Logger) error {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("read the open-file limit: %w", err)
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("raise the open-file limit to %d: %w", lim.Max, err)
	}
	log.Info("open-file limit", "limit", lim.Cur)
	return nil
}

// kubeRun is what a run in Kubernetes mode needs: the kubeconfig the
// server follows, the Nodes the agents get and how many are deleted.
type kubeRun struct {
	kubeconfig string // "": not Kubernetes mode
	nodes      loadgen.Nodes
	deletes    int
}

// runOnce starts a fresh server and runs n agents against it. In
// Kubernetes mode it deletes the Nodes it created afterwards, so that the
// next run starts from none.
func runOnce(ctx context.Context, log *slog.Logger, bin string, extra []string, n, changes int, timeout time.Duration, whole bool, kr kubeRun) (*loadgen.Result, error) {
	dir, err := os.MkdirTemp("", "trellis-loadgen-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	if kr.nodes != nil {
		defer deleteNodes(log, kr.nodes, n)
	}
	srv, err := startServer(ctx, log, bin, dir, kr.kubeconfig, extra)
	if err != nil {
		return nil, err
	}
	defer srv.stop(log)
	return loadgen.Run(ctx, loadgen.Config{
		ServerURL: srv.url, Token: srv.token, CAPEM: srv.ca,
		Agents: n, Changes: changes, SourceAddrs: true, ServerPID: srv.cmd.Process.Pid,
		PhaseTimeout: timeout, Logger: log, WholeMaps: whole, Nodes: kr.nodes, NodeDeletes: kr.deletes,
	})
}

// deleteNodes deletes the Nodes of agents 0..n-1, 32 at a time, and logs
// what it could not delete.
func deleteNodes(log *slog.Logger, nodes loadgen.Nodes, n int) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	log.Info("deleting the run's Nodes", "nodes", n)
	sem := make(chan struct{}, 32)
	var wg sync.WaitGroup
	var failed atomic.Int64
	for i := range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := nodes.Delete(ctx, loadgen.AgentName(i)); err != nil {
				if failed.Add(1) == 1 {
					log.Warn("could not delete a Node; delete the run's Nodes with kubectl delete node -l "+loadgen.LoadgenLabel, "err", err)
				}
			}
		})
	}
	wg.Wait()
}

type serverProc struct {
	cmd   *exec.Cmd
	done  chan struct{}
	url   string
	token string
	ca    []byte
	log   string
}

// startServer starts `trellis server` without its own node on a free
// loopback port, with the cluster CIDR 10.0.0.0/8 (room for 65536 nodes),
// and waits until it answers.
func startServer(ctx context.Context, log *slog.Logger, bin, dir, kubeconfig string, extra []string) (*serverProc, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	conf := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(conf, []byte("# trellis-loadgen: settings are flags\n"), 0o600); err != nil {
		return nil, err
	}
	s := &serverProc{log: filepath.Join(dir, "server.log"), done: make(chan struct{}), url: "https://127.0.0.1:" + strconv.Itoa(port)}
	logf, err := os.Create(s.log)
	if err != nil {
		return nil, err
	}
	args := []string{"server", "--disable-agent", "--config", conf,
		"--data-dir", filepath.Join(dir, "data"), "--node-name", "loadgen-server",
		"--bind-address", "127.0.0.1", "--https-listen-port", strconv.Itoa(port),
		"--cluster-cidr", "10.0.0.0/8", "--token", "loadgen-secret", "--log-level", "warn"}
	if kubeconfig != "" {
		args = append(args, "--kubeconfig", kubeconfig)
	}
	args = append(args, extra...)
	s.cmd = exec.Command(bin, args...)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	go func() {
		_ = s.cmd.Wait()
		logf.Close()
		close(s.done)
	}()
	log.Info("server started", "pid", s.cmd.Process.Pid, "url", s.url, "log", s.log)
	deadline := time.Now().Add(time.Minute)
	var last error // why the server does not answer yet
	for {
		tok, err1 := os.ReadFile(filepath.Join(dir, "data", "server", "token"))
		ca, err2 := os.ReadFile(filepath.Join(dir, "data", "server", "tls", pki.CACertFile))
		last = errors.Join(err1, err2)
		if last == nil {
			if last = ping(ctx, s.url, ca); last == nil {
				s.token, s.ca = strings.TrimSpace(string(tok)), ca
				return s, nil
			}
		}
		select {
		case <-s.done:
			b, _ := os.ReadFile(s.log)
			return nil, fmt.Errorf("server exited: %s", b)
		case <-ctx.Done():
			s.stop(log)
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.stop(log)
			return nil, fmt.Errorf("server did not answer within a minute: %w", last)
		}
	}
}

// ping asks the server at url, whose CA is ca, whether it answers.
func ping(ctx context.Context, url string, ca []byte) error {
	c, err := client.New(client.Config{URL: url, CA: ca, Timeout: time.Second})
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Ping(ctx)
}

// stop ends the server: SIGTERM, then SIGKILL after 10 s.
func (s *serverProc) stop(log *slog.Logger) {
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		log.Warn("server ignored SIGTERM; killing it", "pid", s.cmd.Process.Pid)
		_ = s.cmd.Process.Kill()
		<-s.done
	}
}
