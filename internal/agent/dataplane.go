package agent

import (
	"log/slog"
	"net/netip"

	"github.com/trellis-mesh/trellis/internal/cni"
	"github.com/trellis-mesh/trellis/internal/hostnet"
	"github.com/trellis-mesh/trellis/internal/mesh"
)

// Device is the node's WireGuard device as the loop drives it.
// *mesh.Device implements it; meshtest.Device is an in-memory fake.
type Device interface {
	// Status returns every peer's endpoint, last handshake and traffic,
	// sorted by public key. It is the loop's one read of the device per
	// tick.
	Status() ([]mesh.PeerStatus, error)
	// SetPeers makes the peers exactly peers, changing only those that
	// differ: unchanged peers keep their sessions.
	SetPeers(peers []mesh.Peer) error
	// ResetPeer starts a peer's handshake over (mesh.Device.ResetPeer);
	// a peer the device does not have is not an error.
	ResetPeer(pub [32]byte) error
	// SetAddresses makes the interface's addresses exactly prefixes.
	SetAddresses(prefixes []netip.Prefix) error
	// SetRoutes makes the routes through the interface that the device
	// added exactly prefixes; other routes are left alone.
	SetRoutes(prefixes []netip.Prefix) error
	// Name, Kind, MTU and PublicKey describe the device; they do not
	// change.
	Name() string
	Kind() string
	MTU() int
	PublicKey() [32]byte
}

// Host is the rest of the node's network that the loop keeps in shape:
// forwarding, the pod bridge, the CNI config, routes to a VPN interface,
// and the node's own addresses. hostDataplane implements it on the real
// host; meshtest.Host is an in-memory fake.
type Host interface {
	// Addrs detects the node's addresses (hostnet.DetectAddrs); pinned
	// are the --node-ip values.
	Addrs(pinned []netip.Addr) (hostnet.Addrs, error)
	// EnableForwarding turns IPv4 and/or IPv6 forwarding on.
	EnableForwarding(v4, v6 bool) error
	// EnsureBridge makes the bridge exist, up, with exactly the gateway
	// addresses and (mtu > 0) that MTU.
	EnsureBridge(name string, gateways []netip.Prefix, mtu int) error
	// WriteCNI writes the CNI conflist for cfg if its content differs.
	WriteCNI(cfg cni.Config) error
	// RemoveCNI removes the conflist at cfg's path if Trellis wrote it.
	RemoveCNI(cfg cni.Config) error
	// VPNLink returns the interface that holds one of the VPN's
	// addresses.
	VPNLink(addrs []netip.Addr) (hostnet.Link, error)
	// RouteToLink makes prefixes route to link (hostnet.RouteToLink).
	RouteToLink(link hostnet.Link, prefixes []netip.Prefix) error
	// Changes delivers a value after the host's links, addresses, routes
	// or CNI config directory changed (several changes may come as one).
	Changes() <-chan struct{}
}

// hostDataplane is the real Host: cni and hostnet on the network
// namespace the agent runs in.
type hostDataplane struct {
	watch *hostnet.Watcher
}

// newHost starts watching the host (links, addresses, routes, and the CNI
// config directory).
func newHost(log *slog.Logger, cniDir string) (*hostDataplane, error) {
	w, err := hostnet.Watch(log, cniDir)
	if err != nil {
		return nil, err
	}
	return &hostDataplane{watch: w}, nil
}

func (h *hostDataplane) Addrs(pinned []netip.Addr) (hostnet.Addrs, error) {
	return hostnet.DetectAddrs(pinned)
}

func (h *hostDataplane) EnableForwarding(v4, v6 bool) error { return cni.EnableForwarding(v4, v6) }

func (h *hostDataplane) EnsureBridge(name string, gateways []netip.Prefix, mtu int) error {
	return cni.EnsureBridge(name, gateways, mtu)
}

func (h *hostDataplane) WriteCNI(cfg cni.Config) error  { return cni.Write(cfg) }
func (h *hostDataplane) RemoveCNI(cfg cni.Config) error { return cni.RemoveOwn(cfg) }

func (h *hostDataplane) VPNLink(addrs []netip.Addr) (hostnet.Link, error) {
	return hostnet.LinkOf(addrs)
}

func (h *hostDataplane) RouteToLink(link hostnet.Link, prefixes []netip.Prefix) error {
	return hostnet.RouteToLink(link, prefixes)
}

func (h *hostDataplane) Changes() <-chan struct{} { return h.watch.C() }
func (h *hostDataplane) Close() error             { return h.watch.Close() }
