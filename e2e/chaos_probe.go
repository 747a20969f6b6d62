//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The chaos suite's probes: in every pod a UDP echo server (next to the
// TCP one of Pod.ServeEcho) and a prober that checks every other pod over
// TCP and UDP several times a second and logs each change of a pair's
// state. The test reads the logs to tell when the mesh was whole.

const (
	// udpEchoPort is the UDP echo port in every chaos pod.
	udpEchoPort = 7778
	// chaosProbeInterval is how often a prober probes each target with
	// each protocol.
	chaosProbeInterval = 400 * time.Millisecond
	// chaosProbeTimeout bounds one probe.
	chaosProbeTimeout = time.Second
)

func init() {
	extraHelpers["udp-echo-server"] = udpEchoServer
	extraHelpers["chaos-probe"] = chaosProbeHelper
}

// udpEchoServer answers every datagram on addr with itself, until killed.
func udpEchoServer(addr string) error {
	c, err := net.ListenPacket("udp", addr)
	if err != nil {
		return err
	}
	buf := make([]byte, 2048)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return err
		}
		_, _ = c.WriteTo(buf[:n], from)
	}
}

// chaosProbeHelper probes every address listed (comma-separated) in arg
// over TCP (EchoPort) and UDP (udpEchoPort) every chaosProbeInterval, and
// prints "<unixnano> <addr> <tcp|udp> <up|down>" when a pair's state
// changes (a pair starts down), and every 10 s "count <addr> <proto> <ok>
// <failed>". It runs until killed.
func chaosProbeHelper(arg string) error {
	var targets []netip.Addr
	for _, s := range strings.Split(arg, ",") {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return fmt.Errorf("target %q: %w", s, err)
		}
		targets = append(targets, a)
	}
	var mu sync.Mutex
	out := bufio.NewWriter(os.Stdout)
	emit := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintf(out, format+"\n", args...)
		out.Flush()
	}
	var wg sync.WaitGroup
	for _, a := range targets {
		for _, proto := range []string{"tcp", "udp"} {
			wg.Go(func() {
				up := false
				ok, failed := 0, 0
				lastCount := time.Now()
				emit("%d %s %s down", time.Now().UnixNano(), a, proto)
				for seq := 0; ; seq++ {
					start := time.Now()
					err := probeOnce(proto, a, seq)
					if err == nil {
						ok++
					} else {
						failed++
					}
					if (err == nil) != up {
						up = err == nil
						state := "down"
						if up {
							state = "up"
						}
						emit("%d %s %s %s", time.Now().UnixNano(), a, proto, state)
					}
					if time.Since(lastCount) > 10*time.Second {
						emit("count %s %s %d %d", a, proto, ok, failed)
						lastCount = time.Now()
					}
					if d := chaosProbeInterval - time.Since(start); d > 0 {
						time.Sleep(d)
					}
				}
			})
		}
	}
	wg.Wait()
	return nil
}

// probeOnce sends one echo to a over proto and checks the answer.
func probeOnce(proto string, a netip.Addr, seq int) error {
	ctx, cancel := context.WithTimeout(context.Background(), chaosProbeTimeout)
	defer cancel()
	port := EchoPort
	if proto == "udp" {
		port = udpEchoPort
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, proto, netip.AddrPortFrom(a, uint16(port)).String())
	if err != nil {
		return err
	}
	defer c.Close()
	dl, _ := ctx.Deadline()
	_ = c.SetDeadline(dl)
	want := fmt.Sprintf("chaos %d %d %d\n", os.Getpid(), seq, time.Now().UnixNano())
	if _, err := io.WriteString(c, want); err != nil {
		return err
	}
	buf := make([]byte, len(want))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != want {
		return fmt.Errorf("echo: sent %q, got %q", want, buf)
	}
	return nil
}

// pairEvent is a change of one probed pair's state.
type pairEvent struct {
	at   time.Time
	pair string // "from→to/proto"
	up   bool
}

