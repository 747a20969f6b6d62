// Command trellis runs a Trellis server or agent, and the operator
// commands that talk to a server.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"k8s.io/klog/v2"

	"github.com/trellis-mesh/trellis/internal/agent"
	"github.com/trellis-mesh/trellis/internal/cli"
	"github.com/trellis-mesh/trellis/internal/kube"
	"github.com/trellis-mesh/trellis/internal/mesh"
	"github.com/trellis-mesh/trellis/internal/pki"
	"github.com/trellis-mesh/trellis/internal/server"
)

const usage = `trellis builds one cluster network out of machines in different clouds.

Usage:
  trellis server [flags]          run a server (and its own node unless --disable-agent)
  trellis agent --server URL --token TOKEN [flags]
  trellis nodes [-o table|wide|json|yaml] [--watch]  list nodes (reads the admin config)
  trellis check [-o table|json|yaml]  every node pings every other: an N×N matrix of RTTs or why a pair fails
  trellis status [NODE] [-o table|json]  a node's own view (server, tunnel, WireGuard peers, MTU); without NODE, this host's agent
  trellis proxy NODE PORT [--listen ADDR:PORT]  carry local connections to 127.0.0.1:PORT on NODE
  trellis paths [-o table|json]   how every node reaches every other: direct or relayed, and why
  trellis node delete NAME        remove a node from the cluster
  trellis server leave            this server leaves the cluster of servers (its etcd member too); stop it afterwards
  trellis datastore snapshot save|restore FILE [--data-dir D]  back up or restore the datastore (SQLite, embedded etcd)
  trellis cleanup [--data-dir D]  remove what this node's agent created (interface, routes, bridge, CNI config, VPN routes); also: uninstall, agent --cleanup
  trellis token create [--ttl D]  make a join token for agents (also: list, revoke ID, rotate)
  trellis egress-config [--transport uds|tcp] [--output FILE]  kube-apiserver's egress selector: logs, exec, port-forward through the tunnels
  trellis version

Run 'trellis COMMAND -h' for the flags of a command. Every flag can also be
set with an environment variable TRELLIS_<FLAG_NAME> (TRELLIS_URL for
--server) or in /etc/trellis/config.yaml (keys are flag names).
`

var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Getenv)
	stop()
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "trellis:", err)
		}
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errors.New("no command given")
	}
	switch args[0] {
	case "server":
		if len(args) > 1 && args[1] == "leave" {
			return runServerLeave(ctx, args[2:], stdout, stderr, getenv)
		}
		return runServer(ctx, args[1:], stderr, getenv)
	case "agent":
		return runAgent(ctx, args[1:], stderr, getenv)
	case "proxy":
		return runProxy(ctx, args[1:], stdout, stderr, getenv)
	case "status":
		return runStatus(ctx, args[1:], stdout, stderr, getenv)
	case "nodes":
		return runNodesCmd(ctx, args[1:], stdout, stderr, getenv)
	case "check":
		return runCheck(ctx, args[1:], stdout, stderr, getenv)
	case "paths":
		return runPaths(ctx, args[1:], stdout, stderr, getenv)
	case "token":
		return runToken(ctx, args[1:], stdout, stderr, getenv)
	case "node":
		if len(args) < 2 || args[1] != "delete" {
			return errors.New("usage: trellis node delete NAME")
		}
		return runNodeDelete(ctx, args[2:], stdout, stderr, getenv)
	case "datastore":
		return runDatastore(ctx, args[1:], stdout, stderr, getenv)
	case "egress-config":
		return runEgressConfig(ctx, args[1:], stdout, stderr, getenv)
	case "cleanup", "uninstall":
		return runCleanup(ctx, args[1:], stderr, getenv)
	case "version", "--version":
		fmt.Fprintln(stdout, "trellis", version)
		return nil
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("unknown command %q", args[0])
}

// nodeFlags are the flags shared by server and agent.
type nodeFlags struct {
	config         string
	dataDir        string
	nodeName       string
	nodeIPs        listFlag
	externalIPs    listFlag
	token          string
	tokenFile      string
	flannelBackend string
	cniConfDir     string
	wgPort         int
	wgMode         string
	wgMTU          int
	logLevel       string
	logFormat      string
	tunnel         tunnelFlags
	relay          bool
	vpn            vpnFlags
	withNodeID     bool
	ops            opsFlags // ops.go
	cleanup        bool
	serverURL      *string // agent only
}

