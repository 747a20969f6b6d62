package client

import (
	"context"
	"net/http"

	"github.com/trellis-mesh/trellis/internal/api"
)

// The calls of a server joining another (highly available servers). Both
// take the server token (its String form) as the bearer token: they
// hand out the cluster CA's key.

// EtcdMembers lists the embedded etcd members of the server's cluster
// (GET api.PathEtcdMembers).
func (c *Client) EtcdMembers(ctx context.Context, serverToken string) (api.EtcdMembersResponse, error) {
	var out api.EtcdMembersResponse
	err := c.call(ctx, request{op: "list etcd members", method: http.MethodGet, path: api.PathEtcdMembers, bearer: serverToken, out: &out})
	return out, err
}

// JoinEtcd adds the calling server to the embedded etcd cluster, or with
// an empty PeerURL asks only for the cluster CA (POST
// api.PathEtcdMembers). A cluster that cannot take a member yet answers
// 503 (IsTemporary).
func (c *Client) JoinEtcd(ctx context.Context, serverToken string, req api.EtcdJoinRequest) (api.EtcdJoinResponse, error) {
	var out api.EtcdJoinResponse
	err := c.call(ctx, request{op: "join etcd cluster", method: http.MethodPost, path: api.PathEtcdMembers, bearer: serverToken, in: req, out: &out})
	return out, err
}
