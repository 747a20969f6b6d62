// Package mesh creates a node's WireGuard device and makes its peers,
// addresses and routes match the desired state.
//
// A Device is either kernel WireGuard (a netlink link of type
// "wireguard") or wireguard-go embedded in this process on a TUN device.
// Both are configured through one path, wgctrl, which speaks netlink to
// the kernel and the UAPI socket /var/run/wireguard/<interface>.sock to
// wireguard-go, so `wg show` works for both. Addresses, MTU and routes
// are set through netlink.
//
// Network namespaces: Open works in the network namespace of the calling
// OS thread. It creates the link, the netlink handle, the wgctrl client
// and (userspace) the UDP sockets there, and later calls use those.
// wireguard-go, however, reopens its UDP sockets from its own goroutines
// when the link is set down and up again or the listen port changes, and
// those run in the process's namespace. So the supported setup is one
// process per network namespace (as in production and the e2e harness);
// opening devices for other namespaces from one process works only as
// long as nobody toggles their links.
//
// The UAPI socket directory /var/run/wireguard is not per network
// namespace: wgctrl and wireguard-go hard-code it. Two userspace devices
// with the same interface name on one machine collide even in different
// network namespaces. Tests that run several nodes on one machine either
// give every device its own interface name, or run each node process in
// a private mount namespace with its own tmpfs on /run/wireguard:
//
//	ip netns exec NS sh -c 'mkdir -p /run/wireguard && mount -t tmpfs tmpfs /run/wireguard && exec trellis agent ...'
//
// (`ip netns exec` already gives the process a private mount namespace.)
package mesh

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// Kinds returned by Device.Kind.
const (
	KindKernel    = "kernel"
	KindUserspace = "userspace"
)

// SocketDir is where wireguard-go's UAPI sockets live (fixed by wgctrl).
const SocketDir = "/var/run/wireguard"

// errKernelUnsupported means the kernel has no "wireguard" link type.
var errKernelUnsupported = errors.New("the kernel does not support WireGuard links (no wireguard module)")

// PeerStatus is what the device reports about one peer.
type PeerStatus struct {
	PublicKey           [32]byte
	Endpoint            netip.AddrPort // zero when none is known
	AllowedIPs          []netip.Prefix
	PersistentKeepalive time.Duration
	LastHandshake       time.Time // zero before the first handshake
	ReceiveBytes        int64
	TransmitBytes       int64
}

// Device is an open WireGuard interface. Its methods are safe for
// concurrent use.
type Device struct {
	log  *slog.Logger
	name string
	kind string
	mtu  int
	pub  [32]byte
	nl   *netlink.Handle // in the namespace Open ran in
	wg   *wgctrl.Client

	mu     sync.Mutex // serialises reconfiguration and Close
	closed bool       // guarded by mu

	// Userspace only.
	wgdev      *device.Device
	uapi       net.Listener
	acceptDone chan struct{}  // closed when acceptLoop returns
	handlers   sync.WaitGroup // IpcHandle goroutines
	connMu     sync.Mutex
	conns      map[net.Conn]struct{} // guarded by connMu; nil after Close
}

