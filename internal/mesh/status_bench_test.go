package mesh_test

import (
	"fmt"
	"net/netip"
	"strconv"
	"testing"

	"github.com/trellis-mesh/trellis/internal/mesh"

	"github.com/trellis-mesh/trellis/internal/mesh/meshtest"
)

// BenchmarkStatus reads the status of a userspace device with 100 and
// 1000 peers (wgctrl over the UAPI socket, as the agent does every 250 ms
// in its handshake rescue loop and every second for its report), in a
// node process of its own; one op is one Status call plus a short
// request/answer line to the node.
func BenchmarkStatus(b *testing.B) {
	meshtest.RequireRoot(b)
	for _, n := range []int{100, 1000} {
		b.Run(strconv.Itoa(n), func(b *testing.B) {
			ns := meshtest.NetNS(b, meshtest.Name("trm-st"))
			node := startNode(b, ns)
			node.must(nodeRequest{Op: "open", Config: mesh.Config{PrivateKey: newKey(b), Mode: mesh.ModeUserspace}})
			peers := make([]mesh.Peer, n)
			for i := range peers {
				peers[i] = mesh.Peer{
					PublicKey:  [32]byte(newKey(b).PublicKey()),
					Endpoint:   netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), 51820),
					AllowedIPs: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 42, byte(i >> 8), byte(i)}), 32)},
				}
			}
			node.must(nodeRequest{Op: "peers", Peers: peers})
			want := fmt.Sprint(n)
			for b.Loop() {
				if got := node.must(nodeRequest{Op: "statuscount"}).Out; got != want {
					b.Fatalf("status of %s peers, want %s", got, want)
				}
			}
		})
	}
}
