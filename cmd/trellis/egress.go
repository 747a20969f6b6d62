package main

import (
	"context"
	"flag"
	"fmt"
	"io"

	"github.com/trellis-mesh/trellis/internal/server"
)

// runEgressConfig writes the file for kube-apiserver's
// --egress-selector-config-file (and the egress credential for the TCP
// transport).
func runEgressConfig(_ context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("egress-config", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dataDir := fs.String("data-dir", "/var/lib/trellis", "the Trellis server's data directory")
	transport := fs.String("transport", server.EgressUDS, "uds (the unix socket in the data dir: kube-apiserver on this machine) or tcp (the HTTPS port, with an egress client certificate)")
	serverURL := fs.String("server", "https://127.0.0.1:6443", "the Trellis server, for --transport tcp")
	output := fs.String("output", "/etc/trellis/egress-selector.yaml", "the file to write (kube-apiserver --egress-selector-config-file)")
	certDir := fs.String("cert-dir", "", "where --transport tcp writes egress-ca.crt, egress.crt and egress.key (default: the directory of --output)")
	name := fs.String("name", "kube-apiserver", "common name of the egress certificate")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if err := settle(fs, getenv, nil); err != nil {
		return err
	}
	files, err := server.WriteEgressConfig(server.EgressConfig{DataDir: *dataDir, Transport: *transport, ServerURL: *serverURL, Output: *output, CertDir: *certDir, Name: *name})
	if err != nil {
		return err
	}
	for _, f := range files {
		fmt.Fprintln(stdout, "wrote", f)
	}
	fmt.Fprintf(stdout, "start kube-apiserver with --egress-selector-config-file=%s\n", *output)
	return nil
}
