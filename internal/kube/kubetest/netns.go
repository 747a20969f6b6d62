package kubetest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// DialContext dials from where the API server runs (its NetNS, or this
// host), for example to reach a port that kubectl port-forward listens on.
func (e *Env) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return e.dial(ctx, network, addr)
}

// KubectlCommand returns a kubectl command with the admin kubeconfig,
// run in the API server's NetNS if it has one (for long-running
// commands such as port-forward).
func (e *Env) KubectlCommand(ctx context.Context, args ...string) *exec.Cmd {
	argv := append([]string{e.kubectl, "--kubeconfig", e.AdminKubeconfig}, args...)
	if e.netns != "" {
		argv = append([]string{"nsenter", "--net=" + netnsPath(e.netns), "--"}, argv...)
	}
	return exec.CommandContext(ctx, argv[0], argv[1:]...)
}

// netnsPath is the file of network namespace ns, as `ip netns add` makes
// it.
func netnsPath(ns string) string { return filepath.Join("/run/netns", ns) }

// netnsDialer returns a dial function whose sockets are created in network
// namespace ns, so that this process (in the host's namespace) reaches
// addresses that exist only there. A socket stays in the namespace it was
// created in, so only its creation runs on a thread moved into ns; if that
// thread cannot be moved back, it is left locked and exits with its
// goroutine instead of serving other goroutines in the wrong namespace.
func netnsDialer(ns string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		type result struct {
			c   net.Conn
			err error
		}
		ch := make(chan result, 1)
		go func() {
			runtime.LockOSThread()
			c, back, err := dialInNetNS(ctx, ns, network, addr)
			if back {
				runtime.UnlockOSThread()
			}
			ch <- result{c, err}
		}()
		r := <-ch
		return r.c, r.err
	}
}

// dialInNetNS dials from namespace ns on the current (locked) thread and
// reports whether the thread is back in its own namespace.
func dialInNetNS(ctx context.Context, ns, network, addr string) (c net.Conn, back bool, err error) {
	self, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return nil, true, fmt.Errorf("dial %s in netns %s: %w", addr, ns, err)
	}
	defer self.Close()
	target, err := os.Open(netnsPath(ns))
	if err != nil {
		return nil, true, fmt.Errorf("dial %s in netns %s: %w", addr, ns, err)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		return nil, true, fmt.Errorf("dial %s: enter netns %s: %w", addr, ns, err)
	}
	c, err = (&net.Dialer{Timeout: 10 * time.Second}).DialContext(ctx, network, addr)
	if err != nil {
		err = fmt.Errorf("in netns %s: %w", ns, err)
	}
	return c, unix.Setns(int(self.Fd()), unix.CLONE_NEWNET) == nil, err
}