func (n *nodeFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&n.config, "config", "/etc/trellis/config.yaml", "config file (YAML, keys are flag names); drop-ins in <config>.d/*.yaml")
	fs.StringVar(&n.dataDir, "data-dir", "/var/lib/trellis", "directory for state (keys, certificates, database)")
	fs.StringVar(&n.nodeName, "node-name", "", "node name (default: the host name)")
	fs.Var(&n.nodeIPs, "node-ip", "internal IP address of the node (repeatable; default: the address of the default route)")
	fs.Var(&n.externalIPs, "node-external-ip", "external IP address other networks reach the node at (repeatable)")
	fs.StringVar(&n.token, "token", "", "join token (K10<ca-hash>::server:<secret>)")
	fs.StringVar(&n.tokenFile, "token-file", "", "file holding the join token")
	fs.StringVar(&n.flannelBackend, "flannel-backend", "wireguard-native", "data plane: wireguard-native or none")
	fs.StringVar(&n.cniConfDir, "cni-conf-dir", "/etc/cni/net.d", "directory for the CNI network config")
	fs.IntVar(&n.wgPort, "wireguard-listen-port", mesh.DefaultListenPort, "UDP port of the WireGuard interface")
	fs.StringVar(&n.wgMode, "wireguard-mode", "auto", "WireGuard implementation: auto, kernel or userspace")
	fs.IntVar(&n.wgMTU, "wireguard-mtu", 0, "MTU of the WireGuard interface (0: underlay MTU - 80)")
	fs.StringVar(&n.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.StringVar(&n.logFormat, "log-format", "text", "log format: text or json")
	n.tunnel.register(fs)
	fs.BoolVar(&n.relay, "relay", false, "relay traffic between nodes that cannot reach each other (servers always do)")
	n.vpn.register(fs)
	fs.BoolVar(&n.withNodeID, "with-node-id", false, "append a random id, kept in the data dir, to the node name (for machines that share a host name)")
	n.ops.register(fs)
	fs.BoolVar(&n.cleanup, "cleanup", false, "do not run: remove what this node's agent created (WireGuard interface, routes, pod bridge, CNI config, VPN routes) and exit; stop the service first")
}

// parse parses args, then settles unset flags from env and config files.
func parse(fs *flag.FlagSet, args []string, getenv func(string) string, configFlag *string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q (flags are written --name=value)", fs.Arg(0))
	}
	explicit := false
	fs.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "config" })
	if v := getenv("TRELLIS_CONFIG"); v != "" && !explicit {
		*configFlag, explicit = v, true
	}
	files, err := loadConfigFiles(*configFlag, explicit)
	if err != nil {
		return err
	}
	return settle(fs, getenv, files)
}

func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level=%s: use debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format=%s: use text or json", format)
}

// agentConfig maps the shared node flags onto an agent.Config.
func (n *nodeFlags) agentConfig(log *slog.Logger) (agent.Config, error) {
	var c agent.Config
	var err error
	if n.ops.pprof && n.ops.metricsAddr == "" {
		return c, errPprofNeedsMetrics
	}
	if n.nodeName == "" {
		if n.nodeName, err = os.Hostname(); err != nil {
			return c, fmt.Errorf("no --node-name and no host name: %w", err)
		}
		n.nodeName = strings.ToLower(n.nodeName)
	}
	if n.withNodeID {
		id, err := nodeID(n.dataDir)
		if err != nil {
			return c, err
		}
		n.nodeName += "-" + id
	}
	if err := server.ValidateNodeName(n.nodeName); err != nil {
		return c, fmt.Errorf("--node-name: %w", err)
	}
	if c.NodeIPs, err = parseAddrs("node-ip", n.nodeIPs); err != nil {
		return c, err
	}
	if c.ExternalIPs, err = parseAddrs("node-external-ip", n.externalIPs); err != nil {
		return c, err
	}
	switch n.flannelBackend {
	case "wireguard-native", "wireguard":
		c.DataPlane = true
	case "none":
	default:
		return c, fmt.Errorf("--flannel-backend=%s is not supported: use wireguard-native or none", n.flannelBackend)
	}
	mode, err := mesh.ParseMode(n.wgMode)
	if err != nil {
		return c, fmt.Errorf("--wireguard-mode: %w", err)
	}
	c.WireGuard = mesh.Config{ListenPort: n.wgPort, Mode: mode, MTU: n.wgMTU}
	if err := n.tunnel.apply(&c); err != nil {
		return c, err
	}
	c.NodeName, c.DataDir, c.CNIConfDir, c.Logger, c.Relay = n.nodeName, n.dataDir, n.cniConfDir, log, n.relay
	if err := n.vpn.apply(&c, log); err != nil {
		return c, err
	}
	return c, nil
}

