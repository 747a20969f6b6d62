package agent

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/internal/api"
)

// TestStreamNetmapsAppliesDeltas serves a whole netmap and deltas, one of
// them lost, and checks what the agent makes of them: whole netmaps from
// the deltas, and a stream ended (to reconnect) at the gap.
func TestStreamNetmapsAppliesDeltas(t *testing.T) {
	lines := []string{
		`{"version":3,"self":{"name":"me"},"peers":[{"name":"a"},{"name":"c"}]}`,
		``,
		`{"delta":{"version":4,"base":3,"peersChanged":[{"name":"b"}],"peersRemoved":["a"]}}`,
		`{"delta":{"version":6,"base":5,"peersRemoved":["c"]}}`, // 4 → 5 was lost
		`{"delta":{"version":7,"base":6}}`,
	}
	var query string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		query = r.URL.RawQuery
		_, _ = io.WriteString(w, strings.Join(lines, "\n")+"\n")
	}))
	defer srv.Close()
	c := &apiClient{base: srv.URL, http: srv.Client()}
	var got []string
	err := c.streamNetmaps(context.Background(), nil, func(nm api.NetMap, _ bool) {
		var names []string
		for _, p := range nm.Peers {
			names = append(names, p.Name)
		}
		got = append(got, nm.Self.Name+":"+strings.Join(names, ","))
	})
	if query != api.NetmapDeltasParam+"=1" {
		t.Errorf("query %q does not ask for deltas", query)
	}
	if strings.Join(got, " ") != "me:a,c me:b,c" {
		t.Errorf("netmaps = %q, want the whole one and one delta applied", got)
	}
	if err == nil || !strings.Contains(err.Error(), "does not apply to version 4") {
		t.Errorf("err = %v, want the gap named", err)
	}
}

// TestStreamNetmapsResumes: given the netmap a stream ended with, the
// agent tells the server (version and digest) and applies a first line
// that is a delta to it.
func TestStreamNetmapsResumes(t *testing.T) {
	last := api.NetMap{Version: 7, Self: api.Node{Name: "me"}, Peers: []api.Peer{{Name: "b"}}}
	digest, err := last.Digest()
	if err != nil {
		t.Fatal(err)
	}
	var have string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		have = r.URL.Query().Get(api.NetmapHaveParam)
		_, _ = io.WriteString(w, `{"delta":{"version":9,"base":7,"serverName":"s2"}}`+"\n")
	}))
	defer srv.Close()
	c := &apiClient{base: srv.URL, http: srv.Client()}
	var got []api.NetMap
	_ = c.streamNetmaps(context.Background(), &last, func(nm api.NetMap, delta bool) {
		if !delta {
			t.Error("a delta line reported as a whole netmap")
		}
		got = append(got, nm)
	})
	if v, d, err := api.ParseHave(have); err != nil || v != 7 || d != digest {
		t.Errorf("have=%q (%v), want version 7 and the netmap's digest", have, err)
	}
	if len(got) != 1 || got[0].Version != 9 || got[0].ServerName != "s2" || len(got[0].Peers) != 1 || got[0].Peers[0].Name != "b" {
		t.Errorf("netmaps = %+v, want the last one moved to version 9", got)
	}
}
