// Package meshtest creates throwaway network namespaces, veth links and
// node processes for tests that need a real data plane.
//
// Everything it creates is registered with t.Cleanup and removed also
// when the test fails. Tests that use it need root; RequireRoot skips
// them otherwise.
package meshtest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

// RequireRoot skips t unless it runs as root with the ip tool and
// /dev/net/tun available.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: this test creates network namespaces and needs root (run: sudo go test ./...)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("skipping: the ip tool (iproute2) is not installed")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("skipping: /dev/net/tun is not available")
	}
}

var seq atomic.Int64

// Name returns a network namespace name unique to this process and
// call, starting with prefix.
func Name(prefix string) string {
	return fmt.Sprintf("%s-%d-%d", prefix, os.Getpid(), seq.Add(1))
}

// NetNS creates a network namespace named name (see Name), brings its
// loopback up and deletes it when the test ends.
func NetNS(t testing.TB, name string) string {
	t.Helper()
	IP(t, "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Logf("cleanup: ip netns del %s: %v: %s", name, err, out)
		}
	})
	IP(t, "-n", name, "link", "set", "lo", "up")
	return name
}

// Veth joins namespace nsA (interface ifA, address addrA such as
// "192.0.2.1/24") and nsB (ifB, addrB) with a veth pair, both up. The
// pair disappears with the namespaces.
func Veth(t testing.TB, nsA, ifA, addrA, nsB, ifB, addrB string) {
	t.Helper()
	IP(t, "link", "add", ifA, "netns", nsA, "type", "veth", "peer", "name", ifB, "netns", nsB)
	IP(t, "-n", nsA, "addr", "add", addrA, "dev", ifA)
	IP(t, "-n", nsB, "addr", "add", addrB, "dev", ifB)
	IP(t, "-n", nsA, "link", "set", ifA, "up")
	IP(t, "-n", nsB, "link", "set", ifB, "up")
}

// IP runs the ip tool and fails t on error. It returns stdout.
func IP(t testing.TB, args ...string) string {
	t.Helper()
	out, err := Run("ip", args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Exec runs name with args inside network namespace ns and returns its
// stdout, or an error that includes stderr.
func Exec(ns, name string, args ...string) (string, error) {
	return Run("ip", append([]string{"netns", "exec", ns, name}, args...)...)
}

// Run runs a command with a 30 s limit and returns its stdout, or an
// error that includes stderr.
func Run(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// Ping sends count pings from namespace ns to addr and reports whether
// any answer came back within the deadline.
func Ping(ns, addr string, count int) error {
	_, err := Exec(ns, "ping", "-n", "-q", "-c", fmt.Sprint(count), "-W", "2", addr)
	return err
}

// NodeCommand returns a command that runs name with args inside network
// namespace ns with a private tmpfs on /run/wireguard, as every node of a
// multi-node test on one machine needs (wireguard-go's UAPI sockets live
// in that host-wide directory). `ip netns exec` already gives the process
// its own mount namespace, so the tmpfs is invisible to the host.
func NodeCommand(ctx context.Context, ns, name string, args ...string) *exec.Cmd {
	script := `mkdir -p /run/wireguard && mount -t tmpfs -o mode=0755 tmpfs /run/wireguard && exec "$0" "$@"`
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, "sh", "-c", script, name}, args...)...)
}

// InNetNS runs fn on an OS thread that has entered network namespace ns
// (a name under /var/run/netns) and returns its error. The thread is
// discarded afterwards, so no other goroutine ever runs in ns by
// accident. Sockets and netlink handles fn opens stay in ns.
func InNetNS(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: the runtime ends the thread when this
		// goroutine returns, instead of reusing it in the wrong namespace.
		runtime.LockOSThread()
		h, err := netns.GetFromName(ns)
		if err != nil {
			errc <- fmt.Errorf("open network namespace %s: %w", ns, err)
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			errc <- fmt.Errorf("enter network namespace %s: %w", ns, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}
