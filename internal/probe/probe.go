// Package probe sends ICMP echo requests across the mesh: small ones to
// measure the round trip, and a large one that routers may not fragment,
// to find MTU black holes (a path that carries small packets and silently
// drops full-sized ones).
package probe

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// Defaults of Options.
const (
	DefaultCount   = 3
	DefaultTimeout = time.Second
	// headerV4 and headerV6 are the IP header sizes; icmpHeader the ICMP
	// echo header.
	headerV4   = 20
	headerV6   = 40
	icmpHeader = 8
)

// Options says what to send. Zero fields take the defaults.
type Options struct {
	// Count is the number of small echo requests; default DefaultCount.
	Count int
	// Timeout is how long to wait for each reply; default DefaultTimeout.
	Timeout time.Duration
	// LargeSize is the size of the whole IP packet of the large probe,
	// sent with fragmentation forbidden (DF); 0 sends none.
	LargeSize int
	// Source is the address to send from; the zero value lets the kernel
	// choose.
	Source netip.Addr
}

// Result is what a probe of one address saw.
type Result struct {
	Sent, Received int
	// RTT is the mean round trip of the replies to the small requests.
	RTT time.Duration
	// LargeSize is the size of the large probe sent (0: none), LargeOK
	// whether it was answered.
	LargeSize int
	LargeOK   bool
}

// Ping probes dst: Count small echo requests one after the other, then the
// large one (twice if the first goes unanswered). It needs CAP_NET_RAW
// (a raw ICMP socket). An error means the probe could not be sent at all;
// lost replies are in the Result.
func Ping(ctx context.Context, dst netip.Addr, o Options) (Result, error) {
	var res Result
	if o.Count <= 0 {
		o.Count = DefaultCount
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	dst = dst.Unmap()
	if !dst.IsValid() {
		return res, errors.New("probe: no target address")
	}
	c, err := open(dst, o.Source)
	if err != nil {
		return res, err
	}
	defer c.Close()
	idb := make([]byte, 2)
	if _, err := rand.Read(idb); err != nil {
		return res, err
	}
	p := &pinger{c: c, dst: dst, id: int(binary.BigEndian.Uint16(idb)), timeout: o.Timeout}
	var total time.Duration
	for i := 0; i < o.Count && ctx.Err() == nil; i++ {
		res.Sent++
		rtt, ok, err := p.echo(ctx, 0)
		if err != nil {
			return res, err
		}
		if ok {
			res.Received++
			total += rtt
		}
	}
	if res.Received > 0 {
		res.RTT = total / time.Duration(res.Received)
	}
	if o.LargeSize > 0 {
		res.LargeSize = o.LargeSize
		for try := 0; try < 2 && !res.LargeOK && ctx.Err() == nil; try++ {
			_, ok, err := p.echo(ctx, o.LargeSize)
			if err != nil {
				return res, err
			}
			res.LargeOK = ok
		}
	}
	return res, nil
}

type pinger struct {
	c       *net.IPConn
	dst     netip.Addr
	id      int
	seq     int
	timeout time.Duration
}

// open returns a raw ICMP socket towards dst's family that forbids
// fragmentation of what it sends.
func open(dst, src netip.Addr) (*net.IPConn, error) {
	network, laddr := "ip4:icmp", "0.0.0.0"
	if dst.Is6() {
		network, laddr = "ip6:ipv6-icmp", "::"
	}
	if src.IsValid() {
		laddr = src.Unmap().String()
	}
	pc, err := net.ListenPacket(network, laddr)
	if err != nil {
		return nil, fmt.Errorf("probe: open an ICMP socket (needs root or CAP_NET_RAW): %w", err)
	}
	c := pc.(*net.IPConn)
	rc, err := c.SyscallConn()
	if err != nil {
		c.Close()
		return nil, err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		if dst.Is6() {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_MTU_DISCOVER, unix.IPV6_PMTUDISC_PROBE)
			if serr == nil {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_DONTFRAG, 1)
			}
			return
		}
		// PROBE: set DF and ignore the cached path MTU, so the large
		// packet really leaves at its size.
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_PROBE)
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("probe: forbid fragmentation: %w", err)
	}
	return c, nil
}

// echo sends one echo request whose IP packet has size bytes (0: a
// small one) and waits for its reply.
func (p *pinger) echo(ctx context.Context, size int) (time.Duration, bool, error) {
	p.seq++
	payload := 56
	if size > 0 {
		hdr := headerV4
		if p.dst.Is6() {
			hdr = headerV6
		}
		payload = size - hdr - icmpHeader
		if payload < 8 {
			return 0, false, fmt.Errorf("probe: size %d is too small", size)
		}
	}
	data := make([]byte, payload)
	for i := range data {
		data[i] = byte(i)
	}
	var typ icmp.Type = ipv4.ICMPTypeEcho
	proto := 1
	if p.dst.Is6() {
		typ, proto = ipv6.ICMPTypeEchoRequest, 58
	}
	msg := icmp.Message{Type: typ, Body: &icmp.Echo{ID: p.id, Seq: p.seq, Data: data}}
	b, err := msg.Marshal(nil) // the kernel fills in the ICMPv6 checksum
	if err != nil {
		return 0, false, err
	}
	deadline := time.Now().Add(p.timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	if err := p.c.SetDeadline(deadline); err != nil {
		return 0, false, err
	}
	start := time.Now()
	if _, err := p.c.WriteToIP(b, &net.IPAddr{IP: p.dst.AsSlice()}); err != nil {
		if errors.Is(err, syscall.EMSGSIZE) {
			return 0, false, fmt.Errorf("probe: %d bytes exceed the MTU of the interface towards %s", size, p.dst)
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return 0, false, nil
		}
		// No route, host unreachable: the target does not answer.
		return 0, false, nil
	}
	buf := make([]byte, 65536)
	for {
		n, from, err := p.c.ReadFrom(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return 0, false, nil
			}
			return 0, false, fmt.Errorf("probe: read: %w", err)
		}
		ia, ok := from.(*net.IPAddr)
		if !ok {
			continue
		}
		if a, ok := netip.AddrFromSlice(ia.IP); !ok || a.Unmap() != p.dst {
			continue
		}
		m, err := icmp.ParseMessage(proto, buf[:n])
		if err != nil {
			continue
		}
		echo, ok := m.Body.(*icmp.Echo)
		if !ok || echo.ID != p.id || echo.Seq != p.seq {
			continue
		}
		if m.Type != ipv4.ICMPTypeEchoReply && m.Type != ipv6.ICMPTypeEchoReply {
			continue
		}
		return time.Since(start), true, nil
	}
}
