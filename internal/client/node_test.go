package client

import (
	"context"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
)

// tlsServer serves h over TLS on loopback and returns a client for it
// that trusts its certificate.
func tlsServer(t *testing.T, h http.HandlerFunc) *Client {
	t.Helper()
	srv := httptest.NewTLSServer(h)
	t.Cleanup(srv.Close)
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	c, err := New(Config{URL: srv.URL + "/", CA: ca})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// streamLines serves lines as a netmap stream and then ends it, or, with
// hold, keeps it open until the request ends. It records the query.
func streamLines(query *string, hold bool, lines ...string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		*query = r.URL.RawQuery
		_, _ = io.WriteString(w, strings.Join(lines, "\n")+"\n")
		w.(http.Flusher).Flush()
		if hold {
			<-r.Context().Done()
		}
	}
}

func peerNames(nm api.NetMap) string {
	var names []string
	for _, p := range nm.Peers {
		names = append(names, p.Name)
	}
	return nm.Self.Name + ":" + strings.Join(names, ",")
}

// TestStreamNetmapsAppliesDeltas serves a whole netmap and deltas, one of
// them lost, and checks what the client makes of them: whole netmaps from
// the deltas, and a stream ended (to reconnect) at the gap.
func TestStreamNetmapsAppliesDeltas(t *testing.T) {
	var query string
	c := tlsServer(t, streamLines(&query, false,
		`{"version":3,"self":{"name":"me"},"peers":[{"name":"a"},{"name":"c"}]}`,
		``,
		`{"delta":{"version":4,"base":3,"peersChanged":[{"name":"b"}],"peersRemoved":["a"]}}`,
		`{"delta":{"version":6,"base":5,"peersRemoved":["c"]}}`, // 4 → 5 was lost
		`{"delta":{"version":7,"base":6}}`,
	))
	var got []string
	var deltas []bool
	err := c.StreamNetmaps(context.Background(), nil, func(nm api.NetMap, delta bool) {
		got = append(got, peerNames(nm))
		deltas = append(deltas, delta)
	})
	if query != api.NetmapDeltasParam+"=1" {
		t.Errorf("query %q does not ask for deltas", query)
	}
	if strings.Join(got, " ") != "me:a,c me:b,c" || len(deltas) != 2 || deltas[0] || !deltas[1] {
		t.Errorf("netmaps = %q (deltas %v), want the whole one and one delta applied", got, deltas)
	}
	if err == nil || !strings.Contains(err.Error(), "does not apply to version 4") {
		t.Errorf("err = %v, want the gap named", err)
	}
}

// TestStreamNetmapsResumes: given the netmap a stream ended with, the
// client tells the server (version and digest) and applies a first line
// that is a delta to it.
func TestStreamNetmapsResumes(t *testing.T) {
	last := api.NetMap{Version: 7, Self: api.Node{Name: "me"}, Peers: []api.Peer{{Name: "b"}}}
	digest, err := last.Digest()
	if err != nil {
		t.Fatal(err)
	}
	var query string
	c := tlsServer(t, streamLines(&query, false, `{"delta":{"version":9,"base":7,"serverName":"s2"}}`))
	var got []api.NetMap
	_ = c.StreamNetmaps(context.Background(), &last, func(nm api.NetMap, delta bool) {
		if !delta {
			t.Error("a delta line reported as a whole netmap")
		}
		got = append(got, nm)
	})
	q, _ := url.ParseQuery(query)
	if v, d, err := api.ParseHave(q.Get(api.NetmapHaveParam)); err != nil || v != 7 || d != digest || q.Get(api.NetmapDeltasParam) != "1" {
		t.Errorf("query %q (%v), want deltas and version 7 with the netmap's digest", query, err)
	}
	if len(got) != 1 || got[0].Version != 9 || got[0].ServerName != "s2" || peerNames(got[0]) != "me:b" {
		t.Errorf("netmaps = %+v, want the last one moved to version 9", got)
	}
}

// TestStreamNetmapsEnds: each way a stream ends, with the error that
// says so.
func TestStreamNetmapsEnds(t *testing.T) {
	whole := `{"version":1,"self":{"name":"me"},"peers":[]}`
	for _, c := range []struct {
		name  string
		h     http.HandlerFunc
		ctx   time.Duration // cancel the caller's context after this
		match func(error) bool
	}{
		{"began with a delta", streamLines(new(string), true, `{"delta":{"version":2,"base":1}}`), 0,
			func(err error) bool { return err.Error() == "netmap stream began with a delta" }},
		{"closed by the server", streamLines(new(string), false, whole), 0,
			func(err error) bool { return err.Error() == "netmap stream closed by the server" }},
		{"silent", streamLines(new(string), true, whole, ""), 0,
			func(err error) bool { return strings.HasPrefix(err.Error(), "netmap stream silent for") }},
		{"not JSON", streamLines(new(string), true, `{"version":`), 0,
			func(err error) bool { return strings.HasPrefix(err.Error(), "decode netmap: ") }},
		{"context ends", streamLines(new(string), true, whole), 50 * time.Millisecond,
			func(err error) bool { return errors.Is(err, context.Canceled) }},
		{"refused", func(w http.ResponseWriter, _ *http.Request) {
			w.WriteHeader(http.StatusForbidden)
			_, _ = io.WriteString(w, `{"code":"node-deleted","message":"node me was deleted"}`)
		}, 0, func(err error) bool {
			var e *Error
			return errors.As(err, &e) && e.API.Code == api.ErrCodeNodeDeleted && IsPermanent(err) &&
				strings.HasPrefix(err.Error(), "netmap stream https://127.0.0.1:") && strings.HasSuffix(err.Error(), ": server refused (403 Forbidden): node me was deleted")
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			cl := tlsServer(t, c.h)
			cl.streamIdle = 200 * time.Millisecond
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if c.ctx > 0 {
				time.AfterFunc(c.ctx, cancel)
			}
			err := cl.StreamNetmaps(ctx, nil, func(api.NetMap, bool) {})
			if err == nil || !c.match(err) {
				t.Errorf("err = %v", err)
			}
		})
	}
}

// TestOpenNetmapStreamQuery: whole netmaps send no query; deltas with
// and without have=.
func TestOpenNetmapStreamQuery(t *testing.T) {
	var query string
	c := tlsServer(t, streamLines(&query, false, "{}"))
	for _, tc := range []struct {
		q    NetmapQuery
		want string
	}{
		{NetmapQuery{Whole: true}, ""},
		{NetmapQuery{}, "deltas=1"},
		{NetmapQuery{Have: "7.ab"}, "deltas=1&have=7.ab"},
	} {
		body, err := c.OpenNetmapStream(context.Background(), tc.q)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(body)
		body.Close()
		if query != tc.want || string(b) != "{}\n" {
			t.Errorf("%+v: query %q body %q, want query %q", tc.q, query, b, tc.want)
		}
	}
}
