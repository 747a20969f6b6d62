package cli

import (
	"context"

	"github.com/trellis-mesh/trellis/internal/api"
)

// LeaveServer asks the server of the admin config to leave the cluster
// of highly available servers (api.PathServerLeave).
func (c *Client) LeaveServer(ctx context.Context) (api.ServerLeaveResponse, error) {
	out, err := c.api.LeaveServer(ctx)
	return out, c.explain(err)
}
