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
	err := c.streamNetmaps(context.Background(), func(nm api.NetMap) {
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
