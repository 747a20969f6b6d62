package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
)

// ProbeRequest is what a node is asked to ping (see api.PathProbe).
type ProbeRequest struct {
	Targets []netip.Addr
	// Count is the number of small echo requests per target (0: the
	// agent's default).
	Count int
	// Size is the size of the large probe: negative for the node's tunnel
	// MTU, 0 for none.
	Size int
}

func (r ProbeRequest) query() string {
	q := url.Values{}
	for _, t := range r.Targets {
		q.Add("target", t.String())
	}
	if r.Count > 0 {
		q.Set("count", strconv.Itoa(r.Count))
	}
	if r.Size >= 0 {
		q.Set("size", strconv.Itoa(r.Size))
	}
	return q.Encode()
}

// Probe asks node to ping targets from inside the node, through its
// tunnel to the agent's status port (0: api.DefaultStatusPort).
func (c *Client) Probe(ctx context.Context, node string, statusPort int, req ProbeRequest) (*api.ProbeReport, error) {
	if statusPort <= 0 {
		statusPort = api.DefaultStatusPort
	}
	hc := &http.Client{Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return c.DialNode(ctx, node, statusPort)
		},
	}}
	defer hc.CloseIdleConnections()
	return getProbe(ctx, hc, "http://"+node+api.PathProbe+"?"+req.query())
}

func getProbe(ctx context.Context, hc *http.Client, u string) (*api.ProbeReport, error) {
	hr, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(hr)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode == http.StatusNotFound {
		return nil, fmt.Errorf("the agent has no probe endpoint: upgrade trellis on the node")
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("probe answered %s: %s", resp.Status, body)
	}
	var rep api.ProbeReport
	if err := json.Unmarshal(body, &rep); err != nil {
		return nil, fmt.Errorf("probe answer: %w", err)
	}
	return &rep, nil
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
