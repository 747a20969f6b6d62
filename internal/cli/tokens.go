package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
)

// CreateToken makes a join token for agents; ttl 0 never expires.
func (c *Client) CreateToken(ctx context.Context, ttl time.Duration, description string) (api.TokenInfo, error) {
	ti, err := c.api.CreateToken(ctx, ttl, description)
	return ti, c.explain(err)
}

// Tokens lists the created join tokens (without their secrets).
func (c *Client) Tokens(ctx context.Context) ([]api.TokenInfo, error) {
	ts, err := c.api.Tokens(ctx)
	return ts, c.explain(err)
}

// RevokeToken deletes a created join token.
func (c *Client) RevokeToken(ctx context.Context, id string) error {
	return c.explain(c.api.RevokeToken(ctx, id))
}

// RotateServerToken replaces the server token and returns the new one.
func (c *Client) RotateServerToken(ctx context.Context) (api.TokenInfo, error) {
	ti, err := c.api.RotateServerToken(ctx)
	return ti, c.explain(err)
}

// PrintTokens writes tokens as a table or JSON.
func PrintTokens(w io.Writer, tokens []api.TokenInfo, format string, now time.Time) error {
	switch format {
	case "json":
		if tokens == nil {
			tokens = []api.TokenInfo{}
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(tokens)
	case "", "table":
		tw := tabwriter.NewWriter(w, 0, 4, 3, ' ', 0)
		fmt.Fprintln(tw, "ID\tAGE\tEXPIRES\tDESCRIPTION")
		for _, t := range tokens {
			exp := "never"
			switch {
			case t.ExpiresAt.IsZero():
			case now.After(t.ExpiresAt):
				exp = "expired"
			default:
				exp = "in " + Age(t.ExpiresAt.Sub(now))
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", t.ID, Age(now.Sub(t.CreatedAt)), exp, t.Description)
		}
		return tw.Flush()
	}
	return fmt.Errorf("unknown output format %q: use table or json", format)
}
