//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/trellis-mesh/trellis/internal/kube/kubetest"
)

// A real kubelet with containerd on a lab node.
//
// What runs where (TestRealKubelet is the example):
//
//	a cloud node's netns   etcd, kube-apiserver and kube-controller-manager
//	                       (node IPAM): kubetest.Start with Options.NetNS,
//	                       Address (the node's public address, what a home
//	                       node reaches through its NAT) and Kubelets
//	any node's netns       containerd, then the kubelet, in a mount
//	                       namespace and a cgroup subtree of the node's
//	                       runtime (noderuntime.go); pods in network
//	                       namespaces of their own, bridged by the CNI
//	                       config in the node's CNI conf dir
//	the test process       on the host; its clients reach the API server
//	                       through kubetest's netns dialer, and kubectl runs
//	                       under nsenter --net in the API server's netns
//
// containerd (Containerd.config, one per node): root, state, socket and
// config in a directory of the node; CRI sandbox_image = PauseImage;
// snapshotter overlayfs (native if an overlay does not mount there); runc
// through the io.containerd.runc.v2 shim with cgroupfs (SystemdCgroup =
// false); CNI bin_dir /usr/lib/cni and conf_dir = ContainerdOptions.CNIConfDir
// (Trellis's --cni-conf-dir of the node); stream server on the node's
// 127.0.0.1 (the kubelet proxies exec, attach and port-forward to it);
// pods' netns files under the state directory; no AppArmor or SELinux;
// restrict_oom_score_adj (below).
//
// kubelet flags (Containerd.StartKubelet):
//
//	--config             the KubeletConfiguration below
//	--kubeconfig         a client certificate of system:node:<name> in group
//	                     system:nodes from the test's CA (Env.NodeKubeconfig):
//	                     the Node authorizer and NodeRestriction apply
//	--hostname-override  the Node's name (KubeletOptions.Name, default the
//	                     lab node's name; = Trellis's node name)
//	--node-ip            the node's LAN address: the Node's InternalIP
//	--root-dir           a directory of the node (not /var/lib/kubelet)
//	--cert-dir           next to it (unused: the serving certificate is given)
//	--v=2                enough to see registration, sandboxes and streams
//
// The KubeletConfiguration (kubeletConfig) says why each setting is there.
// TLS between the API server and the kubelet is checked at both ends: the
// kubelet's serving certificate comes from the test's CA for the Node's
// name and InternalIP, and the API server runs with
// --kubelet-certificate-authority set to that CA; it presents a client
// certificate of that CA (kube-apiserver-kubelet-client, system:masters),
// which the kubelet authenticates (x509 clientCAFile) and authorizes with
// a SubjectAccessReview (Webhook); anonymous requests get 401. A proxy
// on the way (the Trellis tunnel) carries the TLS stream and cannot read
// or redirect it: a wrong node would not hold a certificate for the name.
//
// What this machine needed, and what the harness does about it:
//
//   - `ip netns exec` mounts a new /sys and hides the cgroup hierarchies
//     under it: containerd starts with nsenter --net, then unshare --mount
//     (a private mount namespace of the node), and the kubelet joins both
//     with nsenter --target.
//   - The process has no CAP_SYS_RESOURCE: runc failed every sandbox with
//     "can't get final child's PID from pipe: EOF" (its log: "failed to
//     update /proc/self/oom_score_adj: Permission denied", the kubelet's
//     -998 for sandboxes). containerd's restrict_oom_score_adj keeps
//     containers at or above its own 0; the kubelet's oomScoreAdj is 0.
//     The kubelet still logs "Failed to set rlimit on max file handles"
//     (harmless).
//   - At start a kubelet sets host-wide vm.overcommit_memory=1,
//     kernel.panic=10 and kernel.panic_on_oops=1 (or, with
//     protectKernelDefaults, refuses to start): in the node's mount
//     namespace those /proc/sys files are files of the node, and the host
//     keeps its settings.
//   - /var/lib/kubelet/device-plugins (kubelet.sock) is a fixed path, and so
//     are /var/log/pods and /var/log/containers: they are directories of the
//     node in its mount namespace, so several kubelets run on one machine
//     (the test runs two). The host gets an empty /var/lib/kubelet as the
//     mount point.
//   - containerd's shims and the pods outlive containerd, and container
//     processes are in no namespace of the lab (each pod has its own): a
//     cgroup subtree per node holds them all; cleanup kills what is in it
//     and removes it, and a run removes the subtrees of crashed runs. With
//     hybrid cgroups runc also makes cgroups in the unified hierarchy, which
//     the subtree spans; in the v1 cpuset hierarchy a new cgroup gets its
//     parent's cpus and mems, without which nothing can join it.
//   - cgroup v1 and no systemd: failCgroupV1=false, cgroupDriver cgroupfs,
//     shutdownGracePeriod 0 (no logind). containerd 1.6 lacks the CRI
//     RuntimeConfig call: the kubelet logs "unknown method RuntimeConfig"
//     and takes the driver from its configuration.
//   - No registry: images are Go-written OCI tarballs imported with
//     `ctr -n k8s.io images import` (images.go); pods use
//     imagePullPolicy: Never. No scheduler: BusyboxPod sets spec.nodeName.
//   - A Node's Hostname does not resolve in the lab: without a proxy that
//     takes node names, start the API server with
//     --kubelet-preferred-address-types=InternalIP.
//   - Debian's static busybox wget crashes (SIGSEGV) when run on this host;
//     tests GET with the test binary (Node.HTTPGet) or Env.DialContext.

