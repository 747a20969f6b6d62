package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
)

// The calls of a node: join, netmap stream, reports.

// Ping calls api.PathPing, which answers without credentials.
func (c *Client) Ping(ctx context.Context) error {
	return c.call(ctx, request{op: "ping", method: http.MethodGet, path: api.PathPing})
}

// Join registers a node (api.PathJoin) with a join token (the bearer
// token, never in the body). The answer carries the node's certificate:
// later calls need a Client with it.
func (c *Client) Join(ctx context.Context, joinToken string, req api.JoinRequest) (*api.JoinResponse, error) {
	var jr api.JoinResponse
	if err := c.call(ctx, request{op: "join", method: http.MethodPost, path: api.PathJoin, bearer: joinToken, in: req, out: &jr}); err != nil {
		return nil, err
	}
	return &jr, nil
}

// Report tells the server about the calling node (api.PathReport; node
// certificate).
func (c *Client) Report(ctx context.Context, rep api.Report) error {
	return c.call(ctx, request{op: "report", method: http.MethodPut, path: api.PathReport, in: rep})
}

// streamIdle is how long a netmap stream may stay silent (the server
// sends a keepalive line every 15 s) before it is considered dead.
const streamIdle = 45 * time.Second

// NetmapQuery says what a netmap stream sends.
type NetmapQuery struct {
	// Whole asks for a whole netmap on every change, as agents did
	// before deltas; the default is deltas after the first line
	// (api.NetmapDeltasParam).
	Whole bool
	// Have, with deltas, is the api.NetmapHaveParam value of the netmap
	// the caller holds (api.FormatHave): the stream may then start with
	// a delta from it.
	Have string
}

func (q NetmapQuery) path() string {
	if q.Whole {
		return api.PathNetmap
	}
	v := url.Values{api.NetmapDeltasParam: {"1"}}
	if q.Have != "" {
		v.Set(api.NetmapHaveParam, q.Have)
	}
	return api.PathNetmap + "?" + v.Encode()
}

// OpenNetmapStream opens the calling node's netmap stream (api.PathNetmap;
// node certificate) and returns its body: one api.NetMapLine per line, an
// empty line as a keepalive. It stays open until ctx ends, the server
// ends it or the caller closes it. StreamNetmaps reads one for an agent;
// this is for callers that want the bytes.
func (c *Client) OpenNetmapStream(ctx context.Context, q NetmapQuery) (io.ReadCloser, error) {
	resp, err := c.send(ctx, request{method: http.MethodGet, path: q.path()})
	if err != nil {
		return nil, c.wrap("netmap stream", err)
	}
	return resp.Body, nil
}

// StreamNetmaps reads the calling node's netmap stream until ctx ends or
// the stream fails, calling fn for each netmap. It asks for deltas and
// applies them (api.NetMap.Apply): fn always gets a whole netmap, and
// whether it came as a delta. With last (the netmap an earlier stream
// ended with) the server may start from it instead of sending the whole
// netmap again (api.NetmapHaveParam). A stream silent for 45 s (three
// keepalives) is dropped.
//
// It returns ctx's error once ctx ends, else why the stream ended: the
// server refused it (an *Error: IsPermanent, api.ErrCodeNodeDeleted for
// a deleted node), a delta that does not apply (a lost line: open a new
// stream for a whole netmap), a silent or closed stream.
func (c *Client) StreamNetmaps(parent context.Context, last *api.NetMap, fn func(nm api.NetMap, delta bool)) error {
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	var (
		nm   api.NetMap
		have bool
		q    NetmapQuery
	)
	if last != nil {
		if d, err := last.Digest(); err == nil {
			q.Have = api.FormatHave(last.Version, d)
			nm, have = *last, true
		}
	}
	body, err := c.OpenNetmapStream(ctx, q)
	if err != nil {
		if parent.Err() != nil {
			return parent.Err()
		}
		return err
	}
	defer body.Close()
	idle := time.AfterFunc(c.streamIdle, cancel)
	defer idle.Stop()
	sc := bufio.NewScanner(body)
	sc.Buffer(make([]byte, 64<<10), 64<<20)
	for sc.Scan() {
		idle.Reset(c.streamIdle)
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue // keepalive
		}
		var l api.NetMapLine
		if err := json.Unmarshal(line, &l); err != nil {
			return fmt.Errorf("decode netmap: %w", err)
		}
		switch {
		case l.Delta == nil:
			nm, have = l.NetMap, true
		case !have:
			return errors.New("netmap stream began with a delta")
		default:
			if nm, err = nm.Apply(*l.Delta); err != nil {
				return err // a lost line: reconnect for a whole netmap
			}
		}
		fn(nm, l.Delta != nil)
	}
	switch {
	case parent.Err() != nil:
		return parent.Err()
	case ctx.Err() != nil:
		return fmt.Errorf("netmap stream silent for %s", c.streamIdle)
	case sc.Err() != nil:
		return fmt.Errorf("netmap stream: %w", sc.Err())
	}
	return errors.New("netmap stream closed by the server")
}
