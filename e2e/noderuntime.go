//go:build e2e

package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// A node's container runtime (containerd and a kubelet) shares three
// things that the rest of the lab does not need: a mount namespace, a
// cgroup subtree and processes that outlive their parents (containerd's
// shims and the pods). This file holds those; kubelet.go runs containerd
// and the kubelet in them.
//
// The mount namespace is private (no propagation to or from the host)
// and is made by containerd's start (unshare --mount); the kubelet joins
// it (nsenter --target). In it:
//   - /run is a tmpfs of its own: containerd's shim sockets
//     (/run/containerd/s), the iptables lock and anything else that
//     lands in /run stay out of the host's.
//   - /var/lib/kubelet (a fixed path: device-plugins/kubelet.sock) and
//     /var/log (pods' logs in /var/log/pods, links in /var/log/containers)
//     are directories of the node, so several kubelets run on one
//     machine.
//   - /proc/sys/{vm/overcommit_memory, vm/panic_on_oom, kernel/panic,
//     kernel/panic_on_oops, kernel/keys/root_maxkeys,
//     kernel/keys/root_maxbytes} are files of the node: a kubelet sets
//     these host-wide settings at start (protectKernelDefaults=false),
//     or refuses to start when they differ (true). Here it writes its
//     own copies and the machine keeps its settings.
//   - Everything else (/sys with the cgroup hierarchies, the file
//     systems) is the host's, unlike `ip netns exec`, which remounts /sys
//     and hides the cgroup mounts.
// When the last process in it exits, the namespace and every mount in it
// (overlay root file systems, sandbox /dev/shm, network namespace files)
// are gone: nothing to unmount on the host.
//
// The cgroup subtree, /trellis-e2e-<pid>-<n> in every hierarchy, holds
// containerd and the kubelet (its "runtime" child) and the pods (the
// kubelet's cgroupRoot). Stopping the node kills every process in it,
// the shims and containers included, and removes it. A subtree whose test
// process is gone is removed by the next run, like the lab's namespaces.

// cgroupPrefix starts the name of every cgroup subtree of the harness.
const cgroupPrefix = "trellis-e2e-"

var (
	cgroupSeq      atomic.Int64
	cgroupLeftover sync.Once
	cgroupNameRE   = regexp.MustCompile(`^` + cgroupPrefix + `(\d+)-\d+$`)
)

// sysctlsOfNode are the host-wide kernel settings that a kubelet changes
// at start; the node's mount namespace gives it files of its own.
var sysctlsOfNode = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
}

// cgroupTree is a cgroup subtree in every mounted hierarchy (cgroup v1) or
// in the unified one (v2).
type cgroupTree struct {
	// Name is the subtree's path from the hierarchies' roots, e.g.
	// /trellis-e2e-123-1.
	Name string
	// dirs are its directories, one per hierarchy.
	dirs []string
	v2   bool
}

// cgroupMounts returns the mount points of the cgroup hierarchies: the
// v1 ones (fstype cgroup) and the unified one (cgroup2), where runc also
// makes cgroups on a "hybrid" host. v2only is true on a host with the
// unified hierarchy alone.
func cgroupMounts() (mounts []string, v2only bool, err error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, false, err
	}
	defer f.Close()
	v1 := 0
	s := bufio.NewScanner(f)
	for s.Scan() {
		// id parent major:minor root mountpoint options [optional...] - fstype source superoptions
		fields := strings.Fields(s.Text())
		sep := -1
		for i, fl := range fields {
			if fl == "-" {
				sep = i
				break
			}
		}
		if sep < 5 || sep+1 >= len(fields) {
			continue
		}
		switch fields[sep+1] {
		case "cgroup":
			mounts = append(mounts, fields[4])
			v1++
		case "cgroup2":
			mounts = append(mounts, fields[4])
		}
	}
	if err := s.Err(); err != nil {
		return nil, false, err
	}
	if len(mounts) == 0 {
		return nil, false, fmt.Errorf("no cgroup hierarchy is mounted")
	}
	return mounts, v1 == 0, nil
}

