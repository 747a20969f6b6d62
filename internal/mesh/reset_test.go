package mesh_test

import (
	"errors"
	"net"
	"net/netip"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/mesh"

	"github.com/trellis-mesh/trellis/internal/mesh/meshtest"
)

// delayRelay forwards UDP between two WireGuard devices with a fixed
// one-way delay, as a long path would: a endpoint sends to sideA and
// appears to b as coming from sideB, and the other way round.
type delayRelay struct {
	sideA, sideB *net.UDPConn // a talks to sideA, b to sideB
	wg           sync.WaitGroup
}

type delayed struct {
	at  time.Time
	pkt []byte
}

// startDelayRelay opens the relay's sockets on addr (ports picked by the
// kernel) in network namespace ns; packets from sideA go to b, from sideB
// to a, each after delay.
func startDelayRelay(t *testing.T, ns string, addr netip.Addr, a, b netip.AddrPort, delay time.Duration) *delayRelay {
	t.Helper()
	r := &delayRelay{}
	err := meshtest.InNetNS(ns, func() error {
		var err error
		if r.sideA, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr, 0))); err != nil {
			return err
		}
		r.sideB, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr, 0)))
		return err
	})
	if err != nil {
		t.Fatalf("relay sockets in %s: %v", ns, err)
	}
	r.forward(r.sideA, r.sideB, b, delay)
	r.forward(r.sideB, r.sideA, a, delay)
	t.Cleanup(r.close)
	return r
}

func (r *delayRelay) forward(from, to *net.UDPConn, dst netip.AddrPort, delay time.Duration) {
	q := make(chan delayed, 1024)
	r.wg.Add(2)
	go func() {
		defer r.wg.Done()
		defer close(q)
		buf := make([]byte, 65535)
		for {
			n, _, err := from.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			select {
			case q <- delayed{at: time.Now().Add(delay), pkt: append([]byte(nil), buf[:n]...)}:
			default: // full: lost, as on a real path
			}
		}
	}()
	go func() {
		defer r.wg.Done()
		for d := range q {
			time.Sleep(time.Until(d.at))
			if _, err := to.WriteToUDPAddrPort(d.pkt, dst); err != nil && errors.Is(err, net.ErrClosed) {
				return
			}
		}
	}()
}

func (r *delayRelay) close() {
	r.sideA.Close()
	r.sideB.Close()
	r.wg.Wait()
}

func (r *delayRelay) portA() uint16 { return uint16(r.sideA.LocalAddr().(*net.UDPAddr).Port) }
func (r *delayRelay) portB() uint16 { return uint16(r.sideB.LocalAddr().(*net.UDPAddr).Port) }

