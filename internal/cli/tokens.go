package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"text/tabwriter"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
)

// TokenInfo describes a join token; Token is set only when it was just
// created or rotated.
type TokenInfo struct {
	ID          string    `json:"id"`
	Description string    `json:"description,omitempty"`
	CreatedAt   time.Time `json:"createdAt"`
	ExpiresAt   time.Time `json:"expiresAt,omitzero"`
	Token       string    `json:"token,omitempty"`
}

func (c *Client) doJSON(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the server at %s: %w", c.base, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode >= 300 {
		var ae api.Error
		if json.Unmarshal(b, &ae) == nil && ae.Message != "" {
			return &ae
		}
		return fmt.Errorf("server answered %s", resp.Status)
	}
	if out == nil || len(b) == 0 {
		return nil
	}
	return json.Unmarshal(b, out)
}

// CreateToken makes a join token for agents; ttl 0 never expires.
func (c *Client) CreateToken(ctx context.Context, ttl time.Duration, description string) (TokenInfo, error) {
	var ti TokenInfo
	err := c.doJSON(ctx, http.MethodPost, api.PathTokens, map[string]any{"ttl": int64(ttl / time.Second), "description": description}, &ti)
	return ti, err
}

// Tokens lists the created join tokens (without their secrets).
func (c *Client) Tokens(ctx context.Context) ([]TokenInfo, error) {
	var out []TokenInfo
	err := c.doJSON(ctx, http.MethodGet, api.PathTokens, nil, &out)
	return out, err
}

// RevokeToken deletes a created join token.
func (c *Client) RevokeToken(ctx context.Context, id string) error {
	return c.doJSON(ctx, http.MethodDelete, api.PathTokens+"/"+id, nil, nil)
}

// RotateServerToken replaces the server token and returns the new one.
func (c *Client) RotateServerToken(ctx context.Context) (TokenInfo, error) {
	var ti TokenInfo
	err := c.doJSON(ctx, http.MethodPost, api.PathTokens+"/rotate-server", nil, &ti)
	return ti, err
}

// PrintTokens writes tokens as a table or JSON.
func PrintTokens(w io.Writer, tokens []TokenInfo, format string, now time.Time) error {
	switch format {
	case "json":
		if tokens == nil {
			tokens = []TokenInfo{}
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
