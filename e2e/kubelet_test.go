//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/trellis-mesh/trellis/internal/kube/kubetest"
)

// TestRealKubelet runs a real control plane in a cloud node's namespace
// and two real kubelets with containerd: one on a second machine of that
// cloud (the API server reaches it on the cloud's LAN) and one in a home
// behind NAT (no inbound port). Both nodes register and become Ready (after
// node IPAM gives them pod CIDRs and a bridge conflist appears in their
// CNI conf dir), and both run a busybox pod. From the API server's side,
// kubectl logs, exec and port-forward work for the cloud pod and fail for
// the home pod: what Trellis's tunnel is for.
func TestRealKubelet(t *testing.T) {
	lab := NewLab(t)
	RequireRuntime(t)
	kubetest.Require(t, "etcdembed", "kube-apiserver", "kube-controller-manager", "kubectl")
	busybox := BusyboxImage(t)
	pause := PauseImage(t)
	t.Logf("images: %s (%d KiB), %s (%d KiB)", pause.Ref, pause.Bytes/1024, busybox.Ref, busybox.Bytes/1024)

	cp := lab.Cloud("cp", "198.51.100.10/24", "10.1.0.10/24")
	worker := lab.Machine("worker", "198.51.100.11/24", cp.LAN, "10.1.0.11/24")
	home := lab.Home("home", "203.0.113.50/24", "10.9.0.10/24")

	env := kubetest.Start(t, kubetest.Options{
		NetNS:    cp.NS,
		Address:  cp.PublicIP,
		Kubelets: true,
		NodeIPAM: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
		// A node's Hostname does not resolve here; dial its InternalIP.
		APIServerArgs: []string{"--kubelet-preferred-address-types=InternalIP"},
	})
	t.Logf("measured: control plane in %s ready in %v", cp.NS, env.StartedIn.Round(time.Millisecond))
	admin := env.Admin(t)

	type node struct {
		lab        *Node
		cniDir     string
		containerd *Containerd
		kubelet    *Kubelet
	}
	nodes := []*node{{lab: worker}, {lab: home}}
	for _, n := range nodes {
		n.cniDir = lab.TempDir("cni-" + n.lab.Name)
		n.containerd = n.lab.StartContainerd(t, ContainerdOptions{CNIConfDir: n.cniDir, Images: []Image{busybox}})
		t.Logf("measured: containerd on %s started in %v (snapshotter %s), imports: pause %v, busybox %v",
			n.lab.Name, n.containerd.StartedIn.Round(time.Millisecond), n.containerd.Snapshotter,
			n.containerd.Imported[pause.Ref].Round(time.Millisecond), n.containerd.Imported[busybox.Ref].Round(time.Millisecond))
	}
	for _, n := range nodes {
		n.kubelet = n.containerd.StartKubelet(t, env, KubeletOptions{})
	}
	// As a Trellis agent would: the CNI config appears once the Node has
	// its pod CIDR; until then the node is NotReady.
	for _, n := range nodes {
		cidr := waitPodCIDR(t, env, n.kubelet)
		writeBridgeConflist(t, n.cniDir, cidr, lab.TempDir("ipam-"+n.lab.Name))
	}
	for _, n := range nodes {
		d := n.kubelet.WaitReady(t, 3*time.Minute)
		t.Logf("measured: kubelet on %s: start → Node Ready in %v", n.lab.Name, d.Round(time.Millisecond))
	}
	if out, err := env.Kubectl(t, "get", "nodes", "-o", "wide"); err == nil {
		t.Logf("kubectl get nodes -o wide:\n%s", out)
	}

	const script = `echo "hello from $(hostname)"; mkdir -p /www; echo "served by $(hostname)" > /www/index.html; exec httpd -f -p 8080 -h /www`
	pods := map[*node]string{}
	for _, n := range nodes {
		name := "echo-" + n.lab.Name
		p, d := RunPod(t, admin, BusyboxPod(name, n.kubelet.Name, busybox, script, 8080), 2*time.Minute)
		pods[n] = name
		t.Logf("measured: pod %s on %s: create → Running in %v (pod IP %s)", name, n.lab.Name, d.Round(time.Millisecond), p.Status.PodIP)
		// The pod serves on its node, NAT or not.
		out, err := n.lab.HTTPGet(fmt.Sprintf("http://%s:8080/", p.Status.PodIP))
		if err != nil || !strings.Contains(out, "served by "+name) {
			t.Fatalf("from node %s, GET the pod %s at %s:8080: %v\n%s", n.lab.Name, name, p.Status.PodIP, err, out)
		}
	}
	for _, n := range nodes {
		t.Logf("measured: RSS on %s: containerd %.0f MiB, kubelet %.0f MiB", n.lab.Name, n.containerd.RSS(), n.kubelet.RSS())
	}
	for name, mib := range env.RSS() {
		t.Logf("measured: RSS %s: %.0f MiB", name, mib)
	}

	t.Run("cloud node: logs, exec and port-forward work", func(t *testing.T) {
		pod, k := pods[nodes[0]], nodes[0].kubelet
		out, err := env.Kubectl(t, "logs", pod)
		if err != nil || !strings.Contains(out, "hello from "+pod) {
			t.Errorf("kubectl logs %s: %v\n%s", pod, err, out)
		} else {
			t.Logf("kubectl logs %s: %s", pod, strings.TrimSpace(out))
		}
		out, err = env.Kubectl(t, "exec", pod, "--", "cat", "/www/index.html")
		if err != nil || !strings.Contains(out, "served by "+pod) {
			t.Errorf("kubectl exec %s: %v\n%s", pod, err, out)
		} else {
			t.Logf("kubectl exec %s -- cat /www/index.html: %s", pod, strings.TrimSpace(out))
		}
		body, err := portForwardGet(t, env, pod, 8080)
		if err != nil || !strings.Contains(body, "served by "+pod) {
			t.Errorf("kubectl port-forward %s 8080, GET /: %v\n%s", pod, err, body)
		} else {
			t.Logf("kubectl port-forward %s :8080, GET /: %s", pod, strings.TrimSpace(body))
		}
		// What the API server relies on: the kubelet's certificate is
		// valid for its address under the test's CA, and the kubelet
		// refuses a client without a certificate of that CA.
		if status, err := anonymousKubeletGet(env, k); err != nil || status != http.StatusUnauthorized {
			t.Errorf("GET /pods from the API server's namespace without a client certificate, kubelet's certificate checked against the CA: %v %v, want 401 Unauthorized", status, err)
		}
	})

	t.Run("node behind NAT: logs, exec and port-forward fail", func(t *testing.T) {
		pod := pods[nodes[1]]
		// The API server dials the kubelet at the node's InternalIP,
		// which nothing routes to from the cloud.
		want := regexp.MustCompile(`dial tcp ` + regexp.QuoteMeta(home.LANIP.String()) + `:10250: .*(no route to host|network is unreachable|i/o timeout|connection refused|deadline exceeded)`)
		for _, args := range [][]string{
			{"logs", pod},
			{"exec", pod, "--", "cat", "/www/index.html"},
		} {
			t0 := time.Now()
			out, err := env.Kubectl(t, append([]string{"--request-timeout=45s"}, args...)...)
			if err == nil || !want.MatchString(out) {
				t.Errorf("kubectl %s: want an error that the kubelet at %s:10250 cannot be reached, got %v:\n%s", strings.Join(args, " "), home.LANIP, err, out)
				continue
			}
			t.Logf("kubectl %s fails after %v: %s", args[0], time.Since(t0).Round(time.Millisecond), strings.TrimSpace(out))
		}
		t0 := time.Now()
		body, err := portForwardGet(t, env, pod, 8080)
		if err == nil || !want.MatchString(err.Error()) {
			t.Errorf("kubectl port-forward %s 8080: want an error that the kubelet at %s:10250 cannot be reached, got %v\n%s", pod, home.LANIP, err, body)
		} else {
			t.Logf("kubectl port-forward fails after %v: %v", time.Since(t0).Round(time.Millisecond), err)
		}
	})
}

