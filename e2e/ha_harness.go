//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"strings"
	"time"
)

// Kill ends the process with SIGKILL, as a crash or a power cut would
// (nothing is cleaned up: a kernel WireGuard device stays), and waits
// for it.
func (p *Proc) Kill() {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if done == nil {
		return
	}
	select {
	case <-done:
		return
	default:
	}
	_ = cmd.Process.Kill()
	<-done
}

// Start starts a stopped or killed process again with the same arguments
// and log file.
func (p *Proc) Start() error { return p.start() }

// LogLinesSince returns the lines of the process's log that contain every
// one of subs and were written after offset bytes, and the log's size.
func (p *Proc) LogLinesSince(offset int64, subs ...string) ([]string, int64) {
	b, err := os.ReadFile(p.LogPath)
	if err != nil || int64(len(b)) < offset {
		return nil, offset
	}
	var out []string
	for _, line := range strings.Split(string(b[offset:]), "\n") {
		ok := true
		for _, s := range subs {
			if !strings.Contains(line, s) {
				ok = false
				break
			}
		}
		if ok && line != "" {
			out = append(out, line)
		}
	}
	return out, int64(len(b))
}

// LogSize is the size of the process's log so far.
func (p *Proc) LogSize() int64 {
	fi, err := os.Stat(p.LogPath)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// waitLogLine waits until p logs a line (after offset) containing every
// one of subs, and returns when it saw it.
func waitLogLine(p *Proc, offset int64, timeout time.Duration, subs ...string) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	for {
		if lines, _ := p.LogLinesSince(offset, subs...); len(lines) > 0 {
			return time.Now(), nil
		}
		if time.Now().After(deadline) {
			return time.Time{}, fmt.Errorf("%s logged no line with %q within %v", p.Name, subs, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
