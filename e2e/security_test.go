//go:build e2e

package e2e

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/pki"
)

// rogueRequest is one HTTP call the rogue helper makes.
type rogueRequest struct {
	What   string `json:"what"`
	Method string `json:"method"`
	Path   string `json:"path"`
	Body   string `json:"body,omitempty"`
	Bearer string `json:"bearer,omitempty"`
	// Want is the status that proves the action was refused.
	Want int `json:"want"`
}

type rogueSpec struct {
	Server   string         `json:"server"`
	CAFile   string         `json:"caFile"`
	CertFile string         `json:"certFile"`
	KeyFile  string         `json:"keyFile"`
	Requests []rogueRequest `json:"requests"`
}

type rogueResult struct {
	What   string `json:"what"`
	Status int    `json:"status"`
	Body   string `json:"body"`
}

func init() { extraHelpers["rogue"] = rogue }

// rogue runs the requests of the spec file named by arg with the given
// node credential and prints the results as JSON.
func rogue(arg string) error {
	b, err := os.ReadFile(arg)
	if err != nil {
		return err
	}
	var spec rogueSpec
	if err := json.Unmarshal(b, &spec); err != nil {
		return err
	}
	ca, err := os.ReadFile(spec.CAFile)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	cert, err := tls.LoadX509KeyPair(spec.CertFile, spec.KeyFile)
	if err != nil {
		return err
	}
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		RootCAs: pool, Certificates: []tls.Certificate{cert}}}}
	var out []rogueResult
	for _, r := range spec.Requests {
		req, err := http.NewRequest(r.Method, spec.Server+r.Path, strings.NewReader(r.Body))
		if err != nil {
			return err
		}
		if r.Bearer != "" {
			req.Header.Set("Authorization", "Bearer "+r.Bearer)
		}
		res := rogueResult{What: r.What}
		resp, err := c.Do(req)
		if err != nil {
			res.Body = err.Error()
		} else {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			res.Status, res.Body = resp.StatusCode, string(body)
		}
		out = append(out, res)
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}

// storeDump is what the store holds about the nodes, without the fields
// the server computes on the fly.
func storeDump(t *testing.T, c *cluster) string {
	t.Helper()
	nodes, err := c.nodes()
	if err != nil {
		t.Fatal(err)
	}
	for name, n := range nodes {
		n.Ready = false
		n.Tunnel = nil
		nodes[name] = n
	}
	b, _ := json.MarshalIndent(nodes, "", " ")
	return string(b)
}

