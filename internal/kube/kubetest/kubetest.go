// Package kubetest starts a real Kubernetes control plane for tests on
// loopback (or in a network namespace, see Options.NetNS): etcd
// (etcdembed), kube-apiserver and, when asked,
// kube-controller-manager running only its node IPAM. Nodes register as
// kubelets do, with client certificates of system:node:<name> through the
// Node authorizer and the NodeRestriction admission. The binaries are
// built by scripts/build-kube.sh; without them tests skip and say so
// (TRELLIS_REQUIRE_KUBE=1 makes that a failure).
package kubetest

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Version is the Kubernetes version scripts/build-kube.sh builds (the
// k8s.io/kubernetes version of e2e/kube/tools/go.mod).
const Version = "v1.37.2"

// Binaries the harness runs.
const (
	binEtcd       = "etcdembed"
	binAPIServer  = "kube-apiserver"
	binController = "kube-controller-manager"
	binKubectl    = "kubectl"
)

// ServiceCIDR is the service range the API server is started with.
const ServiceCIDR = "10.96.0.0/12"

// Dir returns where the binaries are: $TRELLIS_KUBE_DIR, else the
// directory scripts/build-kube.sh builds into.
func Dir() string {
	if d := os.Getenv("TRELLIS_KUBE_DIR"); d != "" {
		return d
	}
	cache := os.Getenv("XDG_CACHE_HOME")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache")
	}
	return filepath.Join(cache, "trellis-e2e", "kube-"+Version)
}

// Require skips t (or, with TRELLIS_REQUIRE_KUBE=1, fails it) unless the
// named binaries are in Dir, and returns their paths in that order.
func Require(t testing.TB, bins ...string) []string {
	t.Helper()
	dir := Dir()
	var out, missing []string
	for _, b := range bins {
		p := filepath.Join(dir, b)
		if st, err := os.Stat(p); err != nil || st.Mode()&0o111 == 0 {
			missing = append(missing, b)
		}
		out = append(out, p)
	}
	if len(missing) > 0 {
		msg := fmt.Sprintf("%s not found in %s: run scripts/build-kube.sh (builds Kubernetes %s offline, minutes when cold) or set TRELLIS_KUBE_DIR", strings.Join(missing, ", "), dir, Version)
		if os.Getenv("TRELLIS_REQUIRE_KUBE") == "1" {
			t.Fatal(msg + " (TRELLIS_REQUIRE_KUBE=1)")
		}
		t.Skip(msg)
	}
	return out
}

// Options shape the control plane.
type Options struct {
	// NodeIPAM, if not empty, starts kube-controller-manager with only
	// its node IPAM controller (--allocate-node-cidrs) allocating from
	// these cluster CIDRs (at most one per family): a /24 per node of an
	// IPv4 range and a /64 of an IPv6 one.
	NodeIPAM []netip.Prefix

	// NetNS, if set, names a network namespace (/run/netns/NetNS) that
	// etcd, kube-apiserver and kube-controller-manager run in, entered
	// with nsenter --net. The Env's clients, Kubectl and DialContext
	// reach the API server there.
	NetNS string
	// Address is where the API server listens and what it advertises
	// (and an IP of its serving certificate); default 127.0.0.1. etcd
	// listens on 127.0.0.1 always.
	Address netip.Addr
	// Kubelets makes the API server a client of real kubelets: it
	// authenticates to them with a certificate of
	// kube-apiserver-kubelet-client in group system:masters, and it
	// checks their serving certificates against the CA (CAFile; issue
	// them with ServingCert).
	Kubelets bool
	// APIServerArgs are more kube-apiserver flags, after the harness's
	// own (for a flag given twice the later one wins).
	APIServerArgs []string
}

// Env is a running control plane. Everything it started is stopped when
// the test ends.
type Env struct {
	// Dir holds the certificates, keys, kubeconfigs and logs.
	Dir string
	// Server is the API server's URL.
	Server string
	// AdminKubeconfig is a kubeconfig of a cluster admin
	// (system:masters).
	AdminKubeconfig string
	// StartedIn is how long the control plane took to be ready.
	StartedIn time.Duration
	// CAFile is the CA certificate (PEM) that signs every certificate
	// of the harness and that the API server trusts for clients.
	CAFile string

	t          testing.TB
	ca         *authority
	admin      *rest.Config
	apiArgs    []string
	apiPath    string
	procs      map[string]*proc
	kubectl    string
	controller string
	netns      string
	dial       func(ctx context.Context, network, addr string) (net.Conn, error)
}