// readToken returns --token, or the content of --token-file.
func (n *nodeFlags) readToken() (string, error) {
	if n.token != "" && n.tokenFile != "" {
		return "", errors.New("give either --token or --token-file, not both")
	}
	if n.tokenFile == "" {
		return n.token, nil
	}
	b, err := os.ReadFile(n.tokenFile)
	if err != nil {
		return "", fmt.Errorf("--token-file: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// serverFlags are the flags of 'trellis server' beyond the node flags.
type serverFlags struct {
	tlsSANs         listFlag
	clusterCIDRs    listFlag
	port            int
	bind            string
	disableAgent    bool
	flannelExternal bool
	datastore       string
	agentToken      string
	kubeconfig      string
	kubeQPS         float64
	ha              haFlags // ha.go
}

func newServerFlags() (*flag.FlagSet, *nodeFlags, *serverFlags) {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	var n nodeFlags
	var sf serverFlags
	n.register(fs)
	fs.Var(&sf.tlsSANs, "tls-san", "extra host name or IP for the serving certificate (repeatable)")
	fs.Var(&sf.clusterCIDRs, "cluster-cidr", "pod address range(s) (default 10.42.0.0/16)")
	fs.IntVar(&sf.port, "https-listen-port", 6443, "HTTPS API port")
	fs.StringVar(&sf.bind, "bind-address", "", "address the HTTPS API listens on (default: all)")
	fs.BoolVar(&sf.disableAgent, "disable-agent", false, "do not run the node role on this server")
	fs.BoolVar(&sf.flannelExternal, "flannel-external-ip", false, "reach every node at its external IP")
	fs.StringVar(&sf.datastore, "datastore-endpoint", "", "datastore (default: SQLite in the data dir)")
	fs.StringVar(&sf.agentToken, "agent-token", "", "a second join token that joins agents only")
	fs.Float64Var(&sf.kubeQPS, "kube-api-qps", kube.DefaultQPS, "Kubernetes mode: requests per second to the API server at most (bursts of twice as many), almost all of them Node writes: two per new Node")
	fs.StringVar(&sf.kubeconfig, "kubeconfig", "", "follow the Nodes of this Kubernetes cluster: pod CIDRs from spec.podCIDRs, status on the Nodes (default: the in-cluster config when running in a pod; docs/kubernetes.md)")
	sf.ha.register(fs)
	return fs, &n, &sf
}

func runServer(ctx context.Context, args []string, stderr io.Writer, getenv func(string) string) error {
	fs, n, sf := newServerFlags()
	fs.SetOutput(stderr)
	if err := parse(fs, args, getenv, &n.config); err != nil {
		return err
	}
	if n.cleanup {
		return cleanupNode(ctx, n, stderr)
	}
	log, err := newLogger(stderr, n.logLevel, n.logFormat)
	if err != nil {
		return err
	}
	ac, err := n.agentConfig(log)
	if err != nil {
		return err
	}
	cidrs, err := parsePrefixes("cluster-cidr", sf.clusterCIDRs)
	if err != nil {
		return err
	}
	if !(sf.kubeQPS > 0 && sf.kubeQPS <= 10000) {
		return fmt.Errorf("--kube-api-qps=%v: want a number of requests per second above 0, at most 10000 (default %d)", sf.kubeQPS, kube.DefaultQPS)
	}
	tok, err := n.readToken()
	if err != nil {
		return err
	}
	sc := server.Config{
		DataDir: n.dataDir, NodeName: ac.NodeName, Port: sf.port, NodeIPs: ac.NodeIPs, ExternalIPs: ac.ExternalIPs,
		TLSSANs: sf.tlsSANs, ClusterCIDRs: cidrs, ForceExternal: sf.flannelExternal, Token: tok,
		DatastoreEndpoint: sf.datastore, Logger: log, AgentToken: sf.agentToken, HA: sf.ha.config(),
		Kube: sf.kubeConfig(kube.InCluster()),
	}
	if sc.Kube != nil {
		// client-go logs through klog where it has no context: into this log.
		klog.SetSlogLogger(log.With("component", "kubernetes"))
	}
	if sf.bind != "" {
		if sc.BindAddress, err = parseAddr("bind-address", sf.bind); err != nil {
			return err
		}
	}
	if err := startVPN(ctx, &ac, &sc); err != nil {
		return err
	}
	srv, err := server.Start(ctx, sc)
	if err != nil {
		return err
	}
	defer srv.Close()
	agentMetrics := processRegistry()
	stopMetrics, err := startMetrics(ctx, n.ops, log, agentMetrics, srv.Metrics())
	if err != nil {
		return err
	}
	defer stopMetrics()
	if n.ops.metricsAddr != "" {
		ac.Metrics = agentMetrics
	}
	if sf.disableAgent {
		<-ctx.Done()
		return nil
	}
	ac.ServerURL, ac.Token = srv.URL(), srv.Token()
	ac.ServerAliases = []string{srv.AdvertiseURL()}
	build := func() (*flag.FlagSet, *nodeFlags) { fs, n, _ := newServerFlags(); return fs, n }
	ac.Reload = watchReload(ctx, log, rereadExternalIPs(build, args, getenv))
	err = agent.Run(ctx, ac)
	if err != nil && ctx.Err() == nil {
		return fmt.Errorf("server's own node: %w", err)
	}
	<-ctx.Done()
	return nil
}

// kubeConfig returns the Kubernetes settings of the server: with
// --kubeconfig, or in a pod with a service account, the server follows
// the cluster's Nodes; otherwise nil.
func (sf *serverFlags) kubeConfig(inCluster bool) *kube.Config {
	if sf.kubeconfig == "" && !inCluster {
		return nil
	}
	return &kube.Config{Kubeconfig: sf.kubeconfig, QPS: float32(sf.kubeQPS)}
}

func parseAddr(flagName, v string) (a netip.Addr, err error) {
	as, err := parseAddrs(flagName, []string{v})
	if err != nil {
		return a, err
	}
	return as[0], nil
}

func runAgent(ctx context.Context, args []string, stderr io.Writer, getenv func(string) string) error {
	build := func() (*flag.FlagSet, *nodeFlags) {
		fs := flag.NewFlagSet("agent", flag.ContinueOnError)
		var n nodeFlags
		n.register(fs)
		n.serverURL = fs.String("server", "", "server URL, e.g. https://198.51.100.10:6443 (TRELLIS_URL)")
		return fs, &n
	}
	fs, n := build()
	fs.SetOutput(stderr)
	if err := parse(fs, args, getenv, &n.config); err != nil {
		return err
	}
	if n.cleanup {
		return cleanupNode(ctx, n, stderr)
	}
	log, err := newLogger(stderr, n.logLevel, n.logFormat)
	if err != nil {
		return err
	}
	ac, err := n.agentConfig(log)
	if err != nil {
		return err
	}
	if ac.Token, err = n.readToken(); err != nil {
		return err
	}
	ac.ServerURL = strings.TrimSuffix(*n.serverURL, "/")
	reg := processRegistry()
	stopMetrics, err := startMetrics(ctx, n.ops, log, reg)
	if err != nil {
		return err
	}
	defer stopMetrics()
	if n.ops.metricsAddr != "" {
		ac.Metrics = reg
	}
	ac.Reload = watchReload(ctx, log, rereadExternalIPs(build, args, getenv))
	err = agent.Run(ctx, ac)
	if errors.Is(err, agent.ErrDeleted) {
		<-ctx.Done() // stay down (a restart would re-join) until stopped
		return nil
	}
	return err
}

func adminFlags(fs *flag.FlagSet) *string {
	return fs.String("admin-config", cli.DefaultAdminConfig, "admin config written by the server (TRELLIS_ADMIN_CONFIG)")
}

// adminClient settles the parsed flags of an operator command from the
// environment (TRELLIS_ADMIN_CONFIG and the like) and loads the admin
// config they name.
func adminClient(fs *flag.FlagSet, getenv func(string) string) (*cli.Client, error) {
	if err := settle(fs, getenv, nil); err != nil {
		return nil, err
	}
	return cli.Load(fs.Lookup("admin-config").Value.String())
}

func runNodeDelete(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("node delete", flag.ContinueOnError)
	fs.SetOutput(stderr)
	adminFlags(fs)
	// Accept the name before or after the flags.
	var names []string
	for len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		names, args = append(names, args[0]), args[1:]
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	names = append(names, fs.Args()...)
	if len(names) == 0 {
		return errors.New("usage: trellis node delete NAME")
	}
	c, err := adminClient(fs, getenv)
	if err != nil {
		return err
	}
	for _, name := range names {
		if err := c.DeleteNode(ctx, name); err != nil {
			return fmt.Errorf("delete node %s: %w", name, err)
		}
		fmt.Fprintf(stdout, "node %s deleted\n", name)
	}
	return nil
}

func runPaths(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("paths", flag.ContinueOnError)
	fs.SetOutput(stderr)
	adminFlags(fs)
	output := fs.String("o", "table", "output format: table or json")
	if err := fs.Parse(args); err != nil {
		return err
	}
	c, err := adminClient(fs, getenv)
	if err != nil {
		return err
	}
	paths, err := c.Paths(ctx)
	if err != nil {
		return err
	}
	return cli.PrintPaths(stdout, paths, *output)
}

// nodeID returns the random id kept in DATA-DIR/agent/node-id, making it
// on first use.
func nodeID(dataDir string) (string, error) {
	path := filepath.Join(dataDir, "agent", "node-id")
	if b, err := os.ReadFile(path); err == nil {
		if id := strings.TrimSpace(string(b)); id != "" {
			return id, nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("--with-node-id: %w", err)
	}
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	id := hex.EncodeToString(b)
	if err := pki.WriteFileAtomic(path, []byte(id+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("--with-node-id: %w", err)
	}
	return id, nil
}