// Open creates the WireGuard interface described by cfg (or adopts an
// existing kernel link of that name), sets its private key, listen port
// and MTU, and brings it up. It works in the network namespace of the
// calling thread.
func Open(cfg Config, log *slog.Logger) (*Device, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("open WireGuard device: %w", err)
	}
	cfg = cfg.withDefaults()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("interface", cfg.Interface)

	nl, err := netlink.NewHandle()
	if err != nil {
		return nil, fmt.Errorf("open WireGuard device %s: open netlink: %w", cfg.Interface, err)
	}
	mtu := cfg.MTU
	if mtu == 0 {
		u, err := underlayMTU(nl, netip.Addr{})
		if err != nil {
			log.Warn("cannot derive the WireGuard MTU; using the default", "mtu", DefaultMTU, "err", err)
			mtu = DefaultMTU
		} else {
			mtu = TunnelMTU(u)
		}
	}
	d := &Device{
		log:  log,
		name: cfg.Interface,
		mtu:  mtu,
		pub:  [32]byte(wgtypes.Key(cfg.PrivateKey).PublicKey()),
		nl:   nl,
	}

	switch cfg.Mode {
	case ModeKernel:
		err = d.openKernel()
	case ModeUserspace:
		err = d.openUserspace()
	default:
		err = d.openKernel()
		if errors.Is(err, errKernelUnsupported) {
			log.Info("kernel WireGuard is not available; using embedded wireguard-go", "reason", err)
			err = d.openUserspace()
		}
	}
	if err != nil {
		d.teardown()
		return nil, fmt.Errorf("open WireGuard device %s: %w", cfg.Interface, err)
	}

	if err := d.configure(cfg); err != nil {
		if d.kind == KindKernel {
			_ = d.deleteLink()
		}
		d.teardown()
		return nil, fmt.Errorf("open WireGuard device %s: %w", cfg.Interface, err)
	}
	log.Info("WireGuard device ready", "kind", d.kind, "mtu", mtu, "port", cfg.ListenPort,
		"public_key", wgtypes.Key(d.pub).String())
	return d, nil
}

// openKernel creates or adopts a kernel WireGuard link.
func (d *Device) openKernel() error {
	link, err := d.nl.LinkByName(d.name)
	if err == nil && link.Type() != "wireguard" {
		if err := d.removeStale(link); err != nil {
			return err
		}
		err = netlink.LinkNotFoundError{}
	}
	if err == nil {
		d.log.Info("adopting existing kernel WireGuard link")
	} else {
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			return fmt.Errorf("look up link: %w", err)
		}
		la := netlink.NewLinkAttrs()
		la.Name = d.name
		la.MTU = d.mtu
		if err := d.nl.LinkAdd(&netlink.Wireguard{LinkAttrs: la}); err != nil {
			if errors.Is(err, unix.EOPNOTSUPP) {
				return fmt.Errorf("create link: %w: %w", errKernelUnsupported, err)
			}
			return fmt.Errorf("create kernel WireGuard link: %w", err)
		}
	}
	d.kind = KindKernel
	return d.openClient()
}

// openUserspace starts wireguard-go on a new TUN device and serves its
// UAPI socket.
func (d *Device) openUserspace() error {
	if link, err := d.nl.LinkByName(d.name); err == nil {
		if err := d.removeStale(link); err != nil {
			return err
		}
	}
	tdev, err := tun.CreateTUN(d.name, d.mtu)
	if err != nil {
		return fmt.Errorf("create TUN device (is /dev/net/tun available?): %w", err)
	}
	if real, err := tdev.Name(); err == nil && real != d.name {
		tdev.Close()
		return fmt.Errorf("create TUN device: the kernel named it %s", real)
	}
	d.kind = KindUserspace
	d.wgdev = device.NewDevice(tdev, conn.NewDefaultBind(), wgLogger(d.log))

	f, err := ipc.UAPIOpen(d.name)
	if err != nil {
		return fmt.Errorf("open UAPI socket %s: %w", socketPath(d.name), err)
	}
	l, err := ipc.UAPIListen(d.name, f)
	f.Close() // the listener holds its own descriptor
	if err != nil {
		return fmt.Errorf("listen on UAPI socket %s: %w", socketPath(d.name), err)
	}
	d.uapi = l
	d.conns = make(map[net.Conn]struct{})
	d.acceptDone = make(chan struct{})
	go d.acceptLoop()
	return d.openClient()
}

func (d *Device) openClient() error {
	c, err := wgctrl.New()
	if err != nil {
		return fmt.Errorf("open WireGuard control client: %w", err)
	}
	d.wg = c
	return nil
}