// Start brings up etcd and kube-apiserver (and kube-controller-manager if
// o.NodeIPAM is set) and waits until the API server is ready.
func Start(t testing.TB, o Options) *Env {
	t.Helper()
	bins := []string{binEtcd, binAPIServer}
	if len(o.NodeIPAM) > 0 {
		bins = append(bins, binController)
	}
	paths := Require(t, bins...)
	t0 := time.Now()
	e := &Env{t: t, Dir: t.TempDir(), procs: map[string]*proc{}, apiPath: paths[1], kubectl: filepath.Join(Dir(), binKubectl), netns: o.NetNS}
	e.dial = (&net.Dialer{Timeout: 10 * time.Second}).DialContext
	if o.NetNS != "" {
		e.dial = netnsDialer(o.NetNS)
	}
	addr := netip.AddrFrom4([4]byte{127, 0, 0, 1})
	if o.Address.IsValid() {
		addr = o.Address
	}
	t.Cleanup(e.stopAll)
	var err error
	if e.ca, err = newAuthority(); err != nil {
		t.Fatal(err)
	}
	etcdPort, peerPort, apiPort := freePort(t), freePort(t), freePort(t)
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", etcdPort)
	e.start("etcd", paths[0], "--data-dir", filepath.Join(e.Dir, "etcd"),
		"--listen-client", etcdURL, "--listen-peer", fmt.Sprintf("http://127.0.0.1:%d", peerPort))

	pki := filepath.Join(e.Dir, "pki")
	must(t, os.MkdirAll(pki, 0o700))
	caFile := filepath.Join(pki, "ca.crt")
	must(t, os.WriteFile(caFile, e.ca.certPEM, 0o644))
	e.CAFile = caFile
	servingCert, servingKey, err := e.ca.issue(pkix.Name{CommonName: "kube-apiserver"}, true,
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"},
		[]net.IP{net.IPv4(127, 0, 0, 1), net.IPv4(10, 96, 0, 1), addr.AsSlice()})
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := filepath.Join(pki, "apiserver.crt"), filepath.Join(pki, "apiserver.key")
	must(t, os.WriteFile(certFile, servingCert, 0o644))
	must(t, os.WriteFile(keyFile, servingKey, 0o600))
	saPub, saKey := filepath.Join(pki, "sa.pub"), filepath.Join(pki, "sa.key")
	if err := writeSAKeys(saPub, saKey); err != nil {
		t.Fatal(err)
	}
	e.Server = "https://" + netip.AddrPortFrom(addr, uint16(apiPort)).String()
	e.apiArgs = []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=" + addr.String(), "--advertise-address=" + addr.String(),
		"--secure-port=" + strconv.Itoa(apiPort),
		"--tls-cert-file=" + certFile, "--tls-private-key-file=" + keyFile,
		"--client-ca-file=" + caFile,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + saPub, "--service-account-signing-key-file=" + saKey,
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		"--disable-admission-plugins=ServiceAccount", // no token controller here; TokenRequest works without it
		"--service-cluster-ip-range=" + ServiceCIDR,
		"--allow-privileged=true",
		"--endpoint-reconciler-type=none", // 1.37 refuses a loopback address for the kubernetes Service
		"--cert-dir=" + filepath.Join(e.Dir, "apiserver-certs"),
	}
	if o.Kubelets {
		cert, key, err := e.ca.issue(pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}}, false, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		certFile, keyFile := filepath.Join(pki, "kubelet-client.crt"), filepath.Join(pki, "kubelet-client.key")
		must(t, os.WriteFile(certFile, cert, 0o644))
		must(t, os.WriteFile(keyFile, key, 0o600))
		e.apiArgs = append(e.apiArgs, "--kubelet-client-certificate="+certFile, "--kubelet-client-key="+keyFile,
			"--kubelet-certificate-authority="+caFile)
	}
	e.apiArgs = append(e.apiArgs, o.APIServerArgs...)
	adminCert, adminKey, err := e.ca.issue(pkix.Name{CommonName: "trellis-test-admin", Organization: []string{"system:masters"}}, false, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	e.admin = &rest.Config{Host: e.Server, TLSClientConfig: rest.TLSClientConfig{CAData: e.ca.certPEM, CertData: adminCert, KeyData: adminKey}}
	if o.NetNS != "" {
		e.admin.Dial = e.dial
	}
	e.AdminKubeconfig = e.writeKubeconfig("admin", fmt.Sprintf("client-certificate-data: %s\n    client-key-data: %s",
		base64.StdEncoding.EncodeToString(adminCert), base64.StdEncoding.EncodeToString(adminKey)))
	e.StartAPIServer()

	if len(o.NodeIPAM) > 0 {
		e.controller = paths[2]
		args := []string{
			"--kubeconfig=" + e.AdminKubeconfig,
			"--controllers=nodeipam", "--allocate-node-cidrs=true",
			"--cluster-cidr=" + joinPrefixes(o.NodeIPAM),
			"--service-cluster-ip-range=" + ServiceCIDR,
			"--leader-elect=false", "--use-service-account-credentials=false", "--secure-port=0",
		}
		// A mask size flag of a family the cluster lacks is an error.
		for _, p := range o.NodeIPAM {
			if p.Addr().Is4() {
				args = append(args, "--node-cidr-mask-size-ipv4=24")
			} else {
				args = append(args, "--node-cidr-mask-size-ipv6=64")
			}
		}
		e.start("kube-controller-manager", e.controller, args...)
	}
	e.StartedIn = time.Since(t0)
	return e
}