// TestRogueNodeIsRefused is issue 7's end-to-end test: a process holding a
// valid node credential (and a stolen join token) tries every forbidden
// action against a live server; each fails with the right status, the
// mesh keeps working and no stored record changes.
func TestRogueNodeIsRefused(t *testing.T) {
	lab := NewLab(t)
	c := newCluster(t, lab)
	c1 := lab.Cloud("cloud1", "198.51.100.10/24", "10.1.0.10/24")
	c2 := lab.Cloud("cloud2", "203.0.113.20/24", "10.2.0.20/24")
	c3 := lab.Cloud("cloud3", "192.0.2.30/24", "10.3.0.30/24")
	rogueNode := lab.Cloud("rogue", "198.18.0.66/24", "10.9.0.66/24")
	server := c.startServer(c1)
	a2 := c.startAgent(c2)
	a3 := c.startAgent(c3)
	three := []*member{server, a2, a3}
	for _, m := range three {
		c.attachPod(m)
	}
	c.waitNodes(three...)
	c.checkPods("before the attack", three, three, meshTimeout)
	// Wait until the agents' reports have settled: two dumps a second
	// apart agree.
	var before string
	WaitFor(t, 30*time.Second, "the stored records to settle", func() error {
		a := storeDump(t, c)
		time.Sleep(time.Second)
		if before = storeDump(t, c); a != before {
			return errors.New("records still changing")
		}
		return nil
	})

	// The rogue holds cloud2's node credential, copied off the machine.
	agentDir := filepath.Join(a2.dataDir, "agent")
	wrongPassword := `{"nodeName":"cloud3","nodePassword":"not-the-password-of-cloud3","publicKey":"` + api.Key{1}.String() + `","csr":"` + csrJSON(t) + `","listenPort":51820}`
	asServer := `{"nodeName":"cloud1","nodePassword":"not-the-password-of-cloud1","publicKey":"` + api.Key{2}.String() + `","csr":"` + csrJSON(t) + `","listenPort":51820}`
	huge := `{"internalIPs":["` + strings.Repeat("1", 2<<20) + `"]}`
	reqs := []rogueRequest{
		{"list nodes", "GET", api.PathNodes, "", "", 403},
		{"delete another node", "DELETE", api.PathNodes + "/cloud3", "", "", 403},
		{"delete itself", "DELETE", api.PathNodes + "/cloud2", "", "", 403},
		{"list paths", "GET", api.PathPaths, "", "", 403},
		{"create a join token", "POST", api.PathTokens, `{"ttl":3600}`, "", 403},
		{"list join tokens", "GET", api.PathTokens, "", "", 403},
		{"rotate the server token", "POST", api.PathTokens + "/rotate-server", "", "", 403},
		{"another node's status through its tunnel", "GET", api.PathNodes + "/cloud3/status", "", "", 403},
		{"proxy to another node", "GET", api.PathNodes + "/cloud3/proxy/22", "", "", 403},
		{"claim a pod CIDR in a report", "PUT", api.PathReport, `{"podCIDRs":["10.42.0.0/16"]}`, "", 400},
		{"loopback endpoint", "PUT", api.PathReport, `{"externalIPs":["127.0.0.1"]}`, "", 400},
		{"link-local endpoint", "PUT", api.PathReport, `{"internalIPs":["169.254.10.1"]}`, "", 400},
		{"unspecified endpoint", "PUT", api.PathReport, `{"externalIPs":["0.0.0.0"]}`, "", 400},
		{"observation of a node that does not exist", "PUT", api.PathReport, `{"observations":[{"peer":"ghost","handshake":"ok"}]}`, "", 400},
		{"loopback observation", "PUT", api.PathReport, `{"observations":[{"peer":"cloud3","endpoint":"127.0.0.1:51820","handshake":"ok"}]}`, "", 400},
		{"truncated report", "PUT", api.PathReport, `{"externalIPs":["203.0.113.`, "", 400},
		{"huge report", "PUT", api.PathReport, huge, "", 400},
		{"join with a forged token", "POST", api.PathJoin, wrongPassword, "K10" + strings.Repeat("0", 64) + "::server:guess", 401},
		{"take over another node's name with the stolen token", "POST", api.PathJoin, wrongPassword, c.token, 409},
		{"take over the server's name with the stolen token", "POST", api.PathJoin, asServer, c.token, 409},
	}
	spec := rogueSpec{
		Server:   "https://" + netip.AddrPortFrom(c1.PublicIP, serverPort).String(),
		CAFile:   filepath.Join(agentDir, "ca.crt"),
		CertFile: filepath.Join(agentDir, "node.crt"),
		KeyFile:  filepath.Join(agentDir, "node.key"),
		Requests: reqs,
	}
	specFile := filepath.Join(lab.TempDir("rogue"), "spec.json")
	b, _ := json.Marshal(spec)
	if err := os.WriteFile(specFile, b, 0o600); err != nil {
		t.Fatal(err)
	}
	self, _ := os.Executable()
	out, err := lab.Output(rogueNode.NS, "env", helperEnv+"=rogue", self, specFile)
	if err != nil {
		t.Fatalf("rogue helper: %v: %s", err, out)
	}
	var results []rogueResult
	if err := json.Unmarshal([]byte(out), &results); err != nil {
		t.Fatalf("rogue output %q: %v", out, err)
	}
	for i, r := range results {
		want := reqs[i].Want
		if r.Status != want {
			t.Errorf("rogue: %s: got %d %s, want %d", r.What, r.Status, r.Body, want)
		} else {
			var ae api.Error
			if json.Unmarshal([]byte(r.Body), &ae) != nil || ae.Message == "" {
				t.Errorf("rogue: %s: refused with %d but no error message: %q", r.What, r.Status, r.Body)
			}
		}
	}

	c.checkPods("after the attack", three, three, meshTimeout)
	if after := storeDump(t, c); after != before {
		t.Errorf("stored records changed during the attack:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	// No secret in any log line.
	tok := c.token[strings.LastIndex(c.token, ":")+1:]
	for _, m := range three {
		secrets := map[string]string{"join token secret": tok}
		for _, f := range []string{"node-password", "wireguard.key"} {
			if b, err := os.ReadFile(filepath.Join(m.dataDir, "agent", f)); err == nil {
				secrets[f] = strings.TrimSpace(string(b))
			}
		}
		// The harness heads each log with the command line ("=== ...
		// start: ..."), which holds the token by the test's own choice;
		// only what trellis wrote counts.
		var lines []string
		for _, l := range strings.Split(m.proc.Log(), "\n") {
			if !strings.HasPrefix(l, "=== ") {
				lines = append(lines, l)
			}
		}
		log := strings.Join(lines, "\n")
		for what, sec := range secrets {
			if sec != "" && strings.Contains(log, sec) {
				t.Errorf("%s's log contains its %s", m.Name, what)
			}
		}
		for _, f := range []string{"agent/node-password", "agent/wireguard.key", "agent/node.key"} {
			if st, err := os.Stat(filepath.Join(m.dataDir, f)); err != nil || st.Mode().Perm()&0o077 != 0 {
				t.Errorf("%s: %s: mode %v, err %v; want 0600", m.Name, f, st.Mode(), err)
			}
		}
	}
}

func csrJSON(t *testing.T) string {
	_, csr, err := pki.NewKeyAndCSR()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(csr) // []byte → base64, as in api.JoinRequest
	return string(bytes.Trim(b, `"`))
}
