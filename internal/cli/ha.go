package cli

import (
	"context"
	"net/http"

	"github.com/trellis-mesh/trellis/internal/api"
)

// LeaveServer asks the server of the admin config to leave the cluster
// of highly available servers (api.PathServerLeave).
func (c *Client) LeaveServer(ctx context.Context) (api.ServerLeaveResponse, error) {
	var out api.ServerLeaveResponse
	err := c.do(ctx, http.MethodPost, api.PathServerLeave, &out)
	return out, err
}