// removeStale deletes a link that is in the way of a new device, unless a
// live wireguard-go process still serves it.
func (d *Device) removeStale(link netlink.Link) error {
	if c, err := net.DialTimeout("unix", socketPath(d.name), time.Second); err == nil {
		c.Close()
		return fmt.Errorf("interface %s is in use by another running WireGuard process (socket %s); stop it or choose another interface name",
			d.name, socketPath(d.name))
	}
	d.log.Warn("removing stale interface left by an earlier run", "type", link.Type())
	if err := d.nl.LinkDel(link); err != nil {
		return fmt.Errorf("remove stale interface %s: %w", d.name, err)
	}
	return nil
}

// configure sets key, port, MTU and brings the link up.
func (d *Device) configure(cfg Config) error {
	key := wgtypes.Key(cfg.PrivateKey)
	port := cfg.ListenPort
	if err := d.wg.ConfigureDevice(d.name, wgtypes.Config{PrivateKey: &key, ListenPort: &port}); err != nil {
		if errors.Is(err, unix.EADDRINUSE) {
			return fmt.Errorf("set private key and listen port: UDP port %d is in use; choose another port: %w", port, err)
		}
		return fmt.Errorf("set private key and listen port: %w", err)
	}
	if d.wgdev != nil {
		// Opens the UDP sockets now, on this thread, in this namespace;
		// the TUN "up" event that follows finds the device up already.
		if err := d.wgdev.Up(); err != nil {
			return fmt.Errorf("start wireguard-go (UDP port %d): %w", port, err)
		}
	}
	link, err := d.nl.LinkByName(d.name)
	if err != nil {
		return fmt.Errorf("look up link: %w", err)
	}
	if link.Attrs().MTU != d.mtu {
		if err := d.nl.LinkSetMTU(link, d.mtu); err != nil {
			return fmt.Errorf("set MTU %d: %w", d.mtu, err)
		}
	}
	if err := d.nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("set link up: %w", err)
	}
	return nil
}

func (d *Device) acceptLoop() {
	defer close(d.acceptDone)
	for {
		c, err := d.uapi.Accept()
		if err != nil {
			d.connMu.Lock()
			closing := d.conns == nil
			d.connMu.Unlock()
			if !closing {
				d.log.Warn("UAPI socket stopped; `wg show` no longer reaches this device", "err", err)
			}
			return
		}
		d.connMu.Lock()
		if d.conns == nil {
			d.connMu.Unlock()
			c.Close()
			continue
		}
		d.conns[c] = struct{}{}
		d.handlers.Add(1)
		d.connMu.Unlock()
		go func() {
			defer d.handlers.Done()
			d.wgdev.IpcHandle(c) // closes c
			d.connMu.Lock()
			delete(d.conns, c)
			d.connMu.Unlock()
		}()
	}
}

// Name returns the interface name.
func (d *Device) Name() string { return d.name }

// Kind returns KindKernel or KindUserspace.
func (d *Device) Kind() string { return d.kind }

// MTU returns the MTU the link was given.
func (d *Device) MTU() int { return d.mtu }

// PublicKey returns the public key derived from Config.PrivateKey.
func (d *Device) PublicKey() [32]byte { return d.pub }

var errClosed = errors.New("the WireGuard device is closed")

