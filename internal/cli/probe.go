package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/client"
)

// Probe asks node to ping targets from inside the node, through its
// tunnel to the agent's status port (0: api.DefaultStatusPort).
func (c *Client) Probe(ctx context.Context, node string, statusPort int, req client.ProbeRequest) (*api.ProbeReport, error) {
	rep, err := c.api.Probe(ctx, node, statusPort, req)
	return rep, c.explain(err)
}

// LocalStatus reads the status of the agent on this host from its
// 127.0.0.1 status endpoint.
func LocalStatus(ctx context.Context, port int) (*api.NodeStatus, error) {
	if port <= 0 {
		port = api.DefaultStatusPort
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	u := "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) + api.PathStatus
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("no agent answers on 127.0.0.1:%d (%v): is trellis running on this host (systemctl status trellis-agent)? With another --status-port, pass it here too; for another node use 'trellis status NODE'", port, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("the agent's status endpoint on 127.0.0.1:%d answered %s", port, resp.Status)
	}
	var st api.NodeStatus
	if err := json.NewDecoder(io.LimitReader(resp.Body, 8<<20)).Decode(&st); err != nil {
		return nil, fmt.Errorf("the agent's status endpoint on 127.0.0.1:%d sent no status: %w", port, err)
	}
	return &st, nil
}
