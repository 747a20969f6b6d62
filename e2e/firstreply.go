//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
)

// probeInterval is how often a first-reply prober sends an ICMP echo to
// each target that has not answered yet.
const probeInterval = 20 * time.Millisecond

func init() { extraHelpers["first-reply"] = firstReplyHelper }

// firstReplyHelper pings every IPv4 address listed in the file at path
// (one a line; lines are appended while it runs) every probeInterval,
// until each has answered once, and prints "reply ADDR UNIXNANO" for the
// first reply of each. It runs until killed.
func firstReplyHelper(path string) error {
	c, err := icmp.ListenPacket("ip4:icmp", "0.0.0.0")
	if err != nil {
		return err
	}
	defer c.Close()
	id := os.Getpid() & 0xffff
	var mu sync.Mutex
	answered := map[netip.Addr]bool{}
	out := bufio.NewWriter(os.Stdout)
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			at := time.Now()
			m, err := icmp.ParseMessage(1, buf[:n])
			if err != nil || m.Type != ipv4.ICMPTypeEchoReply {
				continue
			}
			if e, ok := m.Body.(*icmp.Echo); !ok || e.ID != id {
				continue
			}
			ip, ok := netip.AddrFromSlice(from.(*net.IPAddr).IP)
			if !ok {
				continue
			}
			ip = ip.Unmap()
			mu.Lock()
			if !answered[ip] {
				answered[ip] = true
				fmt.Fprintf(out, "reply %s %d\n", ip, at.UnixNano())
				out.Flush()
			}
			mu.Unlock()
		}
	}()
	var targets []netip.Addr
	var read int
	for seq := 0; ; seq++ {
		if b, err := os.ReadFile(path); err == nil && len(b) > read {
			// Only whole lines: the harness may be writing the last one.
			end := bytes.LastIndexByte(b, '\n') + 1
			for _, l := range strings.Fields(string(b[read:end])) {
				if a, err := netip.ParseAddr(l); err == nil {
					targets = append(targets, a)
				}
			}
			read = end
		}
		msg := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: id, Seq: seq & 0xffff, Data: []byte("trellis-first-reply")}}
		pkt, err := msg.Marshal(nil)
		if err != nil {
			return err
		}
		for _, a := range targets {
			mu.Lock()
			done := answered[a]
			mu.Unlock()
			if !done {
				// No route yet is expected while the node joins.
				_, _ = c.WriteTo(pkt, &net.IPAddr{IP: a.AsSlice()})
			}
		}
		time.Sleep(probeInterval)
	}
}

// prober is a first-reply helper running in a namespace.
type prober struct {
	proc    *Proc
	targets string // the file it reads its targets from
	mu      sync.Mutex
}

// startProber starts a first-reply prober in namespace ns with no
// targets yet.
func startProber(l *Lab, ns string) *prober {
	l.t.Helper()
	self, err := os.Executable()
	if err != nil {
		l.t.Fatal(err)
	}
	targets := filepath.Join(l.TempDir("probe"), "targets")
	if err := os.WriteFile(targets, nil, 0o644); err != nil {
		l.t.Fatal(err)
	}
	return &prober{proc: l.Start(ns, "env", helperEnv+"=first-reply", self, targets), targets: targets}
}

// add makes the prober ping a.
func (p *prober) add(a netip.Addr) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	f, err := os.OpenFile(p.targets, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(f, a)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// replies returns the time of the first reply from each target so far.
func (p *prober) replies() map[netip.Addr]time.Time {
	out := map[netip.Addr]time.Time{}
	for _, l := range strings.Split(p.proc.Log(), "\n") {
		f := strings.Fields(l)
		if len(f) != 3 || f[0] != "reply" {
			continue
		}
		a, err := netip.ParseAddr(f[1])
		ns, err2 := strconv.ParseInt(f[2], 10, 64)
		if err == nil && err2 == nil {
			out[a] = time.Unix(0, ns)
		}
	}
	return out
}