// newCgroupTree creates /trellis-e2e-<pid>-<n> with a child "runtime" in
// every hierarchy. In a v1 cpuset hierarchy it copies the parent's cpus
// and mems, without which no process can join.
func newCgroupTree(t testing.TB) *cgroupTree {
	t.Helper()
	cgroupLeftover.Do(func() { removeLeftoverCgroups(t) })
	mounts, v2, err := cgroupMounts()
	if err != nil {
		t.Fatalf("cgroups: %v", err)
	}
	c := &cgroupTree{Name: fmt.Sprintf("/%s%d-%d", cgroupPrefix, os.Getpid(), cgroupSeq.Add(1)), v2: v2}
	for _, m := range mounts {
		dir := filepath.Join(m, c.Name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			c.remove()
			t.Fatalf("cgroups: %v", err)
		}
		c.dirs = append(c.dirs, dir)
		if v2 {
			// Give the subtree the controllers its parent has, so that
			// the kubelet's pod cgroups get them.
			if b, err := os.ReadFile(filepath.Join(m, "cgroup.subtree_control")); err == nil {
				var ctl []string
				for _, name := range strings.Fields(string(b)) {
					ctl = append(ctl, "+"+name)
				}
				_ = os.WriteFile(filepath.Join(dir, "cgroup.subtree_control"), []byte(strings.Join(ctl, " ")), 0o644)
			}
		}
		if err := os.Mkdir(filepath.Join(dir, "runtime"), 0o755); err != nil {
			c.remove()
			t.Fatalf("cgroups: %v", err)
		}
		if !v2 {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				if b, err := os.ReadFile(filepath.Join(m, f)); err == nil {
					_ = os.WriteFile(filepath.Join(dir, f), b, 0o644)
					_ = os.WriteFile(filepath.Join(dir, "runtime", f), b, 0o644)
				}
			}
		}
	}
	return c
}

// joinScript is shell that moves the shell ($$) into the subtree's
// "runtime" cgroup in every hierarchy; what it executes stays there.
func (c *cgroupTree) joinScript() string {
	var b strings.Builder
	for _, d := range c.dirs {
		fmt.Fprintf(&b, "echo $$ > %s\n", shellQuote(filepath.Join(d, "runtime", "cgroup.procs")))
	}
	return b.String()
}

// pids returns the processes in the subtree, in any hierarchy.
func (c *cgroupTree) pids() []int {
	seen := map[int]bool{}
	var out []int
	for _, d := range c.dirs {
		_ = filepath.WalkDir(d, func(path string, e os.DirEntry, err error) error {
			if err != nil || !e.IsDir() {
				return nil
			}
			b, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
			if err != nil {
				return nil
			}
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil && !seen[pid] {
					seen[pid] = true
					out = append(out, pid)
				}
			}
			return nil
		})
	}
	return out
}