// KubeletPort is the port of the kubelet's API (logs, exec,
// port-forward), the one the API server dials.
const KubeletPort = 10250

// Tools a node's runtime runs besides the Kubernetes binaries.
var runtimeTools = []string{"containerd", "containerd-shim-runc-v2", "runc", "ctr", "nsenter", "unshare", "mount"}

// RequireRuntime skips the test (or fails it with TRELLIS_REQUIRE_KUBE=1)
// unless containerd, its runc shim, runc, the CNI plugins and the kubelet
// (scripts/build-kube.sh) are there, and returns the kubelet's path.
func RequireRuntime(t testing.TB) string {
	t.Helper()
	requireContainerd(t)
	return kubetest.Require(t, "kubelet")[0]
}

// requireContainerd is RequireRuntime without the kubelet.
func requireContainerd(t testing.TB) {
	t.Helper()
	var missing []string
	for _, tool := range runtimeTools {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	for _, plugin := range []string{"bridge", "host-local", "loopback"} {
		if _, err := os.Stat(filepath.Join(CNIBinDir, plugin)); err != nil {
			missing = append(missing, filepath.Join(CNIBinDir, plugin))
		}
	}
	if len(missing) > 0 {
		msg := fmt.Sprintf("a real kubelet needs %s (apt-get install containerd runc containernetworking-plugins util-linux)", strings.Join(missing, ", "))
		if os.Getenv("TRELLIS_REQUIRE_KUBE") == "1" {
			t.Fatal(msg + " (TRELLIS_REQUIRE_KUBE=1)")
		}
		t.Skip(msg)
	}
}

// ContainerdOptions shape a node's containerd.
type ContainerdOptions struct {
	// CNIConfDir is the CRI plugin's CNI conf_dir: Trellis's
	// --cni-conf-dir of the node in a Trellis test. Required. The node
	// is NotReady ("cni config uninitialized") until it holds a
	// conflist. bin_dir is CNIBinDir.
	CNIConfDir string
	// Images are imported after the start, besides the sandbox image
	// (PauseImage), which always is.
	Images []Image
}

// Containerd is a containerd of a node, in the node's network namespace
// and in a mount namespace and cgroup subtree of the node's runtime. The
// test's cleanup stops it, kills the shims and pods, and removes the
// cgroups; its mounts disappear with its mount namespace.
type Containerd struct {
	Node *Node
	// Dir holds its config, root, state, socket and the node's
	// /var/lib/kubelet, /var/log and kernel-setting files.
	Dir    string
	Config string
	Socket string
	// Snapshotter is overlayfs, or native where overlay cannot mount.
	Snapshotter string
	// SandboxImage is the pause image, the CRI plugin's sandbox_image.
	SandboxImage Image
	// StartedIn is from the start to the first answer on its socket.
	StartedIn time.Duration
	// Imported is how long each image's import took, by Ref.
	Imported map[string]time.Duration

	t       testing.TB
	proc    *nodeProc
	cgroups *cgroupTree
	kubelet *Kubelet
}

// StartContainerd starts containerd on node n, waits until it answers
// and imports the sandbox image and o.Images.
func (n *Node) StartContainerd(t testing.TB, o ContainerdOptions) *Containerd {
	t.Helper()
	if o.CNIConfDir == "" {
		t.Fatal("StartContainerd: ContainerdOptions.CNIConfDir is required")
	}
	requireContainerd(t)
	c := &Containerd{
		Node:         n,
		Dir:          n.lab.TempDir("containerd-" + n.Name),
		SandboxImage: PauseImage(t),
		Imported:     map[string]time.Duration{},
		t:            t,
	}
	c.Socket = filepath.Join(c.Dir, "c.sock")
	if len(c.Socket) > 100 {
		t.Fatalf("containerd socket path %s is too long for a unix socket (%d bytes); use a shorter test name", c.Socket, len(c.Socket))
	}
	// The mount point of the node's own /var/lib/kubelet (see
	// noderuntime.go): an empty directory on the host.
	if err := os.MkdirAll("/var/lib/kubelet", 0o755); err != nil {
		t.Fatal(err)
	}
	c.Snapshotter = overlaySnapshotter(t, c.Dir)
	c.Config = filepath.Join(c.Dir, "config.toml")
	if err := os.WriteFile(c.Config, []byte(c.config(o.CNIConfDir)), 0o644); err != nil {
		t.Fatal(err)
	}
	c.cgroups = newCgroupTree(t)
	t.Cleanup(c.stop)

	script := mountNamespaceScript(c.Dir) + c.cgroups.joinScript() + `exec "$@"`
	t0 := time.Now()
	p, err := startNodeProc("containerd@"+n.Name, filepath.Join(c.Dir, "containerd.log"),
		"nsenter", "--net=/run/netns/"+n.NS, "--",
		"unshare", "--mount", "--propagation", "private", "--",
		"sh", "-c", script, "sh",
		"containerd", "--config", c.Config)
	if err != nil {
		t.Fatal(err)
	}
	c.proc = p
	WaitFor(t, time.Minute, "containerd on "+n.Name+" to answer on "+c.Socket, func() error {
		if err := p.Err(); err != nil {
			return err
		}
		_, err := c.Ctr("version")
		return err
	})
	c.StartedIn = time.Since(t0)
	for _, img := range append([]Image{c.SandboxImage}, o.Images...) {
		c.Import(t, img)
	}
	return c
}

// config is containerd's configuration (version 2, containerd 1.6).
func (c *Containerd) config(cniConfDir string) string {
	q := func(s string) string { return fmt.Sprintf("%q", s) }
	return `# containerd of lab node ` + c.Node.Name + ` (e2e/kubelet.go)
version = 2
root = ` + q(filepath.Join(c.Dir, "root")) + `
state = ` + q(filepath.Join(c.Dir, "state")) + `
oom_score = 0
# Snapshotters that cannot work here; they only log errors.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = ` + q(c.Socket) + `

[plugins."io.containerd.internal.v1.opt"]
  # Default /opt/containerd: a directory of the host.
  path = ` + q(filepath.Join(c.Dir, "opt")) + `

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = ` + q(c.SandboxImage.Ref) + `
  # exec, attach and port-forward streams: the kubelet proxies them to
  # this server on the node's loopback.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # Pods' network namespace files in the state directory, not
  # /var/run/netns (which is the node's own tmpfs anyway).
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  # No container gets an oom_score_adj below containerd's own (0):
  # lowering one needs CAP_SYS_RESOURCE, which test machines may lack
  # (this one does), and runc then fails ("can't get final child's PID
  # from pipe") on the kubelet's -998 for sandboxes.
  restrict_oom_score_adj = true
  enable_selinux = false
  tolerate_missing_hugetlb_controller = true

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = ` + q(c.Snapshotter) + `
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # cgroupfs, as the kubelet's cgroupDriver: no systemd here.
        SystemdCgroup = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = ` + q(CNIBinDir) + `
    conf_dir = ` + q(cniConfDir) + `
    max_conf_num = 1
`
}

// overlaySnapshotter returns "overlayfs" if an overlay mounts in dir, else
// "native" (a copy per container: slower, works on any file system).
func overlaySnapshotter(t testing.TB, dir string) string {
	t.Helper()
	probe := filepath.Join(dir, "overlay-probe")
	for _, d := range []string{"lower", "upper", "work", "merged"} {
		if err := os.MkdirAll(filepath.Join(probe, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	defer os.RemoveAll(probe)
	// In a mount namespace of its own, so that nothing is left mounted
	// on the host if this process dies.
	opts := fmt.Sprintf("lowerdir=%s/lower,upperdir=%s/upper,workdir=%s/work", probe, probe, probe)
	if out, err := run("unshare", "--mount", "--propagation", "private", "--", "mount", "-t", "overlay", "overlay", "-o", opts, filepath.Join(probe, "merged")); err != nil {
		t.Logf("overlay does not mount in %s (%v: %s): containerd uses the native snapshotter", dir, err, out)
		return "native"
	}
	return "overlayfs"
}

// Ctr runs ctr against this containerd in its CRI namespace (k8s.io).
func (c *Containerd) Ctr(args ...string) (string, error) {
	return run(append([]string{"ctr", "--address", c.Socket, "--namespace", "k8s.io"}, args...)...)
}

// Import imports img (ctr images import, unpacked for the CRI plugin's
// snapshotter) and records how long it took.
func (c *Containerd) Import(t testing.TB, img Image) time.Duration {
	t.Helper()
	t0 := time.Now()
	if out, err := c.Ctr("images", "import", "--snapshotter", c.Snapshotter, img.Path); err != nil {
		t.Fatalf("import %s into containerd of %s: %v\n%s", img.Ref, c.Node.Name, err, out)
	}
	d := time.Since(t0)
	c.Imported[img.Ref] = d
	return d
}

// Pid is containerd's process ID.
func (c *Containerd) Pid() int { return c.proc.Pid() }

// RSS is containerd's resident memory in MiB.
func (c *Containerd) RSS() float64 { return rssMiB(c.proc.Pid()) }

// stop stops the kubelet if it runs, then containerd, kills what is left
// in the node's cgroups (shims, pods) and removes them.
func (c *Containerd) stop() {
	t := c.t
	if c.kubelet != nil {
		c.kubelet.stop()
	}
	if c.proc != nil {
		if err := c.proc.Stop(10 * time.Second); err != nil {
			t.Logf("clean up: %v", err)
		}
		if t.Failed() || os.Getenv("TRELLIS_E2E_KEEP_LOGS") != "" {
			c.proc.report(t, t.Failed())
		}
	}
	if err := c.cgroups.kill(15 * time.Second); err != nil {
		t.Errorf("clean up: %v", err)
	}
	if err := c.cgroups.remove(); err != nil {
		t.Errorf("clean up: %v", err)
	}
}

// KubeletOptions shape a node's kubelet.
type KubeletOptions struct {
	// Name is the Node's name (--hostname-override); default the lab
	// node's name.
	Name string
	// NodeIP is the kubelet's --node-ip, its InternalIP; default the
	// node's LAN address. The serving certificate holds it and Name.
	NodeIP netip.Addr
	// Args are more kubelet flags, after the harness's own.
	Args []string
}

// Kubelet is a real kubelet of a lab node, run in the mount namespace and
// network namespace of its containerd.
type Kubelet struct {
	Name   string
	NodeIP netip.Addr
	// Dir is its --root-dir; its config, kubeconfig and certificates
	// are next to it.
	Dir        string
	Config     string
	Kubeconfig string

	t    testing.TB
	env  *kubetest.Env
	proc *nodeProc
}

// StartKubelet starts a kubelet that registers node o.Name with env's API
// server, with credentials of system:node:<name> from env's CA, and uses
// this containerd. env must have been started with Options.Kubelets (the
// API server checks the kubelet's serving certificate against its CA).
// The kubelet is stopped before containerd when the test ends.
func (c *Containerd) StartKubelet(t testing.TB, env *kubetest.Env, o KubeletOptions) *Kubelet {
	t.Helper()
	bin := RequireRuntime(t)
	if c.kubelet != nil {
		t.Fatalf("node %s has a kubelet already", c.Node.Name)
	}
	if o.Name == "" {
		o.Name = c.Node.Name
	}
	if !o.NodeIP.IsValid() {
		o.NodeIP = c.Node.LANIP
	}
	base := c.Node.lab.TempDir("kubelet-" + c.Node.Name)
	k := &Kubelet{Name: o.Name, NodeIP: o.NodeIP, Dir: filepath.Join(base, "root"), t: t, env: env}
	if err := os.MkdirAll(k.Dir, 0o750); err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := env.ServingCert(t, base, "kubelet-serving", []string{o.Name}, []netip.Addr{o.NodeIP})
	k.Kubeconfig = env.NodeKubeconfig(t, o.Name)
	resolv := filepath.Join(base, "resolv.conf")
	if err := os.WriteFile(resolv, []byte("# lab node "+o.Name+": no DNS server\noptions ndots:1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	k.Config = filepath.Join(base, "config.yaml")
	cfg := kubeletConfig(kubeletConfigParams{
		NodeIP: o.NodeIP, CertFile: certFile, KeyFile: keyFile, ClientCA: env.CAFile,
		CgroupRoot: c.cgroups.Name, Socket: c.Socket, ResolvConf: resolv,
	})
	if err := os.WriteFile(k.Config, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	args := append([]string{
		"--config=" + k.Config,
		"--kubeconfig=" + k.Kubeconfig,
		"--hostname-override=" + o.Name,
		"--node-ip=" + o.NodeIP.String(),
		"--root-dir=" + k.Dir,
		"--cert-dir=" + filepath.Join(base, "pki"),
		"--v=2",
	}, o.Args...)
	script := c.cgroups.joinScript() + `exec "$@"`
	argv := append([]string{
		"nsenter", fmt.Sprintf("--target=%d", c.Pid()), "--mount", "--net", "--",
		"sh", "-c", script, "sh", bin,
	}, args...)
	p, err := startNodeProc("kubelet@"+c.Node.Name, filepath.Join(base, "kubelet.log"), argv...)
	if err != nil {
		t.Fatal(err)
	}
	k.proc = p
	c.kubelet = k
	return k
}

// kubeletConfigParams are the node-specific values of a kubelet's
// configuration.
type kubeletConfigParams struct {
	NodeIP             netip.Addr
	CertFile, KeyFile  string
	ClientCA           string
	CgroupRoot, Socket string
	ResolvConf         string
}

// kubeletConfig is a KubeletConfiguration for a lab node. The reason for
// each setting is next to it, and in doc.go.
func kubeletConfig(p kubeletConfigParams) string {
	q := func(s string) string { return fmt.Sprintf("%q", s) }
	return `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# The API: on all the node's addresses (as a kubelet's default; a tunnel
# may dial the node's loopback), TLS with a certificate of the test's CA
# for the node's name and address (the API server checks it:
# --kubelet-certificate-authority), clients with certificates of that CA
# (the API server's kubelet client), each request authorized by the API
# server (SubjectAccessReview), no anonymous access, no read-only port.
address: 0.0.0.0
port: ` + fmt.Sprint(KubeletPort) + `
readOnlyPort: 0
tlsCertFile: ` + q(p.CertFile) + `
tlsPrivateKeyFile: ` + q(p.KeyFile) + `
rotateCertificates: false
serverTLSBootstrap: false
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: ` + q(p.ClientCA) + `}
authorization: {mode: Webhook}
# Not -999: lowering it needs CAP_SYS_RESOURCE (see containerd's
# restrict_oom_score_adj).
oomScoreAdj: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
# The runtime: this node's containerd.
containerRuntimeEndpoint: ` + q("unix://"+p.Socket) + `
# This machine: cgroup v1, no systemd (PID 1 is not systemd).
failCgroupV1: false
cgroupDriver: cgroupfs
# Pods (and the QoS cgroups) under the node's own cgroup subtree.
cgroupRoot: ` + q(p.CgroupRoot) + `
cgroupsPerQOS: true
enforceNodeAllocatable: ["pods"]
# Swap may be on; the kubelet must not care.
failSwapOn: false
# A shared test machine: never evict and never collect images because of
# the host's disk or memory.
evictionHard: {memory.available: "0%", nodefs.available: "0%", nodefs.inodesFree: "0%", imagefs.available: "0%", imagefs.inodesFree: "0%"}
mergeDefaultEvictionSettings: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# Nothing here handles shutdown inhibitors (no systemd-logind).
shutdownGracePeriod: 0s
shutdownGracePeriodCriticalPods: 0s
# iptables chains in the node's namespace are Trellis's business.
makeIPTablesUtilChains: false
# No cluster DNS; pods get this file's (empty) resolver settings.
resolvConf: ` + q(p.ResolvConf) + `
# The kubelet writes host-wide kernel settings at start; it writes the
# node's copies here (see noderuntime.go).
protectKernelDefaults: false
# Status often enough that a test sees Ready and Running soon.
nodeStatusUpdateFrequency: 4s
nodeStatusReportFrequency: 10s
syncFrequency: 10s
fileCheckFrequency: 10s
registerNode: true
maxPods: 30
serializeImagePulls: false
`
}

// RSS is the kubelet's resident memory in MiB.
func (k *Kubelet) RSS() float64 { return rssMiB(k.proc.Pid()) }

// Err is nil while the kubelet runs (see nodeProc.Err).
func (k *Kubelet) Err() error { return k.proc.Err() }

// WaitReady waits until the kubelet's Node is Ready and returns how long
// that took since the kubelet started.
func (k *Kubelet) WaitReady(t testing.TB, timeout time.Duration) time.Duration {
	t.Helper()
	c := k.env.Admin(t)
	WaitFor(t, timeout, "Node "+k.Name+" to be Ready", func() error {
		if err := k.proc.Err(); err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		n, err := c.CoreV1().Nodes().Get(ctx, k.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				if cond.Status == corev1.ConditionTrue {
					return nil
				}
				return fmt.Errorf("condition Ready=%s: %s: %s", cond.Status, cond.Reason, cond.Message)
			}
		}
		return fmt.Errorf("no Ready condition yet")
	})
	return time.Since(k.proc.started)
}

// stop stops the kubelet; containerd's stop calls it first.
func (k *Kubelet) stop() {
	t := k.t
	if err := k.proc.Stop(10 * time.Second); err != nil {
		t.Logf("clean up: %v", err)
	}
	if t.Failed() || os.Getenv("TRELLIS_E2E_KEEP_LOGS") != "" {
		k.proc.report(t, t.Failed())
	}
}

func init() { extraHelpers["http-get"] = httpGet }

// httpGet GETs url and prints the body (helper mode http-get).
func httpGet(url string) error {
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	_, err = io.Copy(os.Stdout, resp.Body)
	return err
}

// HTTPGet GETs url from the node's namespace and returns the body. (The
// host's busybox wget crashes on this machine.)
func (n *Node) HTTPGet(url string) (string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	return n.lab.Output(n.NS, "env", helperEnv+"=http-get", self, url)
}

// BusyboxPod is a pod of one container, "main", of image img (pull policy
// Never) on node node (set directly: the harness runs no scheduler),
// running script with sh -c and exposing ports. It mounts no service
// account token.
func BusyboxPod(name, node string, img Image, script string, ports ...int32) *corev1.Pod {
	no := false
	grace := int64(1)
	var cp []corev1.ContainerPort
	for _, p := range ports {
		cp = append(cp, corev1.ContainerPort{ContainerPort: p, Protocol: corev1.ProtocolTCP})
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: corev1.PodSpec{
			NodeName:                      node,
			AutomountServiceAccountToken:  &no,
			EnableServiceLinks:            &no,
			TerminationGracePeriodSeconds: &grace,
			Containers: []corev1.Container{{
				Name:            "main",
				Image:           img.Ref,
				ImagePullPolicy: corev1.PullNever,
				Command:         []string{"sh", "-c", script},
				Ports:           cp,
			}},
		},
	}
}

// RunPod creates pod and waits until it runs with all containers ready;
// it returns the pod as it runs and the time from create to Running. The
// failure message has the pod's status and the events about it.
func RunPod(t testing.TB, c kubernetes.Interface, pod *corev1.Pod, timeout time.Duration) (*corev1.Pod, time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t0 := time.Now()
	if _, err := c.CoreV1().Pods(pod.Namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("create pod %s/%s: %v", pod.Namespace, pod.Name, err)
	}
	var got *corev1.Pod
	err := Poll(timeout, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		p, err := c.CoreV1().Pods(pod.Namespace).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		got = p
		if p.Status.Phase == corev1.PodFailed || p.Status.Phase == corev1.PodSucceeded {
			return Permanent(fmt.Errorf("pod %s is %s: %s", p.Name, p.Status.Phase, podState(p)))
		}
		if p.Status.Phase != corev1.PodRunning {
			return fmt.Errorf("pod %s is %s: %s", p.Name, p.Status.Phase, podState(p))
		}
		for _, cs := range p.Status.ContainerStatuses {
			if !cs.Ready {
				return fmt.Errorf("pod %s: container %s not ready: %s", p.Name, cs.Name, podState(p))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("waiting for pod %s/%s to run: %v\nevents:\n%s", pod.Namespace, pod.Name, err, podEvents(c, pod))
	}
	return got, time.Since(t0)
}

// podState summarizes a pod's conditions and container states.
func podState(p *corev1.Pod) string {
	var parts []string
	for _, c := range p.Status.Conditions {
		if c.Status != corev1.ConditionTrue {
			parts = append(parts, fmt.Sprintf("%s=%s %s %s", c.Type, c.Status, c.Reason, c.Message))
		}
	}
	for _, cs := range p.Status.ContainerStatuses {
		switch {
		case cs.State.Waiting != nil:
			parts = append(parts, fmt.Sprintf("%s waiting: %s %s", cs.Name, cs.State.Waiting.Reason, cs.State.Waiting.Message))
		case cs.State.Terminated != nil:
			parts = append(parts, fmt.Sprintf("%s terminated: %s (exit %d) %s", cs.Name, cs.State.Terminated.Reason, cs.State.Terminated.ExitCode, cs.State.Terminated.Message))
		}
	}
	if len(parts) == 0 {
		return "(no conditions yet)"
	}
	return strings.Join(parts, "; ")
}

// podEvents lists the events about pod, one a line.
func podEvents(c kubernetes.Interface, pod *corev1.Pod) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	evs, err := c.CoreV1().Events(pod.Namespace).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + pod.Name})
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, e := range evs.Items {
		fmt.Fprintf(&b, "  %s %s %s: %s\n", e.LastTimestamp.Format(time.RFC3339), e.Type, e.Reason, e.Message)
	}
	return b.String()
}
