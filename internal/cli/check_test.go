package cli

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/api"
)

// checkFixture is a healthy three-node cluster as the check sees it.
func checkFixture() CheckInput {
	nodes := testNodes()
	nodes[2].Ready, nodes[2].Tunnel = true, &api.TunnelStatus{Connected: true}
	in := CheckInput{Nodes: nodes, Statuses: map[string]*api.NodeStatus{}, StatusErrs: map[string]error{}, Probes: map[string]*api.ProbeReport{}, ProbeErrs: map[string]error{}}
	for _, a := range nodes {
		st := &api.NodeStatus{Name: a.Name, Time: testNow}
		rep := &api.ProbeReport{Node: a.Name, MTU: 1420}
		for _, b := range nodes {
			if a.Name == b.Name {
				continue
			}
			in.Paths = append(in.Paths, api.Path{From: a.Name, To: b.Name, Kind: api.PathDirect, Endpoint: netip.MustParseAddrPort("192.0.2.1:51820")})
			st.Peers = append(st.Peers, api.PeerStatus{Name: b.Name, LastHandshake: testNow.Add(-10 * time.Second)})
			tgt, _ := ProbeTarget(b)
			rep.Results = append(rep.Results, api.ProbeResult{Target: tgt, Sent: 3, Received: 3, RTT: time.Millisecond, LargeSize: 1420, LargeOK: true})
		}
		in.Statuses[a.Name], in.Probes[a.Name] = st, rep
	}
	return in
}

func pair(rep *api.CheckReport, from, to string) api.CheckPair {
	for _, p := range rep.Pairs {
		if p.From == from && p.To == to {
			return p
		}
	}
	return api.CheckPair{}
}

// lose makes from's probes of to go unanswered (large only if largeOnly).
func lose(in CheckInput, from, to string, largeOnly bool) {
	var tgt netip.Addr
	for _, n := range in.Nodes {
		if n.Name == to {
			tgt, _ = ProbeTarget(n)
		}
	}
	for i, r := range in.Probes[from].Results {
		if r.Target == tgt {
			in.Probes[from].Results[i].LargeOK = false
			if !largeOnly {
				in.Probes[from].Results[i].Received = 0
			}
		}
	}
}

func TestEvaluateHealthy(t *testing.T) {
	rep := Evaluate(checkFixture(), testNow)
	if !rep.OK || len(rep.Pairs) != 6 {
		t.Fatalf("want 6 working pairs, got %+v", rep)
	}
	var b bytes.Buffer
	if err := PrintCheck(&b, rep, FormatTable, false); err != nil {
		t.Fatalf("healthy check: %v", err)
	}
	if !strings.Contains(b.String(), "1.00ms") || !strings.Contains(b.String(), "all 6 pairs") {
		t.Errorf("matrix:\n%s", b.String())
	}
}

func TestEvaluateReasons(t *testing.T) {
	for _, tc := range []struct {
		name   string
		break_ func(in *CheckInput)
		from   string
		to     string
		want   string
	}{
		{"mtu black hole", func(in *CheckInput) { lose(*in, "a2", "a3", true) }, "a2", "a3", api.CheckMTUBlackHole},
		{"no handshake", func(in *CheckInput) {
			lose(*in, "a2", "a3", false)
			in.Statuses["a2"].Peers[1].LastHandshake = time.Time{}
		}, "a2", "a3", api.CheckNoHandshake},
		{"no handshake, no relay", func(in *CheckInput) {
			lose(*in, "a2", "a3", false)
			in.Nodes[0].Roles = []string{api.RoleAgent} // no relay left
			for i, p := range in.Paths {
				if p.From == "a2" && p.To == "a3" {
					in.Paths[i].Kind, in.Paths[i].Reason = api.PathNone, "direct handshake failed; no relay is ready"
				}
			}
		}, "a2", "a3", api.CheckNoHandshake},
		{"relay down", func(in *CheckInput) {
			lose(*in, "a2", "a3", false)
			in.Nodes[0].Ready = false
			for i, p := range in.Paths {
				if p.From == "a2" && p.To == "a3" {
					in.Paths[i].Kind, in.Paths[i].Via = api.PathRelayed, "srv"
				}
			}
		}, "a2", "a3", api.CheckRelayDown},
		{"route not approved", func(in *CheckInput) {
			lose(*in, "a2", "a3", false)
			in.Nodes[2].VPN = &api.VPNStatus{Provider: "tailscale", RoutesApproved: false}
		}, "a2", "a3", api.CheckRouteNotAppr},
		{"policy denies", func(in *CheckInput) {
			lose(*in, "a2", "a3", false)
			in.Nodes[2].VPN = &api.VPNStatus{Provider: "tailscale", RoutesApproved: false, PolicyDenies: true}
		}, "a2", "a3", api.CheckPolicyDenies},
		{"unreachable", func(in *CheckInput) {
			in.Statuses["a2"] = nil
			in.StatusErrs["a2"] = errors.New("tunnel down")
		}, "a2", "a3", api.CheckUnreachable},
		{"no reply", func(in *CheckInput) { lose(*in, "a2", "a3", false) }, "a2", "a3", api.CheckNoReply},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := checkFixture()
			tc.break_(&in)
			rep := Evaluate(in, testNow)
			p := pair(rep, tc.from, tc.to)
			if p.OK || p.Status != tc.want || rep.OK {
				t.Fatalf("want %s→%s to fail with %q, got %+v", tc.from, tc.to, tc.want, p)
			}
			if p.Detail == "" {
				t.Error("a failing pair needs a detail that says what to do")
			}
			if q := pair(rep, "srv", "a2"); !q.OK && tc.want != api.CheckRelayDown {
				t.Errorf("an unrelated pair fails: %+v", q)
			}
			var b bytes.Buffer
			err := PrintCheck(&b, rep, FormatTable, false)
			if !errors.Is(err, ErrCheckFailed) {
				t.Errorf("PrintCheck: want ErrCheckFailed, got %v", err)
			}
			if !strings.Contains(b.String(), tc.from+" → "+tc.to+": "+tc.want) {
				t.Errorf("the table does not name the pair and the reason:\n%s", b.String())
			}
		})
	}
}

func TestPrintCheckJSONAndYAML(t *testing.T) {
	in := checkFixture()
	lose(in, "a2", "a3", true)
	rep := Evaluate(in, testNow)
	for _, format := range []string{FormatJSON, FormatYAML} {
		var b bytes.Buffer
		if err := PrintCheck(&b, rep, format, false); !errors.Is(err, ErrCheckFailed) {
			t.Fatalf("%s: want ErrCheckFailed, got %v", format, err)
		}
		var back api.CheckReport
		var err error
		if format == FormatJSON {
			err = json.Unmarshal(b.Bytes(), &back)
		} else {
			err = yaml.UnmarshalStrict(b.Bytes(), &back)
		}
		if err != nil {
			t.Fatalf("%s does not parse back: %v", format, err)
		}
		if back.OK || len(back.Pairs) != 6 || pair(&back, "a2", "a3").Status != api.CheckMTUBlackHole || pair(&back, "srv", "a2").RTT != time.Millisecond {
			t.Errorf("%s round trip: %+v", format, back)
		}
	}
}
