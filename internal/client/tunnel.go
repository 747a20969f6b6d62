package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/tunnel"
)

// The calls that reach into a node through its supervisor tunnel.

// wsHandshakeTimeout bounds the websocket handshake of DialNode.
const wsHandshakeTimeout = 20 * time.Second

// DialNode opens a connection to 127.0.0.1:port on node, carried by the
// server through the node's tunnel (a websocket to
// PathNodes/NODE/proxy/PORT; admin). A refusal (the node's tunnel is
// down, the node does not allow the port) is an *Error whose message
// says what to do.
func (c *Client) DialNode(ctx context.Context, node string, port int) (net.Conn, error) {
	op := "dial port " + strconv.Itoa(port) + " of node " + node
	tc := c.tls.Clone()
	tc.NextProtos = []string{"http/1.1"}
	d := websocket.Dialer{
		NetDialContext:   c.dialer.DialContext,
		TLSClientConfig:  tc,
		HandshakeTimeout: wsHandshakeTimeout,
		ReadBufferSize:   32 << 10,
		WriteBufferSize:  32 << 10,
	}
	u := "wss" + strings.TrimPrefix(c.base, "https") + nodePath(node) + "/proxy/" + strconv.Itoa(port)
	ws, resp, err := d.DialContext(ctx, u, nil)
	if err != nil {
		if resp != nil {
			defer resp.Body.Close()
			if resp.StatusCode/100 != 2 {
				return nil, c.wrap(op, decodeError(resp))
			}
		}
		return nil, c.wrap(op, &UnreachableError{Err: err})
	}
	return tunnel.NewConn(ws, tunnel.Timing{}), nil
}

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

// Probe asks node to ping targets from inside the node: api.PathProbe of
// the node's agent, on its status port (0: api.DefaultStatusPort),
// reached through DialNode. Failing to reach the agent is DialNode's
// error. The pings take about a second per small probe: Probe runs until
// the answer comes or ctx ends, not bounded by Config.Timeout.
func (c *Client) Probe(ctx context.Context, node string, statusPort int, req ProbeRequest) (*api.ProbeReport, error) {
	if statusPort <= 0 {
		statusPort = api.DefaultStatusPort
	}
	var (
		mu      sync.Mutex
		dialErr error // guarded by mu
	)
	hc := &http.Client{Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			conn, err := c.DialNode(ctx, node, statusPort)
			mu.Lock()
			dialErr = err
			mu.Unlock()
			return conn, err
		},
	}}
	defer hc.CloseIdleConnections()
	hr, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+node+api.PathProbe+"?"+req.query(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(hr)
	if err != nil {
		mu.Lock()
		defer mu.Unlock()
		if dialErr != nil {
			return nil, dialErr
		}
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		return nil, errors.New("the agent has no probe endpoint: upgrade trellis on the node")
	}
	if resp.StatusCode != http.StatusOK {
		e := decodeError(resp)
		return nil, fmt.Errorf("probe answered %s: %s", e.StatusLine(), e.API.Message)
	}
	var rep api.ProbeReport
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxAnswer)).Decode(&rep); err != nil {
		return nil, fmt.Errorf("probe answer: %w", err)
	}
	return &rep, nil
}
