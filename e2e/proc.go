//go:build e2e

package e2e

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// stopTimeout is how long Stop waits after SIGTERM before it sends SIGKILL.
const stopTimeout = 10 * time.Second

// privateRunWireguard is the shell prologue of every process the lab
// starts. `ip netns exec` gives the process its own mount namespace with /
// a slave of the host's, so a tmpfs mounted on /run/wireguard is seen by
// that process (and nsenter --mount) only: wireguard-go's UAPI sockets of
// nodes that all name their interface trellis-wg do not collide.
const privateRunWireguard = `mkdir -p /run/wireguard && mount -t tmpfs -o mode=0700 tmpfs /run/wireguard && exec "$@"`

// Proc is a long-running process in a namespace, started by Lab.Start. Its
// stdout and stderr go to LogPath. The lab stops it when the test ends.
type Proc struct {
	Name    string   // for messages: program@namespace
	NS      string   // network namespace
	Args    []string // program and arguments
	LogPath string
	lab     *Lab

	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{} // closed when cmd has exited; nil before the first start
	exitErr error         // cmd.Wait's result, set before done is closed
	started time.Time
}

// Start starts args in namespace ns, in a private mount namespace with its
// own tmpfs on /run/wireguard (see privateRunWireguard). The process's PID
// is that of args[0] itself.
func (l *Lab) Start(ns string, args ...string) *Proc {
	l.t.Helper()
	p, err := l.TryStart(ns, args...)
	if err != nil {
		l.t.Fatal(err)
	}
	return p
}

// TryStart is Start that returns an error instead of failing the test, for
// goroutines other than the test's.
func (l *Lab) TryStart(ns string, args ...string) (*Proc, error) {
	name := filepath.Base(args[0]) + "@" + strings.TrimPrefix(ns, l.prefix)
	l.mu.Lock()
	p := &Proc{
		Name:    name,
		NS:      ns,
		Args:    args,
		LogPath: filepath.Join(l.dir, fmt.Sprintf("%02d-%s.log", len(l.procs), strings.ReplaceAll(name, "@", "-"))),
		lab:     l,
	}
	l.procs = append(l.procs, p)
	l.mu.Unlock()
	if err := p.start(); err != nil {
		return nil, err
	}
	return p, nil
}

func (p *Proc) start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done != nil {
		select {
		case <-p.done:
		default:
			return fmt.Errorf("start %s: already running as pid %d", p.Name, p.cmd.Process.Pid)
		}
	}
	logf, err := os.OpenFile(p.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("start %s: %w", p.Name, err)
	}
	argv := append([]string{"ip", "netns", "exec", p.NS, "sh", "-c", privateRunWireguard, "sh"}, p.Args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	// If the test binary dies, so do its processes.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	fmt.Fprintf(logf, "=== %s start: %s\n", time.Now().Format(time.RFC3339Nano), strings.Join(p.Args, " "))
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", p.Name, err)
	}
	done := make(chan struct{})
	p.cmd, p.done, p.exitErr, p.started = cmd, done, nil, time.Now()
	go func() {
		err := cmd.Wait()
		fmt.Fprintf(logf, "=== %s exit: %v\n", time.Now().Format(time.RFC3339Nano), exitStatus(err))
		logf.Close()
		p.mu.Lock()
		p.exitErr = err
		p.mu.Unlock()
		close(done)
	}()
	return nil
}

func exitStatus(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// Pid is the process ID of the current run.
func (p *Proc) Pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd.Process.Pid
}

// StartedAt is when the current run started.
func (p *Proc) StartedAt() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.started
}

// Running reports whether the current run has not exited.
func (p *Proc) Running() bool {
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	select {
	case <-done:
		return false
	default:
		return true
	}
}

// Err describes the process's state for failure messages: nil while it
// runs, otherwise how it exited, marked Permanent so that a Poll on the
// process's work gives up.
func (p *Proc) Err() error {
	if p.Running() {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return Permanent(fmt.Errorf("%s (pid %d) exited: %s; log: %s", p.Name, p.cmd.Process.Pid, exitStatus(p.exitErr), p.LogPath))
}

// Stop sends SIGTERM, then SIGKILL if the process has not exited after
// stopTimeout, and waits for it. It returns how the process exited and is a
// no-op for a stopped process.
func (p *Proc) Stop() error {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if done == nil {
		return nil
	}
	select {
	case <-done:
		return nil
	default:
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(stopTimeout):
		_ = cmd.Process.Kill()
		<-done
		p.mu.Lock()
		defer p.mu.Unlock()
		return fmt.Errorf("%s (pid %d) ignored SIGTERM for %v and was killed", p.Name, cmd.Process.Pid, stopTimeout)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	var exit *exec.ExitError
	if errors.As(p.exitErr, &exit) && exit.Exited() && exit.ExitCode() != 0 {
		return fmt.Errorf("%s (pid %d) exited with status %d after SIGTERM", p.Name, cmd.Process.Pid, exit.ExitCode())
	}
	return nil
}

// Restart stops the process and starts it again with the same arguments
// and log file.
func (p *Proc) Restart() error {
	stopErr := p.Stop()
	if err := p.start(); err != nil {
		return err
	}
	return stopErr
}

// Nsenter runs a command in the process's network and mount namespaces, so
// that it sees the process's private /run/wireguard (for `wg show`).
func (p *Proc) Nsenter(args ...string) (string, error) {
	return run(append([]string{"nsenter", "--target", fmt.Sprint(p.Pid()), "--mount", "--net"}, args...)...)
}

// Log returns the process's log so far.
func (p *Proc) Log() string {
	b, _ := os.ReadFile(p.LogPath)
	return string(b)
}