// SetPeers makes the device's peers exactly peers, changing only those
// that differ (see Diff): unchanged peers keep their sessions.
func (d *Device) SetPeers(peers []Peer) error {
	if err := validatePeers(d.pub, peers); err != nil {
		return fmt.Errorf("set WireGuard peers on %s: %w", d.name, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("set WireGuard peers on %s: %w", d.name, errClosed)
	}
	dev, err := d.wg.Device(d.name)
	if err != nil {
		return fmt.Errorf("set WireGuard peers on %s: read current peers: %w", d.name, err)
	}
	cfg := Diff(dev.Peers, peers)
	if len(cfg.Peers) == 0 {
		return nil
	}
	if err := d.wg.ConfigureDevice(d.name, cfg); err != nil {
		return fmt.Errorf("set WireGuard peers on %s: %w", d.name, err)
	}
	var added, updated, removed int
	for _, p := range cfg.Peers {
		switch {
		case p.Remove:
			removed++
		case p.UpdateOnly:
			updated++
		default:
			added++
		}
	}
	d.log.Info("WireGuard peers changed", "added", added, "updated", updated, "removed", removed, "total", len(peers))
	return nil
}

// ResetPeer drops everything the device holds for the peer with public key
// pub — sessions, a half-done handshake, its timers, queued packets — and
// puts the peer back with the same endpoint, allowed IPs and keepalive, in
// one configuration request. With a persistent keepalive the device then
// sends a handshake initiation at once, as for a new peer.
//
// It is the way out of crossed handshakes: when both sides send an
// initiation before either receives the other's, each answers the
// other's and drops the response to its own, and neither has a session.
// WireGuard retries after 5 s (REKEY_TIMEOUT), but the response each side
// sent counts as its last handshake message, so with traffic on both
// sides the retries cross again, every 5 s. A fresh initiation from one
// side, sent between two such retries, completes.
//
// A peer the device does not have is not an error (a netmap may have
// removed it).
func (d *Device) ResetPeer(pub [32]byte) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("reset WireGuard peer %s on %s: %w", wgtypes.Key(pub), d.name, errClosed)
	}
	dev, err := d.wg.Device(d.name)
	if err != nil {
		return fmt.Errorf("reset WireGuard peer %s on %s: read peers: %w", wgtypes.Key(pub), d.name, err)
	}
	i := slices.IndexFunc(dev.Peers, func(p wgtypes.Peer) bool { return p.PublicKey == pub })
	if i < 0 {
		return nil
	}
	if err := d.wg.ConfigureDevice(d.name, resetConfig(dev.Peers[i])); err != nil {
		return fmt.Errorf("reset WireGuard peer %s on %s: %w", wgtypes.Key(pub), d.name, err)
	}
	return nil
}

// resetConfig removes p and adds it back with its endpoint, allowed IPs
// and keepalive.
func resetConfig(p wgtypes.Peer) wgtypes.Config {
	add := wgtypes.PeerConfig{
		PublicKey:         p.PublicKey,
		Endpoint:          p.Endpoint,
		ReplaceAllowedIPs: true,
		AllowedIPs:        p.AllowedIPs,
	}
	if p.PresharedKey != (wgtypes.Key{}) {
		psk := p.PresharedKey
		add.PresharedKey = &psk
	}
	if p.PersistentKeepaliveInterval != 0 {
		add.PersistentKeepaliveInterval = durationPtr(p.PersistentKeepaliveInterval)
	}
	return wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: p.PublicKey, Remove: true}, add}}
}

// SetAddresses makes the interface addresses exactly prefixes (address
// and prefix length, e.g. 10.42.1.0/32). IPv6 link-local addresses are
// left to the kernel.
func (d *Device) SetAddresses(prefixes []netip.Prefix) error {
	return d.withLink("set addresses", func(link netlink.Link) error {
		return setAddresses(d.nl, link, prefixes)
	})
}

// SetRoutes makes the main-table routes through the interface that carry
// RouteProtocol exactly prefixes. Routes this package did not create are
// never deleted.
func (d *Device) SetRoutes(prefixes []netip.Prefix) error {
	return d.withLink("set routes", func(link netlink.Link) error {
		return setRoutes(d.nl, link, prefixes)
	})
}

func (d *Device) withLink(op string, fn func(netlink.Link) error) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("%s on %s: %w", op, d.name, errClosed)
	}
	link, err := d.nl.LinkByName(d.name)
	if err != nil {
		return fmt.Errorf("%s on %s: the interface is gone (restart the agent to recreate it): %w", op, d.name, err)
	}
	if err := fn(link); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	return nil
}