// parseProbeLog returns the state changes a prober in the pod of node
// from logged.
func parseProbeLog(from, log string, names map[netip.Addr]string) []pairEvent {
	var evs []pairEvent
	for _, l := range strings.Split(log, "\n") {
		f := strings.Fields(l)
		if len(f) != 4 || (f[3] != "up" && f[3] != "down") {
			continue
		}
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			continue
		}
		a, err := netip.ParseAddr(f[1])
		if err != nil {
			continue
		}
		evs = append(evs, pairEvent{at: time.Unix(0, ns), pair: from + "→" + names[a] + "/" + f[2], up: f[3] == "up"})
	}
	return evs
}

// probeCounts sums the last "count" lines of a prober's log: probes that
// got an answer and probes that did not.
func probeCounts(log string) (ok, failed int) {
	last := map[string][2]int{}
	for _, l := range strings.Split(log, "\n") {
		f := strings.Fields(l)
		if len(f) != 5 || f[0] != "count" {
			continue
		}
		o, _ := strconv.Atoi(f[3])
		x, _ := strconv.Atoi(f[4])
		last[f[1]+"/"+f[2]] = [2]int{o, x}
	}
	for _, v := range last {
		ok += v[0]
		failed += v[1]
	}
	return ok, failed
}

// meshTimeline is when the mesh was whole: every probed pair up.
type meshTimeline struct {
	events []pairEvent // sorted by time
	pairs  int         // pairs probed
}

func newMeshTimeline(evs []pairEvent, pairs int) *meshTimeline {
	slices.SortStableFunc(evs, func(a, b pairEvent) int { return a.at.Compare(b.at) })
	return &meshTimeline{events: evs, pairs: pairs}
}

// wholeAfter returns the first time at or after t from which every pair
// stayed up for at least stable, and whether there is one. The down
// pairs at that time are returned when there is none.
func (m *meshTimeline) wholeAfter(t time.Time, stable time.Duration) (time.Time, bool, []string) {
	state := map[string]bool{}
	down := func() int {
		n := m.pairs - len(state)
		for _, up := range state {
			if !up {
				n++
			}
		}
		return n
	}
	var candidate time.Time
	for _, e := range m.events {
		if !e.at.After(t) {
			state[e.pair] = e.up
			continue
		}
		if candidate.IsZero() && down() == 0 {
			candidate = t
		}
		if !candidate.IsZero() && e.at.Sub(candidate) >= stable {
			return candidate, true, nil
		}
		state[e.pair] = e.up
		if down() == 0 {
			if candidate.IsZero() {
				candidate = e.at
			}
		} else {
			candidate = time.Time{}
		}
	}
	if candidate.IsZero() && down() == 0 {
		candidate = t
	}
	if !candidate.IsZero() {
		// Whole from candidate to the end of the record; the caller's end
		// of the record decides whether that was long enough.
		return candidate, true, nil
	}
	var missing []string
	for p, up := range state {
		if !up {
			missing = append(missing, p)
		}
	}
	slices.Sort(missing)
	return time.Time{}, false, missing
}

// upAt returns the pairs that came up at t (the last to come up when t is
// a time wholeAfter returned).
func (m *meshTimeline) upAt(t time.Time) []string {
	var out []string
	for _, e := range m.events {
		if e.at.Equal(t) && e.up {
			out = append(out, e.pair)
		}
	}
	return out
}

// scoped is the timeline of the pairs from or to one of scope's nodes,
// among nodes (every pair probed both ways, over TCP and UDP).
func (m *meshTimeline) scoped(scope, nodes []string) *meshTimeline {
	in := func(pair string) bool {
		from, rest, _ := strings.Cut(pair, "→")
		to, _, _ := strings.Cut(rest, "/")
		return slices.Contains(scope, from) || slices.Contains(scope, to)
	}
	pairs := 0
	for _, a := range nodes {
		for _, b := range nodes {
			if a != b && (slices.Contains(scope, a) || slices.Contains(scope, b)) {
				pairs += 2
			}
		}
	}
	var evs []pairEvent
	for _, e := range m.events {
		if in(e.pair) {
			evs = append(evs, e)
		}
	}
	return &meshTimeline{events: evs, pairs: pairs}
}
