package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/agent"
	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/cli"
)

// tunnelFlags are the agent's tunnel flags.
type tunnelFlags struct {
	statusPort  int
	kubeletPort int
	allowPorts  listFlag
}

func (t *tunnelFlags) register(fs *flag.FlagSet) {
	fs.IntVar(&t.statusPort, "status-port", api.DefaultStatusPort, "127.0.0.1 port of the agent's status endpoint, always reachable by the server through the tunnel (-1: off)")
	fs.Var(&t.allowPorts, "tunnel-allow-port", "port the server may reach through the tunnel on 127.0.0.1 and the node's addresses, for 'trellis proxy' (repeatable)")
	fs.IntVar(&t.kubeletPort, "kubelet-port", api.DefaultKubeletPort, "the kubelet's port: kube-apiserver reaches it on the node's addresses through the tunnel (trellis egress-config)")
}

// apply maps the tunnel flags onto c.
func (t *tunnelFlags) apply(c *agent.Config) error {
	c.StatusPort = t.statusPort
	c.KubeletPort = t.kubeletPort
	if c.StatusPort == 0 {
		c.StatusPort = -1 // 0 on the command line means off, as -1
	}
	for _, s := range t.allowPorts {
		p, err := parsePort(s)
		if err != nil {
			return fmt.Errorf("--tunnel-allow-port: %w", err)
		}
		c.TunnelAllowPorts = append(c.TunnelAllowPorts, p)
	}
	return nil
}

func parsePort(s string) (int, error) {
	p, err := strconv.Atoi(s)
	if err != nil || p < 1 || p > 65535 {
		return 0, fmt.Errorf("%q is not a TCP port (1-65535)", s)
	}
	return p, nil
}

// splitArgs takes the positional arguments before and after the flags.
func splitArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		pos, args = append(pos, args[0]), args[1:]
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	return append(pos, fs.Args()...), nil
}

func runProxy(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	adminConfig := adminFlags(fs)
	listen := fs.String("listen", "", "local address to listen on (default 127.0.0.1:PORT)")
	pos, err := splitArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 2 {
		return errors.New("usage: trellis proxy NODE PORT [--listen ADDR:PORT]")
	}
	node := pos[0]
	port, err := parsePort(pos[1])
	if err != nil {
		return fmt.Errorf("trellis proxy %s: port %w", node, err)
	}
	if err := settle(fs, getenv, nil); err != nil {
		return err
	}
	if *listen == "" {
		*listen = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	}
	c, err := cli.Load(*adminConfig)
	if err != nil {
		return err
	}
	// Fail now, not at the first connection, if the node refuses the port.
	pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	probe, err := c.DialNode(pctx, node, port)
	cancel()
	if err != nil {
		return fmt.Errorf("proxy to port %d on node %s: %w", port, node, err)
	}
	_ = probe.Close()
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w (choose another --listen address)", *listen, err)
	}
	log, err := newLogger(stderr, "info", "text")
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "forwarding %s to 127.0.0.1:%d on node %s; stop with Ctrl-C\n", ln.Addr(), port, node)
	return c.Proxy(ctx, node, port, ln, log)
}

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	adminConfig := adminFlags(fs)
	output := fs.String("o", "table", "output format: table or json")
	statusPort := statusPortFlag(fs)
	pos, err := splitArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 1 {
		return errors.New("usage: trellis status [NODE] [-o table|json] (without NODE: the agent on this host)")
	}
	if err := settle(fs, getenv, nil); err != nil {
		return err
	}
	if len(pos) == 0 {
		return runLocalStatus(ctx, stdout, *statusPort, *output)
	}
	c, err := cli.Load(*adminConfig)
	if err != nil {
		return err
	}
	st, err := c.NodeStatus(ctx, pos[0])
	if err != nil {
		return fmt.Errorf("status of node %s: %w", pos[0], err)
	}
	return cli.PrintStatus(stdout, st, *output, time.Now())
}