// Status reports every peer's endpoint, last handshake and traffic.
func (d *Device) Status() ([]PeerStatus, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, fmt.Errorf("read WireGuard status of %s: %w", d.name, errClosed)
	}
	dev, err := d.wg.Device(d.name)
	if err != nil {
		return nil, fmt.Errorf("read WireGuard status of %s: %w", d.name, err)
	}
	out := make([]PeerStatus, 0, len(dev.Peers))
	for _, p := range dev.Peers {
		out = append(out, PeerStatus{
			PublicKey:           p.PublicKey,
			Endpoint:            addrPortOf(p.Endpoint),
			AllowedIPs:          canonicalPrefixes(prefixesOf(p.AllowedIPs)),
			PersistentKeepalive: p.PersistentKeepaliveInterval,
			LastHandshake:       p.LastHandshakeTime,
			ReceiveBytes:        p.ReceiveBytes,
			TransmitBytes:       p.TransmitBytes,
		})
	}
	slices.SortFunc(out, func(a, b PeerStatus) int { return slices.Compare(a.PublicKey[:], b.PublicKey[:]) })
	return out, nil
}

// Close releases the device. A userspace device stops: its goroutines
// end, its UAPI socket goes away and the interface disappears. A kernel
// link is left up with its configuration, so the data plane survives an
// agent restart; Remove deletes it. Close is idempotent.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	d.teardown()
	d.log.Info("WireGuard device closed", "kind", d.kind)
	return nil
}

// Remove closes the device and deletes its interface, kernel or
// userspace.
func (d *Device) Remove() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var err error
	if !d.closed && d.kind == KindKernel {
		err = d.deleteLink()
	}
	if !d.closed {
		d.closed = true
		d.teardown()
	}
	if err != nil {
		return fmt.Errorf("remove WireGuard device %s: %w", d.name, err)
	}
	return nil
}

func (d *Device) deleteLink() error {
	link, err := d.nl.LinkByName(d.name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return err
	}
	return d.nl.LinkDel(link)
}

// teardown releases everything Open acquired; safe on a half-open Device.
func (d *Device) teardown() {
	if d.uapi != nil {
		d.connMu.Lock()
		conns := d.conns
		d.conns = nil
		d.connMu.Unlock()
		d.uapi.Close()
		<-d.acceptDone
		for c := range conns {
			c.Close()
		}
		d.handlers.Wait()
		d.uapi = nil
	}
	if d.wgdev != nil {
		d.wgdev.Close() // closes the TUN: the interface disappears
		d.wgdev = nil
	}
	if d.wg != nil {
		d.wg.Close()
		d.wg = nil
	}
	if d.nl != nil {
		d.nl.Close()
		d.nl = nil
	}
}

// Cleanup deletes the interface name in the calling thread's network
// namespace, kernel or userspace, and a stale UAPI socket, for an
// uninstall or after a crash. A missing interface is not an error. It
// refuses while a live process serves the interface.
func Cleanup(name string) error {
	sock := socketPath(name)
	if c, err := net.DialTimeout("unix", sock, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("clean up WireGuard interface %s: a running process still serves it (socket %s); stop it first", name, sock)
	}
	link, err := netlink.LinkByName(name)
	if err == nil {
		if err := netlink.LinkDel(link); err != nil {
			return fmt.Errorf("clean up WireGuard interface %s: delete link: %w", name, err)
		}
	} else {
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			return fmt.Errorf("clean up WireGuard interface %s: %w", name, err)
		}
	}
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("clean up WireGuard interface %s: remove stale socket: %w", name, err)
	}
	return nil
}

func socketPath(name string) string { return filepath.Join(SocketDir, name+".sock") }

// wgLogger routes wireguard-go's log lines to log (verbose lines at
// debug level).
func wgLogger(log *slog.Logger) *device.Logger {
	log = log.With("component", "wireguard-go")
	return &device.Logger{
		Verbosef: func(format string, args ...any) { log.Debug(fmt.Sprintf(format, args...)) },
		Errorf:   func(format string, args ...any) { log.Error(fmt.Sprintf(format, args...)) },
	}
}
