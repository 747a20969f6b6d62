package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/trellis-mesh/trellis/internal/kube/kubetest"
	"github.com/trellis-mesh/trellis/internal/loadgen"
)

// TestKubeMode runs the load generator as `make bench` does in Kubernetes
// mode, against a real kube-apiserver: N agents without Kubernetes, then N
// agents whose Nodes it creates through the API first, with Node
// deletions. It checks what the figures rest on (every change and every
// deletion reached every agent, the pod CIDRs came from the Nodes, the
// run's Nodes are gone afterwards) and logs the figures.
//
// TRELLIS_LOADGEN_KUBE_AGENTS sets N (default 40; `make bench` runs 1000)
// and TRELLIS_LOADGEN_OUT keeps loadgen.{json,md,png} there;
// TRELLIS_LOADGEN_SERVER_FLAGS adds flags to the servers (to profile them).
func TestKubeMode(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a kube-apiserver and a trellis server")
	}
	env := kubetest.Start(t, kubetest.Options{})
	bin := trellisBinary(t)
	n := 40
	if v := os.Getenv("TRELLIS_LOADGEN_KUBE_AGENTS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 5 {
			t.Fatalf("TRELLIS_LOADGEN_KUBE_AGENTS=%q: want a number of at least 5", v)
		}
	}
	out := os.Getenv("TRELLIS_LOADGEN_OUT")
	if out == "" {
		out = t.TempDir()
	}
	const deletes = 3
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	var stdout, stderr bytes.Buffer
	var progress io.Writer = &stderr
	if testing.Verbose() {
		progress = io.MultiWriter(&stderr, os.Stderr) // `make bench` shows it
	}
	args := []string{"-trellis", bin, "-agents", strconv.Itoa(n), "-kube-agents", strconv.Itoa(n), "-kubeconfig", env.AdminKubeconfig,
		"-changes", "3", "-node-deletes", strconv.Itoa(deletes), "-phase-timeout", "5m", "-out", out,
		"-server-flags", os.Getenv("TRELLIS_LOADGEN_SERVER_FLAGS")}
	if err := run(ctx, args, &stdout, progress); err != nil {
		t.Fatalf("trellis-loadgen %s: %v\n%s", strings.Join(args, " "), err, tail(stderr.String(), 40))
	}
	b, err := os.ReadFile(filepath.Join(out, "loadgen.json"))
	if err != nil {
		t.Fatal(err)
	}
	var rs []*loadgen.Result
	if err := json.Unmarshal(b, &rs); err != nil {
		t.Fatal(err)
	}
	if len(rs) != 2 || rs[0].Kube || !rs[1].Kube {
		t.Fatalf("got %d results (kube %v), want one without Kubernetes and one with", len(rs), kubeFlags(rs))
	}
	plain, kr := rs[0], rs[1]
	for _, r := range rs {
		if r.Joined != n || len(r.Changes) != 3 {
			t.Fatalf("%s: %d of %d joined, %d changes measured", mode(r), r.Joined, n, len(r.Changes))
		}
		for i, c := range r.Changes {
			if c.Delivered != n {
				t.Errorf("%s: change %d reached %d of %d agents", mode(r), i+1, c.Delivered, n)
			}
		}
	}
	if plain.Peers != n-1 || plain.PodCIDRPeers != n-1 {
		t.Errorf("without Kubernetes: %d peers, %d with a pod CIDR; want %d", plain.Peers, plain.PodCIDRPeers, n-1)
	}
	// Agent 0's netmap, read after the deletions: every peer whose Node
	// remains, each with its Node's pod CIDR.
	if want := n - 1 - deletes; kr.Peers != want || kr.PodCIDRPeers != want {
		t.Errorf("Kubernetes mode: %d peers, %d with a pod CIDR after %d Node deletions; want %d", kr.Peers, kr.PodCIDRPeers, deletes, want)
	}
	if len(kr.NodeDeletes) != deletes {
		t.Fatalf("%d Node deletions measured, want %d", len(kr.NodeDeletes), deletes)
	}
	for i, c := range kr.NodeDeletes {
		if want := n - 1 - i; c.Delivered != want {
			t.Errorf("Node deletion %d reached %d agents, want %d", i+1, c.Delivered, want)
		}
	}
	if kr.NodesTime <= 0 || kr.PodCIDRsTime <= 0 || kr.AnnotatedTime <= 0 {
		t.Errorf("Kubernetes phases not measured: Nodes %v, pod CIDRs %v, annotations %v", kr.NodesTime, kr.PodCIDRsTime, kr.AnnotatedTime)
	}
	if !strings.Contains(stdout.String(), "Kubernetes mode: a Node per agent") {
		t.Errorf("the table has no Kubernetes section:\n%s", stdout.String())
	}
	left, err := env.Admin(t).CoreV1().Nodes().List(ctx, metav1.ListOptions{LabelSelector: loadgen.LoadgenLabel + "=true"})
	if err != nil {
		t.Fatal(err)
	}
	if len(left.Items) != 0 {
		t.Errorf("%d of the run's Nodes are left, e.g. %s", len(left.Items), left.Items[0].Name)
	}
	t.Logf("measured: %d agents: Nodes created in %v, pod CIDRs in every netmap %v, annotations %v after the joins; Node deletion p99 %v",
		n, kr.NodesTime.Round(time.Millisecond), kr.PodCIDRsTime.Round(time.Millisecond), kr.AnnotatedTime.Round(time.Millisecond), kr.NodeDeleteP99.Round(time.Millisecond))
	t.Logf("measured: %d agents: fan-out p99 %v with Kubernetes, %v without (%.2f×); server RSS max %d MiB with, %d MiB without (%.2f×)",
		n, kr.FanoutP99.Round(time.Millisecond), plain.FanoutP99.Round(time.Millisecond), float64(kr.FanoutP99)/float64(plain.FanoutP99),
		kr.ServerRSSMax>>20, plain.ServerRSSMax>>20, float64(kr.ServerRSSMax)/float64(plain.ServerRSSMax))
}

func kubeFlags(rs []*loadgen.Result) []bool {
	var out []bool
	for _, r := range rs {
		out = append(out, r.Kube)
	}
	return out
}

// trellisBinary builds cmd/trellis into the test's directory, or returns
// $TRELLIS_E2E_BINARY.
func trellisBinary(t *testing.T) string {
	if bin := os.Getenv("TRELLIS_E2E_BINARY"); bin != "" {
		return bin
	}
	bin := filepath.Join(t.TempDir(), "trellis")
	cmd := exec.Command("go", "build", "-o", bin, "../trellis")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ../trellis: %v\n%s", err, b)
	}
	return bin
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