// waitPodCIDR waits until node IPAM has given k's Node a pod CIDR.
func waitPodCIDR(t *testing.T, env *kubetest.Env, k *Kubelet) netip.Prefix {
	t.Helper()
	admin := env.Admin(t)
	var cidr netip.Prefix
	WaitFor(t, 2*time.Minute, "Node "+k.Name+" to register and get a pod CIDR", func() error {
		if err := k.Err(); err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		n, err := admin.CoreV1().Nodes().Get(ctx, k.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if n.Spec.PodCIDR == "" {
			return fmt.Errorf("no pod CIDR yet")
		}
		cidr, err = netip.ParsePrefix(n.Spec.PodCIDR)
		return err
	})
	return cidr
}

// writeBridgeConflist writes a CNI config of the bridge plugin over
// podCIDR (gateway on the bridge, host-local IPAM in ipamDir) into dir,
// atomically: containerd watches dir.
func writeBridgeConflist(t *testing.T, dir string, podCIDR netip.Prefix, ipamDir string) {
	t.Helper()
	conf := map[string]any{
		"cniVersion": "0.4.0",
		"name":       "lab",
		"plugins": []any{map[string]any{
			"type":      "bridge",
			"bridge":    "cni0",
			"isGateway": true,
			"ipMasq":    false,
			"ipam": map[string]any{
				"type":    "host-local",
				"ranges":  [][]map[string]string{{{"subnet": podCIDR.String()}}},
				"dataDir": ipamDir,
			},
		}},
	}
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(dir, ".10-lab.tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, "10-lab.conflist")); err != nil {
		t.Fatal(err)
	}
}

// anonymousKubeletGet GETs /pods from k's kubelet, from the API server's
// namespace, checking the kubelet's certificate against env's CA and
// presenting no client certificate; it returns the HTTP status.
func anonymousKubeletGet(env *kubetest.Env, k *Kubelet) (int, error) {
	ca, err := os.ReadFile(env.CAFile)
	if err != nil {
		return 0, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	tr := &http.Transport{DialContext: env.DialContext, TLSClientConfig: &tls.Config{RootCAs: pool}}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 15 * time.Second}
	resp, err := c.Get("https://" + netip.AddrPortFrom(k.NodeIP, KubeletPort).String() + "/pods")
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// forwardingRE matches kubectl port-forward's line once it listens.
var forwardingRE = regexp.MustCompile(`Forwarding from 127\.0\.0\.1:(\d+) -> `)

// portForwardGet runs kubectl port-forward to pod's port from the API
// server's side, GETs / through it and returns the body. If kubectl exits
// before it forwards, the error holds its output.
func portForwardGet(t *testing.T, env *kubetest.Env, pod string, port int) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := env.KubectlCommand(ctx, "--request-timeout=45s", "port-forward", "--address", "127.0.0.1", "pod/"+pod, fmt.Sprintf(":%d", port))
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		return "", err
	}
	exited := make(chan error, 1)
	go func() {
		err := cmd.Wait()
		pw.CloseWithError(io.EOF)
		exited <- err
	}()
	defer func() {
		_ = cmd.Process.Kill()
		<-exited
	}()
	var output strings.Builder
	localPort := ""
	sc := bufio.NewScanner(pr)
	for sc.Scan() {
		output.WriteString(sc.Text() + "\n")
		if m := forwardingRE.FindStringSubmatch(sc.Text()); m != nil {
			localPort = m[1]
			break
		}
	}
	if localPort == "" {
		return "", fmt.Errorf("kubectl port-forward ended before it forwarded: %s", strings.TrimSpace(output.String()))
	}
	go func() { _, _ = io.Copy(io.Discard, pr) }()
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return env.DialContext(ctx, network, addr)
		},
	}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get("http://127.0.0.1:" + localPort + "/")
	if err != nil {
		return "", fmt.Errorf("GET through kubectl port-forward: %w (kubectl: %s)", err, strings.TrimSpace(output.String()))
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return string(body), err
}
