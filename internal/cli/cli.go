// Package cli implements the operator commands: listing and deleting
// nodes with the admin credential.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/client"
)

// DefaultAdminConfig is where the server writes the admin config with the
// default data dir.
const DefaultAdminConfig = "/var/lib/trellis/server/admin.yaml"

// Client calls the server's admin API for the operator commands: a
// client.Client whose errors read as the commands print them (see
// explain).
type Client struct {
	api *client.Client
}

// Load reads an admin config and returns a client for it.
func Load(path string) (*Client, error) {
	cfg, err := client.ReadAdminConfig(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("admin config %s does not exist: run this on a server, or point --admin-config (TRELLIS_ADMIN_CONFIG) at a copy of <data-dir>/server/admin.yaml", path)
	}
	if err != nil {
		return nil, err
	}
	c, err := client.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("admin config %s: %w", path, err)
	}
	return &Client{api: c}, nil
}

// explain turns an error of the client into what the operator commands
// print: the server's own sentence for a refusal (an *api.Error), "server
// answered STATUS" for a refusal without one, "cannot reach the server
// at URL: ..." for a call it did not answer. Other errors (an answer that
// does not decode) keep the call and the server they name.
func (c *Client) explain(err error) error {
	var refused *client.Error
	var unreachable *client.UnreachableError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &refused) && !refused.Raw:
		ae := refused.API
		return &ae
	case errors.As(err, &refused):
		return fmt.Errorf("server answered %s", refused.StatusLine())
	case errors.As(err, &unreachable):
		return fmt.Errorf("cannot reach the server at %s: %w", c.api.Base(), unreachable.Err)
	}
	return err
}

// Nodes lists the cluster's nodes.
func (c *Client) Nodes(ctx context.Context) ([]api.Node, error) {
	nodes, err := c.api.Nodes(ctx)
	return nodes, c.explain(err)
}

// DeleteNode removes a node from the cluster.
func (c *Client) DeleteNode(ctx context.Context, name string) error {
	return c.explain(c.api.DeleteNode(ctx, name))
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
	paths, err := c.api.Paths(ctx)
	return paths, c.explain(err)
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