// kill sends SIGKILL to every process in the subtree until none is left
// (new ones may appear while a shim or runc is forking), for at most
// timeout.
func (c *cgroupTree) kill(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		pids := c.pids()
		if len(pids) == 0 {
			return nil
		}
		// Only live processes count: a zombie stays listed until its
		// parent (here: this test process, for the ones it started)
		// reaps it.
		live := 0
		for _, pid := range pids {
			if alive(pid) {
				live++
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if live == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroup %s: %d processes still alive after SIGKILL for %v: %v", c.Name, live, timeout, pids)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// remove deletes the subtree's cgroups, deepest first. A cgroup with a
// process left (a zombie not yet reaped) cannot go: it retries for a few
// seconds.
func (c *cgroupTree) remove() error {
	var errs []error
	for _, d := range c.dirs {
		var dirs []string
		_ = filepath.WalkDir(d, func(path string, e os.DirEntry, err error) error {
			if err == nil && e.IsDir() {
				dirs = append(dirs, path)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			err := Poll(5*time.Second, func() error {
				err := syscall.Rmdir(dirs[i])
				if errors.Is(err, syscall.ENOENT) {
					return nil
				}
				return err
			})
			if err != nil {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", dirs[i], err))
			}
		}
	}
	return errors.Join(errs...)
}

// removeLeftoverCgroups kills what runs in, and removes, the cgroup
// subtrees of earlier runs whose test process is gone.
func removeLeftoverCgroups(t testing.TB) {
	mounts, _, err := cgroupMounts()
	if err != nil {
		return
	}
	names := map[string]bool{}
	for _, m := range mounts {
		entries, _ := os.ReadDir(m)
		for _, e := range entries {
			if sm := cgroupNameRE.FindStringSubmatch(e.Name()); sm != nil {
				pid, _ := strconv.Atoi(sm[1])
				if pid != os.Getpid() && !alive(pid) {
					names[e.Name()] = true
				}
			}
		}
	}
	for name := range names {
		c := &cgroupTree{Name: "/" + name}
		for _, m := range mounts {
			if _, err := os.Stat(filepath.Join(m, name)); err == nil {
				c.dirs = append(c.dirs, filepath.Join(m, name))
			}
		}
		err := errors.Join(c.kill(10*time.Second), c.remove())
		if err != nil {
			t.Logf("remove leftover cgroup %s of an earlier run: %v", name, err)
		} else {
			t.Logf("removed leftover cgroup %s of an earlier run", name)
		}
	}
}

// mountNamespaceScript is the shell that prepares the node's mount
// namespace (see the top of this file) after unshare --mount has made it.
// dir is the node runtime's directory.
func mountNamespaceScript(dir string) string {
	var b strings.Builder
	b.WriteString("set -e\n")
	b.WriteString("mount -t tmpfs -o mode=0755 trellis-node-run /run\n")
	for _, d := range []struct{ src, dst string }{
		{filepath.Join(dir, "var-lib-kubelet"), "/var/lib/kubelet"},
		{filepath.Join(dir, "var-log"), "/var/log"},
	} {
		fmt.Fprintf(&b, "mkdir -p %s\nmount --bind %s %s\n", shellQuote(d.src), shellQuote(d.src), d.dst)
	}
	fmt.Fprintf(&b, "mkdir -p %s\n", shellQuote(filepath.Join(dir, "sysctl")))
	for _, s := range sysctlsOfNode {
		f := shellQuote(filepath.Join(dir, "sysctl", strings.ReplaceAll(s, "/", ".")))
		fmt.Fprintf(&b, "cat /proc/sys/%s > %s\nmount --bind %s /proc/sys/%s\n", s, f, f, s)
	}
	return b.String()
}

// shellQuote quotes s for sh.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// nodeProc is a process of a node's runtime. Unlike Lab.Start it does not
// go through `ip netns exec` (see the top of this file); its log is
// reported like the lab's when the test fails.
type nodeProc struct {
	Name    string // for messages: program@node
	LogPath string
	cmd     *exec.Cmd
	done    chan struct{}
	exitErr error // set before done is closed
	started time.Time
}

// startNodeProc starts argv with stdout and stderr appended to logPath.
func startNodeProc(name, logPath string, argv ...string) (*nodeProc, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// If the test binary dies, so does the process (its shims and pods
	// are found by their cgroup in the next run).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	fmt.Fprintf(logf, "=== %s start: %s\n", time.Now().Format(time.RFC3339Nano), strings.Join(argv, " "))
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &nodeProc{Name: name, LogPath: logPath, cmd: cmd, done: make(chan struct{}), started: time.Now()}
	go func() {
		err := cmd.Wait()
		fmt.Fprintf(logf, "=== %s exit: %v\n", time.Now().Format(time.RFC3339Nano), exitStatus(err))
		logf.Close()
		p.exitErr = err
		close(p.done)
	}()
	return p, nil
}

// Pid is the process's ID (that of the program itself: nsenter and
// unshare execute it in their place).
func (p *nodeProc) Pid() int { return p.cmd.Process.Pid }

// Err is nil while the process runs, and how it exited afterwards,
// marked Permanent so that a Poll waiting on its work gives up.
func (p *nodeProc) Err() error {
	select {
	case <-p.done:
		return Permanent(fmt.Errorf("%s (pid %d) exited: %s; log: %s\n%s", p.Name, p.Pid(), exitStatus(p.exitErr), p.LogPath, tail(p.Log(), 15)))
	default:
		return nil
	}
}

// Stop sends SIGTERM, then SIGKILL after timeout, and waits. It is a
// no-op for a process that has exited.
func (p *nodeProc) Stop(timeout time.Duration) error {
	select {
	case <-p.done:
		return nil
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(timeout):
		_ = p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("%s (pid %d) ignored SIGTERM for %v and was killed", p.Name, p.Pid(), timeout)
	}
}

// Log returns the process's log so far.
func (p *nodeProc) Log() string {
	b, _ := os.ReadFile(p.LogPath)
	return string(b)
}

// report prints the end of the log and copies it to artifacts/<test>/.
func (p *nodeProc) report(t testing.TB, printTail bool) {
	data, err := os.ReadFile(p.LogPath)
	if err != nil {
		return
	}
	if printTail {
		t.Logf("---- last lines of %s (%s) ----\n%s", p.Name, p.LogPath, tail(string(data), 40))
	}
	dst := filepath.Join(artifactsDir, strings.ReplaceAll(t.Name(), "/", "_"))
	if os.MkdirAll(dst, 0o755) == nil {
		_ = os.WriteFile(filepath.Join(dst, strings.ReplaceAll(p.Name, "@", "-")+".log"), data, 0o644)
	}
}

// rssMiB returns the resident memory of process pid in MiB, or -1.
func rssMiB(pid int) float64 {
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
