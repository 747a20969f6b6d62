package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/trellis-mesh/trellis/internal/agent"
	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/cli"
	"github.com/trellis-mesh/trellis/internal/vpn"
	"github.com/trellis-mesh/trellis/internal/vpn/tailscale"
)

// watchInterval is how often `trellis nodes --watch` asks the server.
const watchInterval = 2 * time.Second

// runNodesCmd is `trellis nodes [-o table|wide|json|yaml] [--watch]`.
func runNodesCmd(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("nodes", flag.ContinueOnError)
	fs.SetOutput(stderr)
	adminConfig := adminFlags(fs)
	output := fs.String("o", "table", "output format: table, wide (adds endpoint, path, handshake, RTT, rx/tx from the server's node), json or yaml")
	var watch bool
	fs.BoolVar(&watch, "watch", false, "print again whenever the listing changes (every 2 s); stop with Ctrl-C")
	fs.BoolVar(&watch, "w", false, "short for --watch")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if err := settle(fs, getenv, nil); err != nil {
		return err
	}
	switch *output {
	case cli.FormatTable, cli.FormatWide, cli.FormatJSON, cli.FormatYAML:
	default:
		return fmt.Errorf("-o %s: use table, wide, json or yaml", *output)
	}
	c, err := cli.Load(*adminConfig)
	if err != nil {
		return err
	}
	colour := cli.IsTerminal(stdout)
	last := ""
	for first := true; ; first = false {
		nodes, err := c.Nodes(ctx)
		switch {
		case err != nil && (first || !watch):
			return err
		case err != nil && ctx.Err() != nil:
			return nil
		case err != nil:
			fmt.Fprintf(stderr, "trellis nodes: %v (retrying)\n", err)
		default:
			var wide map[string]cli.WideInfo
			if *output == cli.FormatWide {
				wide = c.Wide(ctx, nodes)
			}
			if key := cli.WatchKey(nodes, wide, *output); key != last {
				if !first {
					sep := "\n"
					if *output == cli.FormatYAML {
						sep = "---\n"
					}
					fmt.Fprint(stdout, sep)
				}
				if err := cli.PrintNodeList(stdout, nodes, cli.NodeListOptions{Format: *output, Colour: colour, Now: time.Now(), Wide: wide}); err != nil {
					return err
				}
				last = key
			}
		}
		if !watch {
			return nil
		}
		t := time.NewTimer(watchInterval)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// runCheck is `trellis check [-o table|json|yaml]`.
func runCheck(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	adminConfig := adminFlags(fs)
	output := fs.String("o", "table", "output format: table (an N×N matrix), json or yaml")
	count := fs.Int("count", 3, "small pings per pair (1-10)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if err := settle(fs, getenv, nil); err != nil {
		return err
	}
	if *count < 1 || *count > api.MaxProbeCount {
		return fmt.Errorf("--count=%d: use 1-%d", *count, api.MaxProbeCount)
	}
	switch *output {
	case cli.FormatTable, cli.FormatJSON, cli.FormatYAML:
	default:
		return fmt.Errorf("-o %s: use table, json or yaml", *output)
	}
	c, err := cli.Load(*adminConfig)
	if err != nil {
		return err
	}
	rep, err := c.Check(ctx, cli.CheckOptions{Count: *count})
	if err != nil {
		return err
	}
	return cli.PrintCheck(stdout, rep, *output, cli.IsTerminal(stdout))
}

// runLocalStatus is `trellis status` without a node: the agent on this
// host, read from its 127.0.0.1 status endpoint.
func runLocalStatus(ctx context.Context, stdout io.Writer, port int, output string) error {
	st, err := cli.LocalStatus(ctx, port)
	if err != nil {
		return err
	}
	return cli.PrintStatus(stdout, st, output, time.Now())
}

var errPprofNeedsMetrics = errors.New("--enable-pprof serves the profiles on the metrics endpoint: set --metrics-address too (e.g. 127.0.0.1:10252)")

// opsFlags are --metrics-address and --enable-pprof, shared by server
// and agent.
type opsFlags struct {
	metricsAddr string
	pprof       bool
}

func (o *opsFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&o.metricsAddr, "metrics-address", "", "serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:10252; off by default; a non-loopback address exposes the cluster's topology to whoever reaches it)")
	fs.BoolVar(&o.pprof, "enable-pprof", false, "also serve Go profiles at http://<metrics-address>/debug/pprof/ (needs --metrics-address)")
}

// startMetrics serves gatherers at http://addr/metrics (and with pprof the
// Go profiles at /debug/pprof/) until ctx ends; the returned function stops
// the server and waits for it. An empty addr serves nothing.
func startMetrics(ctx context.Context, o opsFlags, log *slog.Logger, gatherers ...prometheus.Gatherer) (stop func(), err error) {
	addr := o.metricsAddr
	if addr == "" {
		if o.pprof {
			return nil, errPprofNeedsMetrics
		}
		return func() {}, nil
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-address=%s: want HOST:PORT, e.g. 127.0.0.1:10252", addr)
	}
	if ip, err := netip.ParseAddr(host); host == "" || (err == nil && !ip.IsLoopback()) || (err != nil && host != "localhost") {
		log.Warn("metrics are served on a non-loopback address: anyone who reaches it sees node names, peers and traffic; firewall it or use 127.0.0.1", "address", addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-address=%s: %w (choose another port)", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(prometheus.Gatherers(gatherers), promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}))
	if o.pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		log.Info("serving Go profiles", "url", "http://"+ln.Addr().String()+"/debug/pprof/")
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics endpoint stopped", "err", err)
		}
	}()
	stopWatch := context.AfterFunc(ctx, func() { _ = srv.Close() })
	log.Info("serving Prometheus metrics", "url", "http://"+ln.Addr().String()+"/metrics")
	return func() {
		stopWatch()
		_ = srv.Close()
		<-done
	}, nil
}

// processRegistry is a registry with the Go runtime and process metrics,
// for the agent's own metrics to join.
func processRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// cleanupNode removes what the node's agent created, with the settings
// the agent ran with (flags, environment, config file).
func cleanupNode(ctx context.Context, n *nodeFlags, stderr io.Writer) error {
	log, err := newLogger(stderr, n.logLevel, n.logFormat)
	if err != nil {
		return err
	}
	return runNodeCleanup(ctx, n.dataDir, n.cniConfDir, n.tunnel.statusPort, log)
}

func runNodeCleanup(ctx context.Context, dataDir, cniConfDir string, statusPort int, log *slog.Logger) error {
	// Withdrawing routes needs no join key: the provider is only asked to
	// change the advertised routes, and only if a record of them exists.
	p, err := tailscale.New(tailscale.Config{Auth: vpn.Auth{Name: "tailscale"}, Logger: log})
	if err != nil {
		return err
	}
	if statusPort == 0 {
		statusPort = -1
	}
	if err := agent.Cleanup(ctx, agent.CleanupConfig{DataDir: dataDir, CNIConfDir: cniConfDir, StatusPort: statusPort, VPN: p, Logger: log}); err != nil {
		return err
	}
	log.Info("clean-up done; the data dir (the node's identity) is kept: remove it to forget the node", "dataDir", dataDir)
	return nil
}

func statusPortFlag(fs *flag.FlagSet) *int {
	return fs.Int("status-port", api.DefaultStatusPort, "127.0.0.1 port of the agent's status endpoint")
}