// StartAPIServer starts kube-apiserver (again, after StopAPIServer) on
// the same port and etcd, and waits until it is ready.
func (e *Env) StartAPIServer() {
	e.t.Helper()
	p := e.start("kube-apiserver", e.apiPath, e.apiArgs...)
	e.waitReady(p)
}

// StopAPIServer stops kube-apiserver; etcd and everything else keep
// running.
func (e *Env) StopAPIServer() {
	e.t.Helper()
	if p := e.procs["kube-apiserver"]; p != nil {
		p.stop()
		delete(e.procs, "kube-apiserver")
	}
}

// RSS returns the resident memory of each process, in MiB.
func (e *Env) RSS() map[string]float64 {
	out := map[string]float64{}
	for name, p := range e.procs {
		out[name] = rss(p.cmd.Process.Pid)
	}
	return out
}

// Admin returns a client of a cluster admin.
func (e *Env) Admin(t testing.TB) kubernetes.Interface {
	return NewClient(t, e.admin)
}

// NodeClient returns a client with the credentials a kubelet of node
// name has: a certificate of system:node:<name> in group system:nodes.
func (e *Env) NodeClient(t testing.TB, name string) kubernetes.Interface {
	t.Helper()
	cert, key, err := e.ca.issue(pkix.Name{CommonName: "system:node:" + name, Organization: []string{"system:nodes"}}, false, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	rc := rest.CopyConfig(e.admin)
	rc.TLSClientConfig = rest.TLSClientConfig{CAData: e.ca.certPEM, CertData: cert, KeyData: key}
	return NewClient(t, rc)
}

// RegisterNode creates the Node of name with its own credentials, as its
// kubelet does when it starts, with the given annotations.
func (e *Env) RegisterNode(t testing.TB, name string, annotations map[string]string) *corev1.Node {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n, err := e.NodeClient(t, name).CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{
		Name: name, Annotations: annotations, Labels: map[string]string{"kubernetes.io/hostname": name},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("register Node %s as its kubelet: %v", name, err)
	}
	return n
}

// AdminKubeconfigVia writes a kubeconfig of the admin that reaches the
// API server at url (a proxy in front of it) and returns its path.
func (e *Env) AdminKubeconfigVia(name, url string) string {
	return e.writeKubeconfigFor(name, url, fmt.Sprintf("client-certificate-data: %s\n    client-key-data: %s",
		base64.StdEncoding.EncodeToString(e.admin.CertData), base64.StdEncoding.EncodeToString(e.admin.KeyData)))
}

// TokenKubeconfig writes a kubeconfig for bearer token tok and returns
// its path.
func (e *Env) TokenKubeconfig(name, tok string) string {
	return e.writeKubeconfig(name, "token: "+tok)
}

// ServiceAccountKubeconfig creates service account namespace/name (if
// missing), asks for a token of it (TokenRequest, valid an hour) and
// returns the path of a kubeconfig that uses it.
func (e *Env) ServiceAccountKubeconfig(t testing.TB, namespace, name string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := e.Admin(t)
	_, err := c.CoreV1().ServiceAccounts(namespace).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	ttl := int64(3600)
	tr, err := c.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, name, &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{ExpirationSeconds: &ttl}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return e.TokenKubeconfig("sa-"+namespace+"-"+name, tr.Status.Token)
}

// HasKubectl reports whether kubectl is built (scripts/build-kube.sh
// builds it after the others).
func (e *Env) HasKubectl() bool {
	_, err := os.Stat(e.kubectl)
	return err == nil
}

// Kubectl runs kubectl with the admin kubeconfig and returns its
// combined output; an error if kubectl is not built.
func (e *Env) Kubectl(t testing.TB, args ...string) (string, error) {
	t.Helper()
	if _, err := os.Stat(e.kubectl); err != nil {
		return "", fmt.Errorf("kubectl is not in %s (scripts/build-kube.sh builds it): %w", Dir(), err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := e.KubectlCommand(ctx, args...).CombinedOutput()
	return string(out), err
}

// NewClient returns a clientset for rc with a transport of its own, whose
// connections are closed when the test ends (client-go shares cached
// transports otherwise, and their connections outlive the test).
func NewClient(t testing.TB, rc *rest.Config) kubernetes.Interface {
	t.Helper()
	rc = rest.CopyConfig(rc)
	if rc.Dial == nil {
		rc.Dial = (&net.Dialer{Timeout: 10 * time.Second}).DialContext
	}
	rc.QPS, rc.Burst = 100, 200
	hc, err := rest.HTTPClientFor(rc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(hc.CloseIdleConnections)
	c, err := kubernetes.NewForConfigAndClient(rc, hc)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func (e *Env) writeKubeconfig(name, user string) string {
	return e.writeKubeconfigFor(name, e.Server, user)
}

func (e *Env) writeKubeconfigFor(name, server, user string) string {
	path := filepath.Join(e.Dir, name+".kubeconfig")
	b := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    %s
contexts:
- name: test
  context: {cluster: test, user: %s}
current-context: test
`, server, base64.StdEncoding.EncodeToString(e.ca.certPEM), name, user, name)
	must(e.t, os.WriteFile(path, []byte(b), 0o600))
	return path
}

// waitReady waits until the API server answers /readyz, or fails the
// test if it exits first.
func (e *Env) waitReady(p *proc) {
	e.t.Helper()
	cert, err := tls.X509KeyPair(e.admin.CertData, e.admin.KeyData)
	if err != nil {
		e.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(e.ca.certPEM)
	tr := &http.Transport{DialContext: e.dial, TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 2 * time.Second}
	deadline := time.Now().Add(2 * time.Minute)
	last := ""
	for time.Now().Before(deadline) {
		select {
		case <-p.done:
			e.t.Fatalf("kube-apiserver exited before it was ready: %v\n%s", p.err, tail(p.log, 3000))
		default:
		}
		resp, err := c.Get(e.Server + "/readyz")
		if err == nil {
			b := make([]byte, 256)
			n, _ := resp.Body.Read(b)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			last = fmt.Sprintf("%d %s", resp.StatusCode, bytes.TrimSpace(b[:n]))
		} else {
			last = err.Error()
		}
		time.Sleep(100 * time.Millisecond)
	}
	e.t.Fatalf("kube-apiserver not ready after 2 minutes: %s\n%s", last, tail(p.log, 3000))
}

// proc is a started process.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

func (e *Env) start(name, path string, args ...string) *proc {
	e.t.Helper()
	logPath := filepath.Join(e.Dir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		e.t.Fatal(err)
	}
	cmd := exec.Command(path, args...)
	if e.netns != "" {
		// nsenter enters only the network namespace and then executes
		// path, which keeps nsenter's PID (`ip netns exec` would also
		// remount /sys).
		cmd = exec.Command("nsenter", append([]string{"--net=" + netnsPath(e.netns), "--", path}, args...)...)
	}
	cmd.Stdout, cmd.Stderr = f, f
	// Killed with the test binary even if it dies without cleaning up.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		e.t.Fatalf("start %s: %v", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	e.procs[name] = p
	return p
}

// stop ends the process: SIGTERM to its PID, SIGKILL after 15 s.
func (p *proc) stop() {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// stopAll stops every process, last started first, and shows the end of
// their logs when the test failed. A process that exited by itself fails
// the test: whatever the test saw was not what it meant to test.
func (e *Env) stopAll() {
	for _, name := range []string{"kube-controller-manager", "kube-apiserver", "etcd"} {
		p := e.procs[name]
		if p == nil {
			continue
		}
		select {
		case <-p.done:
			e.t.Errorf("%s exited during the test: %v", name, p.err)
		default:
		}
		p.stop()
		if e.t.Failed() {
			e.t.Logf("---- end of %s ----\n%s", p.log, tail(p.log, 3000))
		}
	}
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

func rss(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			return kb / 1024
		}
	}
	return -1
}

func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func joinPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

// authority is the test cluster's CA: it signs the API server's serving
// certificate and every client certificate, and the API server trusts
// it for client authentication.
type authority struct {
	cert    *x509.Certificate
	key     *ecdsa.PrivateKey
	certPEM []byte
}

func newAuthority() (*authority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "kubetest CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &authority{cert: cert, key: key, certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// issue returns a certificate and key (PEM) for subject: a serving
// certificate for the names and IPs, or a client certificate.
func (a *authority) issue(subject pkix.Name, serving bool, dns []string, ips []net.IP) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: subject,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		DNSNames: dns, IPAddresses: ips,
	}
	if serving {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, &key.PublicKey, a.key)
	if err != nil {
		return nil, nil, err
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), nil
}

// writeSAKeys writes the key pair service account tokens are signed with.
func writeSAKeys(pubFile, keyFile string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	pb, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return err
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		return err
	}
	return os.WriteFile(pubFile, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pb}), 0o644)
}
