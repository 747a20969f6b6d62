package mesh_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"github.com/trellis-mesh/trellis/internal/mesh"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"testing"

	"go.uber.org/goleak"
)

// nodeEnv makes the test binary act as one mesh node (see runNode).
const nodeEnv = "TRELLIS_MESH_TEST_NODE"

func TestMain(m *testing.M) {
	if os.Getenv(nodeEnv) == "1" {
		os.Exit(runNode())
	}
	goleak.VerifyTestMain(m)
}

// nodeRequest is one line on a node process's stdin.
type nodeRequest struct {
	Op       string // open, peers, reset, addrs, routes, status, statuscount, wg, close, remove, leaks
	Config   mesh.Config
	Peers    []mesh.Peer
	Key      [32]byte // reset
	Prefixes []netip.Prefix
}

// nodeResponse is one line on a node process's stdout.
type nodeResponse struct {
	Error  string            `json:",omitempty"`
	Kind   string            `json:",omitempty"`
	MTU    int               `json:",omitempty"`
	Status []mesh.PeerStatus `json:",omitempty"`
	Out    string            `json:",omitempty"`
}

// runNode serves nodeRequests against one mesh.Device, as a node process in
// its own network and mount namespace would (the e2e harness runs real
// agents the same way).
func runNode() int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	enc := json.NewEncoder(os.Stdout)
	var d *mesh.Device
	for in.Scan() {
		var req nodeRequest
		var resp nodeResponse
		err := json.Unmarshal(in.Bytes(), &req)
		if err == nil && d == nil && req.Op != "open" && req.Op != "leaks" {
			err = fmt.Errorf("%s before open", req.Op)
		}
		if err == nil {
			switch req.Op {
			case "open":
				d, err = mesh.Open(req.Config, log)
				if err == nil {
					resp.Kind, resp.MTU = d.Kind(), d.MTU()
				}
			case "peers":
				err = d.SetPeers(req.Peers)
			case "reset":
				err = d.ResetPeer(req.Key)
			case "addrs":
				err = d.SetAddresses(req.Prefixes)
			case "routes":
				err = d.SetRoutes(req.Prefixes)
			case "status":
				resp.Status, err = d.Status()
			case "statuscount": // Status without sending it back, for a benchmark
				var st []mesh.PeerStatus
				st, err = d.Status()
				resp.Out = fmt.Sprint(len(st))
			case "wg":
				var out []byte
				out, err = exec.Command("wg", "show", d.Name(), "dump").CombinedOutput()
				resp.Out = string(out)
			case "close":
				err = d.Close()
			case "remove":
				err = d.Remove()
			case "leaks":
				err = goleak.Find()
			default:
				err = fmt.Errorf("unknown op %q", req.Op)
			}
		}
		if err != nil {
			resp.Error = err.Error()
		}
		if err := enc.Encode(resp); err != nil {
			return 1
		}
	}
	if d != nil {
		d.Close()
	}
	return 0
}

func pfx(s ...string) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(s))
	for _, x := range s {
		out = append(out, netip.MustParsePrefix(x))
	}
	return out
}