// TestResetPeerEndsCrossedHandshakes makes two nodes that learn of each
// other at the same moment over a path with 300 ms one-way delay: both
// send a handshake initiation at once, each answers the other's and drops
// the answer to its own, and neither has a session (WireGuard would retry
// only after 5 s, and with traffic on both sides cross again). ResetPeer
// on one side completes the handshake within a round trip or two.
func TestResetPeerEndsCrossedHandshakes(t *testing.T) {
	meshtest.RequireRoot(t)
	if _, err := exec.LookPath("wg"); err != nil {
		t.Skip("skipping: wireguard-tools (wg) is not installed")
	}
	const delay = 300 * time.Millisecond
	nsA := meshtest.NetNS(t, meshtest.Name("trm-a"))
	nsB := meshtest.NetNS(t, meshtest.Name("trm-b"))
	meshtest.Veth(t, nsA, "va", "192.0.2.1/24", nsB, "vb", "192.0.2.2/24")
	addrA := netip.MustParseAddr("192.0.2.1")
	relay := startDelayRelay(t, nsA, addrA,
		netip.AddrPortFrom(addrA, mesh.DefaultListenPort), netip.MustParseAddrPort("192.0.2.2:51820"), delay)

	keyA, keyB := newKey(t), newKey(t)
	pubA, pubB := [32]byte(keyA.PublicKey()), [32]byte(keyB.PublicKey())
	a, b := startNode(t, nsA), startNode(t, nsB)
	a.must(nodeRequest{Op: "open", Config: mesh.Config{PrivateKey: keyA, Mode: mesh.ModeUserspace}})
	b.must(nodeRequest{Op: "open", Config: mesh.Config{PrivateKey: keyB, Mode: mesh.ModeUserspace}})
	a.must(nodeRequest{Op: "addrs", Prefixes: pfx("10.42.0.0/32")})
	b.must(nodeRequest{Op: "addrs", Prefixes: pfx("10.42.1.0/32")})
	a.must(nodeRequest{Op: "routes", Prefixes: pfx("10.42.0.0/16")})
	b.must(nodeRequest{Op: "routes", Prefixes: pfx("10.42.0.0/16")})

	// Both add the other within a few milliseconds, far less than the
	// delay: with a keepalive, each sends an initiation at once.
	start := time.Now()
	a.must(nodeRequest{Op: "peers", Peers: []mesh.Peer{{PublicKey: pubB, Endpoint: netip.AddrPortFrom(addrA, relay.portA()),
		AllowedIPs: pfx("10.42.1.0/24"), PersistentKeepalive: 25 * time.Second}}})
	b.must(nodeRequest{Op: "peers", Peers: []mesh.Peer{{PublicKey: pubA, Endpoint: netip.AddrPortFrom(addrA, relay.portB()),
		AllowedIPs: pfx("10.42.0.0/24"), PersistentKeepalive: 25 * time.Second}}})
	if d := time.Since(start); d > delay/2 {
		t.Skipf("configuring both nodes took %v, too long for the initiations to cross", d)
	}

	// Both initiations have arrived and been answered; both answers are
	// dropped. No session, on either side.
	time.Sleep(3 * delay)
	if st := a.status(pubB); !st.LastHandshake.IsZero() || st.TransmitBytes == 0 || st.ReceiveBytes == 0 {
		t.Fatalf("A's view of B %v after the crossed initiations: %+v; want no handshake, an initiation sent and one received", time.Since(start), st)
	}
	if st := b.status(pubA); !st.LastHandshake.IsZero() {
		t.Fatalf("B has a handshake with A after crossed initiations: %+v", st)
	}

	// One side starts over, well before WireGuard's own retry at 5 s.
	time.Sleep(time.Second)
	reset := time.Now()
	a.must(nodeRequest{Op: "reset", Key: pubB})
	var got mesh.PeerStatus
	for deadline := reset.Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if got = b.status(pubA); !got.LastHandshake.IsZero() && !a.status(pubB).LastHandshake.IsZero() {
			break
		}
	}
	if got.LastHandshake.IsZero() || a.status(pubB).LastHandshake.IsZero() {
		t.Fatalf("no handshake %v after ResetPeer (%v after the peers were added); A: %+v, B: %+v",
			time.Since(reset), time.Since(start), a.status(pubB), got)
	}
	t.Logf("handshake %v after ResetPeer (round trip %v)", got.LastHandshake.Sub(reset).Round(time.Millisecond), 2*delay)
	if err := meshtest.Ping(nsA, "10.42.1.0", 1); err != nil {
		t.Errorf("ping across the tunnel after the reset: %v", err)
	}
	st := a.status(pubB)
	if st.Endpoint != netip.AddrPortFrom(addrA, relay.portA()) || !equalPrefixes(st.AllowedIPs, pfx("10.42.1.0/24")) || st.PersistentKeepalive != 25*time.Second {
		t.Errorf("A's peer B after the reset: %+v, want the same endpoint, allowed IPs and keepalive as before", st)
	}

	// Resetting a peer the device does not have is not an error.
	a.must(nodeRequest{Op: "reset", Key: [32]byte(newKey(t).PublicKey())})
}
