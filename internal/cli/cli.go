// Package cli implements the operator commands: listing and deleting
// nodes with the admin credential.
package cli

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/api"
)

// DefaultAdminConfig is where the server writes the admin config with the
// default data dir.
const DefaultAdminConfig = "/var/lib/trellis/server/admin.yaml"

// AdminConfig is the file the server writes for operators.
type AdminConfig struct {
	Server                   string `json:"server"`
	CertificateAuthorityData string `json:"certificate-authority-data"`
	ClientCertificateData    string `json:"client-certificate-data"`
	ClientKeyData            string `json:"client-key-data"`
}

// Client calls the server's admin API.
type Client struct {
	base string
	http *http.Client
}

// Load reads an admin config and returns a client for it.
func Load(path string) (*Client, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("admin config %s does not exist: run this on a server, or point --admin-config (TRELLIS_ADMIN_CONFIG) at a copy of <data-dir>/server/admin.yaml", path)
		}
		return nil, fmt.Errorf("read admin config: %w", err)
	}
	var ac AdminConfig
	if err := yaml.UnmarshalStrict(b, &ac); err != nil {
		return nil, fmt.Errorf("admin config %s: %w", path, err)
	}
	dec := func(field, s string) ([]byte, error) {
		v, err := base64.StdEncoding.DecodeString(s)
		if err != nil || len(v) == 0 {
			return nil, fmt.Errorf("admin config %s: %s is missing or not base64", path, field)
		}
		return v, nil
	}
	ca, err := dec("certificate-authority-data", ac.CertificateAuthorityData)
	if err != nil {
		return nil, err
	}
	crt, err := dec("client-certificate-data", ac.ClientCertificateData)
	if err != nil {
		return nil, err
	}
	key, err := dec("client-key-data", ac.ClientKeyData)
	if err != nil {
		return nil, err
	}
	cert, err := tls.X509KeyPair(crt, key)
	if err != nil {
		return nil, fmt.Errorf("admin config %s: client certificate: %w", path, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("admin config %s: certificate-authority-data is not a PEM certificate", path)
	}
	if !strings.HasPrefix(ac.Server, "https://") {
		return nil, fmt.Errorf("admin config %s: server %q must be an https:// URL", path, ac.Server)
	}
	return &Client{base: strings.TrimSuffix(ac.Server, "/"), http: &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12,
		}},
	}}, nil
}

func (c *Client) do(ctx context.Context, method, path string, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the server at %s: %w", c.base, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("read answer from %s: %w", c.base, err)
	}
	if resp.StatusCode != http.StatusOK {
		var ae api.Error
		if json.Unmarshal(body, &ae) == nil && ae.Message != "" {
			return &ae
		}
		return fmt.Errorf("server answered %s", resp.Status)
	}
	if out == nil {
		return nil
	}
	return json.Unmarshal(body, out)
}

// Nodes lists the cluster's nodes.
func (c *Client) Nodes(ctx context.Context) ([]api.Node, error) {
	var nodes []api.Node
	err := c.do(ctx, http.MethodGet, api.PathNodes, &nodes)
	return nodes, err
}

// DeleteNode removes a node from the cluster.
func (c *Client) DeleteNode(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, api.PathNodes+"/"+name, nil)
}

// PrintNodes writes nodes as a table ("" or "table"), JSON ("json") or
// YAML ("yaml"), without colour; see PrintNodeList for the other options.
func PrintNodes(w io.Writer, nodes []api.Node, format string, now time.Time) error {
	return PrintNodeList(w, nodes, NodeListOptions{Format: format, Now: now})
}

func orNone(s string) string {
	if s == "" {
		return "<none>"
	}
	return s
}

func joinAddrs(as []netip.Addr) string {
	s := make([]string, len(as))
	for i, a := range as {
		s[i] = a.String()
	}
	return strings.Join(s, ",")
}

func joinPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

// Age formats a duration the way kubectl does: 45s, 12m, 5h, 3d.
func Age(d time.Duration) string {
	switch {
	case d < 0:
		return "0s"
	case d < 2*time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < 2*time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

// Paths lists how every node reaches every other.
func (c *Client) Paths(ctx context.Context) ([]api.Path, error) {
	var paths []api.Path
	err := c.do(ctx, http.MethodGet, api.PathPaths, &paths)
	return paths, err
}

// PrintPaths writes paths as a table or JSON.
func PrintPaths(w io.Writer, paths []api.Path, format string) error {
	switch format {
	case "json":
		if paths == nil {
			paths = []api.Path{}
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(paths)
	case "", "table":
		tw := tabwriter.NewWriter(w, 0, 4, 3, ' ', 0)
		fmt.Fprintln(tw, "FROM\tTO\tPATH\tVIA\tENDPOINT\tREASON")
		for _, p := range paths {
			ep := "<none>"
			if p.Endpoint.IsValid() {
				ep = p.Endpoint.String()
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", p.From, p.To, p.Kind, orNone(p.Via), ep, p.Reason)
		}
		return tw.Flush()
	}
	return fmt.Errorf("unknown output format %q: use table or json", format)
}
