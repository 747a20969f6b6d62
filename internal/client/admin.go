package client

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/api"
)

// The calls of an operator, with the admin credential.

// AdminConfig is the file a server writes for operators
// (<data-dir>/server/admin.yaml): where the server is and the admin
// credential, base64 PEM as in a kubeconfig.
type AdminConfig struct {
	Server                   string `json:"server"`
	CertificateAuthorityData string `json:"certificate-authority-data"`
	ClientCertificateData    string `json:"client-certificate-data"`
	ClientKeyData            string `json:"client-key-data"`
}

// ReadAdminConfig reads the admin config at path and returns the Config of
// a client with its credential. A missing file is an error that wraps
// os.ErrNotExist.
func ReadAdminConfig(path string) (Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("read admin config: %w", err)
	}
	cfg, err := ParseAdminConfig(b)
	if err != nil {
		return Config{}, fmt.Errorf("admin config %s: %w", path, err)
	}
	return cfg, nil
}

// ParseAdminConfig parses an admin config (YAML; unknown keys are errors)
// into the Config of a client with its credential.
func ParseAdminConfig(b []byte) (Config, error) {
	var ac AdminConfig
	if err := yaml.UnmarshalStrict(b, &ac); err != nil {
		return Config{}, err
	}
	dec := func(field, s string) ([]byte, error) {
		v, err := base64.StdEncoding.DecodeString(s)
		if err != nil || len(v) == 0 {
			return nil, fmt.Errorf("%s is missing or not base64", field)
		}
		return v, nil
	}
	ca, err := dec("certificate-authority-data", ac.CertificateAuthorityData)
	if err != nil {
		return Config{}, err
	}
	crt, err := dec("client-certificate-data", ac.ClientCertificateData)
	if err != nil {
		return Config{}, err
	}
	key, err := dec("client-key-data", ac.ClientKeyData)
	if err != nil {
		return Config{}, err
	}
	cert, err := tls.X509KeyPair(crt, key)
	if err != nil {
		return Config{}, fmt.Errorf("client certificate: %w", err)
	}
	if !x509.NewCertPool().AppendCertsFromPEM(ca) {
		return Config{}, errors.New("certificate-authority-data is not a PEM certificate")
	}
	cfg := Config{URL: ac.Server, CA: ca, Certificate: &cert}
	return cfg, cfg.Validate() // the URL
}

// nodePath is the path of node name under api.PathNodes.
func nodePath(name string) string { return api.PathNodes + "/" + url.PathEscape(name) }

// Nodes lists the cluster's nodes (api.PathNodes; admin).
func (c *Client) Nodes(ctx context.Context) ([]api.Node, error) {
	var nodes []api.Node
	err := c.call(ctx, request{op: "list nodes", method: http.MethodGet, path: api.PathNodes, out: &nodes})
	return nodes, err
}

// DeleteNode removes a node from the cluster (admin).
func (c *Client) DeleteNode(ctx context.Context, name string) error {
	return c.call(ctx, request{op: "delete node " + name, method: http.MethodDelete, path: nodePath(name)})
}

// NodeStatus fetches a node's own status through its tunnel (admin).
func (c *Client) NodeStatus(ctx context.Context, name string) (*api.NodeStatus, error) {
	var st api.NodeStatus
	if err := c.call(ctx, request{op: "status of node " + name, method: http.MethodGet, path: nodePath(name) + "/status", out: &st}); err != nil {
		return nil, err
	}
	return &st, nil
}

// Paths lists how every node reaches every other (api.PathPaths; admin).
func (c *Client) Paths(ctx context.Context) ([]api.Path, error) {
	var paths []api.Path
	err := c.call(ctx, request{op: "list paths", method: http.MethodGet, path: api.PathPaths, out: &paths})
	return paths, err
}

// CreateToken makes a join token for agents (api.PathTokens; admin); ttl
// 0 never expires, and is counted in whole seconds.
func (c *Client) CreateToken(ctx context.Context, ttl time.Duration, description string) (api.TokenInfo, error) {
	var ti api.TokenInfo
	req := api.TokenCreateRequest{TTL: int64(ttl / time.Second), Description: description}
	err := c.call(ctx, request{op: "create token", method: http.MethodPost, path: api.PathTokens, in: req, out: &ti})
	return ti, err
}

// Tokens lists the created join tokens, without their secrets (admin).
func (c *Client) Tokens(ctx context.Context) ([]api.TokenInfo, error) {
	var out []api.TokenInfo
	err := c.call(ctx, request{op: "list tokens", method: http.MethodGet, path: api.PathTokens, out: &out})
	return out, err
}

// RevokeToken deletes a created join token (admin).
func (c *Client) RevokeToken(ctx context.Context, id string) error {
	return c.call(ctx, request{op: "revoke token " + id, method: http.MethodDelete, path: api.PathTokens + "/" + url.PathEscape(id)})
}

// RotateServerToken replaces the server token and returns the new one
// (admin).
func (c *Client) RotateServerToken(ctx context.Context) (api.TokenInfo, error) {
	var ti api.TokenInfo
	err := c.call(ctx, request{op: "rotate server token", method: http.MethodPost, path: api.PathTokensRotateServer, out: &ti})
	return ti, err
}

// LeaveServer makes the server of c leave the cluster of highly available
// servers (api.PathServerLeave; admin).
func (c *Client) LeaveServer(ctx context.Context) (api.ServerLeaveResponse, error) {
	var out api.ServerLeaveResponse
	err := c.call(ctx, request{op: "leave", method: http.MethodPost, path: api.PathServerLeave, out: &out})
	return out, err
}
