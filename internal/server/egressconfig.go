package server

import (
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/pki"
)

// Transports of the egress (EgressConfig.Transport).
const (
	EgressUDS = "uds"
	EgressTCP = "tcp"
)

// EgressConfig says what WriteEgressConfig writes: the file for
// kube-apiserver's --egress-selector-config-file, and for the TCP
// transport the egress client credential it names.
type EgressConfig struct {
	// DataDir is the Trellis server's --data-dir. Required.
	DataDir string
	// Transport is EgressUDS (the unix socket in the data dir; the
	// apiserver runs on this machine) or EgressTCP (the HTTPS port, with
	// a client certificate of kind egress).
	Transport string
	// ServerURL is the Trellis server for EgressTCP, e.g.
	// https://127.0.0.1:6443.
	ServerURL string
	// Output is the configuration file to write. Required.
	Output string
	// CertDir receives egress-ca.crt, egress.crt and egress.key for
	// EgressTCP; default the directory of Output.
	CertDir string
	// Name is the common name of the egress certificate; default
	// "kube-apiserver".
	Name string
	// TTL of the egress certificate; default one year.
	TTL time.Duration
}

// egressConfigTemplate is the EgressSelectorConfiguration with one egress,
// "cluster": kubelets, pods, services and aggregated API servers.
const egressConfigTemplate = `# Written by 'trellis egress-config': kube-apiserver reaches kubelets
# (logs, exec, attach, port-forward), pods and services through the
# Trellis tunnels. Pass it as --egress-selector-config-file=%s
apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: HTTPConnect
    transport:
%s`

// WriteEgressConfig writes the egress configuration (and, for EgressTCP, a
// new egress credential issued by the cluster's CA in the data dir) and
// returns the paths written.
func WriteEgressConfig(c EgressConfig) ([]string, error) {
	if c.DataDir == "" || c.Output == "" {
		return nil, errors.New("egress config: the data dir and the output file are required")
	}
	if !filepath.IsAbs(c.Output) {
		abs, err := filepath.Abs(c.Output)
		if err != nil {
			return nil, err
		}
		c.Output = abs
	}
	srvDir := filepath.Join(c.DataDir, "server")
	var transport string
	var written []string
	switch c.Transport {
	case EgressUDS, "":
		sock, err := filepath.Abs(filepath.Join(srvDir, EgressSocketName))
		if err != nil {
			return nil, err
		}
		transport = fmt.Sprintf("      uds:\n        udsName: %s\n", sock)
	case EgressTCP:
		u, err := url.Parse(c.ServerURL)
		if err != nil || u.Scheme != "https" || u.Host == "" {
			return nil, fmt.Errorf("egress config: server URL %q is not https://HOST:PORT", c.ServerURL)
		}
		tlsDir := filepath.Join(srvDir, "tls")
		if _, err := os.Stat(filepath.Join(tlsDir, pki.CAKeyFile)); errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("egress config: %s has no cluster CA (%s); run this on a Trellis server's machine, or give its --data-dir", c.DataDir, filepath.Join(tlsDir, pki.CAKeyFile))
		}
		ca, err := pki.LoadOrCreateCA(tlsDir)
		if err != nil {
			return nil, fmt.Errorf("egress config: %w", err)
		}
		if c.Name == "" {
			c.Name = "kube-apiserver"
		}
		if c.TTL == 0 {
			c.TTL = 365 * 24 * time.Hour
		}
		certPEM, keyPEM, err := ca.IssueClient(c.Name, pki.OrgEgress, c.TTL)
		if err != nil {
			return nil, fmt.Errorf("egress config: issue the egress certificate: %w", err)
		}
		dir := c.CertDir
		if dir == "" {
			dir = filepath.Dir(c.Output)
		}
		if dir, err = filepath.Abs(dir); err != nil {
			return nil, err
		}
		caPath, certPath, keyPath := filepath.Join(dir, "egress-ca.crt"), filepath.Join(dir, "egress.crt"), filepath.Join(dir, "egress.key")
		for _, f := range []struct {
			path string
			data []byte
			mode os.FileMode
		}{{caPath, ca.CertPEM(), 0o644}, {certPath, certPEM, 0o644}, {keyPath, keyPEM, 0o600}} {
			if err := os.MkdirAll(filepath.Dir(f.path), 0o755); err != nil {
				return nil, err
			}
			if err := pki.WriteFileAtomic(f.path, f.data, f.mode); err != nil {
				return nil, fmt.Errorf("egress config: %w", err)
			}
			written = append(written, f.path)
		}
		transport = fmt.Sprintf("      tcp:\n        url: %s\n        tlsConfig:\n          caBundle: %s\n          clientCert: %s\n          clientKey: %s\n",
			strings.TrimSuffix(c.ServerURL, "/"), caPath, certPath, keyPath)
	default:
		return nil, fmt.Errorf("egress config: transport %q: use %s or %s", c.Transport, EgressUDS, EgressTCP)
	}
	if err := os.MkdirAll(filepath.Dir(c.Output), 0o755); err != nil {
		return nil, err
	}
	if err := pki.WriteFileAtomic(c.Output, fmt.Appendf(nil, egressConfigTemplate, c.Output, transport), 0o644); err != nil {
		return nil, fmt.Errorf("egress config: %w", err)
	}
	return append(written, c.Output), nil
}
