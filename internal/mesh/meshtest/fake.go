package meshtest

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/trellis-mesh/trellis/internal/cni"
	"github.com/trellis-mesh/trellis/internal/hostnet"
	"github.com/trellis-mesh/trellis/internal/mesh"
)

// faults counts calls per operation and fails the next ones on request;
// Device and Host embed it.
type faults struct {
	calls map[string]int // guarded by the owner's mutex
	fail  map[string][]error
}

// hit records a call of op and returns the error to fail it with, if one
// is queued. Called with the owner's mutex held.
func (f *faults) hit(op string) error {
	if f.calls == nil {
		f.calls, f.fail = map[string]int{}, map[string][]error{}
	}
	f.calls[op]++
	if q := f.fail[op]; len(q) > 0 {
		f.fail[op] = q[1:]
		return fmt.Errorf("%s: %w", op, q[0])
	}
	return nil
}

func (f *faults) queue(op string, errs ...error) {
	if f.fail == nil {
		f.calls, f.fail = map[string]int{}, map[string][]error{}
	}
	f.fail[op] = append(f.fail[op], errs...)
}

// ErrInjected is the error FailNext queues when none is given.
var ErrInjected = errors.New("injected failure")

// Device is an in-memory WireGuard device for tests of code that drives
// one (the agent's loop): it keeps peers, addresses and routes as
// mesh.Device would, counts calls, fails them on request, and lets a test
// change its state behind the driver's back (drift). Safe for concurrent
// use.
type Device struct {
	mu     sync.Mutex
	name   string
	mtu    int
	pub    [32]byte
	peers  map[[32]byte]mesh.PeerStatus
	addrs  []netip.Prefix
	routes []netip.Prefix
	faults
	// OnChange, if set, is called (without the lock) after the addresses
	// or routes changed, as the kernel notifies a netlink listener. Set it
	// before the device is used.
	OnChange func()
}

// NewDevice returns an empty device with public key pub and MTU mtu.
func NewDevice(pub [32]byte, mtu int) *Device {
	return &Device{name: mesh.DefaultInterface, mtu: mtu, pub: pub, peers: map[[32]byte]mesh.PeerStatus{}}
}

// Ops of Device and Host, for FailNext and Calls.
const (
	OpStatus           = "Status"
	OpSetPeers         = "SetPeers"
	OpResetPeer        = "ResetPeer"
	OpSetAddresses     = "SetAddresses"
	OpSetRoutes        = "SetRoutes"
	OpEnableForwarding = "EnableForwarding"
	OpEnsureBridge     = "EnsureBridge"
	OpWriteCNI         = "WriteCNI"
	OpRemoveCNI        = "RemoveCNI"
	OpRouteToLink      = "RouteToLink"
)

// Status implements the agent's Device.
func (d *Device) Status() ([]mesh.PeerStatus, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.hit(OpStatus); err != nil {
		return nil, err
	}
	out := slices.Collect(maps.Values(d.peers))
	slices.SortFunc(out, func(a, b mesh.PeerStatus) int { return slices.Compare(a.PublicKey[:], b.PublicKey[:]) })
	for i := range out {
		out[i].AllowedIPs = slices.Clone(out[i].AllowedIPs)
	}
	return out, nil
}

// SetPeers implements the agent's Device: like mesh.Device.SetPeers, a
// desired peer without an endpoint keeps the one the device has, and an
// unchanged peer keeps its handshake and counters.
func (d *Device) SetPeers(peers []mesh.Peer) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.hit(OpSetPeers); err != nil {
		return err
	}
	next := make(map[[32]byte]mesh.PeerStatus, len(peers))
	for _, p := range peers {
		if p.PublicKey == d.pub {
			return fmt.Errorf("set peers: peer %x is the device's own key", p.PublicKey[:4])
		}
		st, ok := d.peers[p.PublicKey]
		if !ok {
			st = mesh.PeerStatus{PublicKey: p.PublicKey}
		}
		if p.Endpoint.IsValid() {
			st.Endpoint = p.Endpoint
		}
		st.AllowedIPs = slices.Clone(p.AllowedIPs)
		st.PersistentKeepalive = p.PersistentKeepalive
		next[p.PublicKey] = st
	}
	d.peers = next
	return nil
}

// ResetPeer implements the agent's Device: the peer loses its handshake
// and counters.
func (d *Device) ResetPeer(pub [32]byte) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.hit(OpResetPeer); err != nil {
		return err
	}
	if st, ok := d.peers[pub]; ok {
		d.peers[pub] = mesh.PeerStatus{PublicKey: pub, Endpoint: st.Endpoint, AllowedIPs: st.AllowedIPs, PersistentKeepalive: st.PersistentKeepalive}
	}
	return nil
}

// SetAddresses implements the agent's Device.
func (d *Device) SetAddresses(prefixes []netip.Prefix) error {
	return d.set(OpSetAddresses, &d.addrs, prefixes)
}

// SetRoutes implements the agent's Device.
func (d *Device) SetRoutes(prefixes []netip.Prefix) error {
	return d.set(OpSetRoutes, &d.routes, prefixes)
}

func (d *Device) set(op string, field *[]netip.Prefix, want []netip.Prefix) error {
	d.mu.Lock()
	if err := d.hit(op); err != nil {
		d.mu.Unlock()
		return err
	}
	want = sortedPrefixes(want)
	changed := !slices.Equal(*field, want)
	*field = want
	d.mu.Unlock()
	if changed {
		d.changed()
	}
	return nil
}

func (d *Device) changed() {
	if d.OnChange != nil {
		d.OnChange()
	}
}

// Name, Kind, MTU and PublicKey implement the agent's Device.
func (d *Device) Name() string        { return d.name }
func (d *Device) Kind() string        { return "fake" }
func (d *Device) MTU() int            { return d.mtu }
func (d *Device) PublicKey() [32]byte { return d.pub }

// Peers returns the device's peers as configured, sorted by key.
func (d *Device) Peers() []mesh.PeerStatus {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := slices.Collect(maps.Values(d.peers))
	slices.SortFunc(out, func(a, b mesh.PeerStatus) int { return slices.Compare(a.PublicKey[:], b.PublicKey[:]) })
	return out
}

// Addresses and Routes return what the interface has.
func (d *Device) Addresses() []netip.Prefix {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.addrs)
}

func (d *Device) Routes() []netip.Prefix {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.routes)
}

// RemovePeer removes a peer behind the driver's back (`wg set peer
// remove`); no change is notified (WireGuard has no such notification).
func (d *Device) RemovePeer(pub [32]byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.peers, pub)
}

// Handshake records a handshake with a peer at t and traffic, as the
// device would after one.
func (d *Device) Handshake(pub [32]byte, t time.Time, rx, tx int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if st, ok := d.peers[pub]; ok {
		st.LastHandshake, st.ReceiveBytes, st.TransmitBytes = t, rx, tx
		d.peers[pub] = st
	}
}

// FlushAddresses and DeleteRoutes change the interface behind the
// driver's back (`ip addr flush`, `ip route del`), and notify.
func (d *Device) FlushAddresses() {
	d.mu.Lock()
	d.addrs = nil
	d.mu.Unlock()
	d.changed()
}

func (d *Device) DeleteRoutes() {
	d.mu.Lock()
	d.routes = nil
	d.mu.Unlock()
	d.changed()
}

// FailNext makes the next calls of op fail, one per error given (one
// ErrInjected when none is).
func (d *Device) FailNext(op string, errs ...error) {
	if len(errs) == 0 {
		errs = []error{ErrInjected}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.queue(op, errs...)
}

// Calls returns how many times op was called.
func (d *Device) Calls(op string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.calls[op]
}

// Bridge is a pod bridge as Host keeps it.
type Bridge struct {
	Gateways []netip.Prefix
	MTU      int
}

// Host is an in-memory host for tests of the agent's loop: forwarding,
// pod bridges, CNI config files, routes to a VPN link and the node's
// addresses. Like the real host it notifies on Changes after anything
// changed, the driver's own changes included. Safe for concurrent use.
type Host struct {
	mu        sync.Mutex
	c         chan struct{}
	addrs     hostnet.Addrs
	forwardV4 bool
	forwardV6 bool
	bridges   map[string]Bridge
	files     map[string][]byte // CNI config files by path
	vpnLink   hostnet.Link
	vpnRoutes map[netip.Prefix]string // prefix → link
	faults
}

// NewHost returns a host whose node has addrs.
func NewHost(addrs hostnet.Addrs) *Host {
	return &Host{c: make(chan struct{}, 1), addrs: addrs, bridges: map[string]Bridge{}, files: map[string][]byte{}, vpnRoutes: map[netip.Prefix]string{}}
}

// Notify delivers a change notification (coalesced like the real one).
func (h *Host) Notify() {
	select {
	case h.c <- struct{}{}:
	default:
	}
}

// Addrs implements the agent's Host (pinned node IPs win, as on the real
// host).
func (h *Host) Addrs(pinned []netip.Addr) (hostnet.Addrs, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	a := h.addrs
	if len(pinned) > 0 {
		a.Internal = slices.Clone(pinned)
	}
	return a, nil
}

// SetAddrs changes the node's addresses and notifies.
func (h *Host) SetAddrs(a hostnet.Addrs) {
	h.mu.Lock()
	h.addrs = a
	h.mu.Unlock()
	h.Notify()
}

// EnableForwarding implements the agent's Host.
func (h *Host) EnableForwarding(v4, v6 bool) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := h.hit(OpEnableForwarding); err != nil {
		return err
	}
	h.forwardV4, h.forwardV6 = h.forwardV4 || v4, h.forwardV6 || v6
	return nil
}

// Forwarding reports what is turned on.
func (h *Host) Forwarding() (v4, v6 bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.forwardV4, h.forwardV6
}

// EnsureBridge implements the agent's Host.
func (h *Host) EnsureBridge(name string, gateways []netip.Prefix, mtu int) error {
	h.mu.Lock()
	if err := h.hit(OpEnsureBridge); err != nil {
		h.mu.Unlock()
		return err
	}
	b := Bridge{Gateways: sortedPrefixes(gateways), MTU: mtu}
	old, ok := h.bridges[name]
	changed := !ok || !slices.Equal(old.Gateways, b.Gateways) || old.MTU != b.MTU
	h.bridges[name] = b
	h.mu.Unlock()
	if changed {
		h.Notify()
	}
	return nil
}

// Bridge returns a bridge and whether it exists.
func (h *Host) Bridge(name string) (Bridge, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	b, ok := h.bridges[name]
	return b, ok
}

// DeleteBridge deletes a bridge behind the driver's back (`ip link del`)
// and notifies.
func (h *Host) DeleteBridge(name string) {
	h.mu.Lock()
	delete(h.bridges, name)
	h.mu.Unlock()
	h.Notify()
}

// WriteCNI implements the agent's Host: the file at cfg.Path() gets
// cni.Conflist(cfg).
func (h *Host) WriteCNI(cfg cni.Config) error {
	data, err := cni.Conflist(cfg)
	if err != nil {
		return err
	}
	h.mu.Lock()
	if err := h.hit(OpWriteCNI); err != nil {
		h.mu.Unlock()
		return err
	}
	changed := !slices.Equal(h.files[cfg.Path()], data)
	h.files[cfg.Path()] = data
	h.mu.Unlock()
	if changed {
		h.Notify()
	}
	return nil
}

// RemoveCNI implements the agent's Host: only a file of Trellis's
// network is removed.
func (h *Host) RemoveCNI(cfg cni.Config) error {
	h.mu.Lock()
	if err := h.hit(OpRemoveCNI); err != nil {
		h.mu.Unlock()
		return err
	}
	path := cfg.Path()
	data, ok := h.files[path]
	var list struct {
		Name string `json:"name"`
	}
	if ok && json.Unmarshal(data, &list) == nil && list.Name == cni.DefaultNetworkName {
		delete(h.files, path)
	} else {
		ok = false
	}
	h.mu.Unlock()
	if ok {
		h.Notify()
	}
	return nil
}

// File returns a CNI config file's content and whether it exists.
func (h *Host) File(path string) ([]byte, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	b, ok := h.files[path]
	return slices.Clone(b), ok
}

// WriteFile changes a file behind the driver's back (another installer)
// and notifies; nil data removes it.
func (h *Host) WriteFile(path string, data []byte) {
	h.mu.Lock()
	if data == nil {
		delete(h.files, path)
	} else {
		h.files[filepath.Clean(path)] = slices.Clone(data)
	}
	h.mu.Unlock()
	h.Notify()
}

// SetVPNLink makes link the interface that holds the VPN's addresses.
func (h *Host) SetVPNLink(link hostnet.Link) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.vpnLink = link
}

// VPNLink implements the agent's Host.
func (h *Host) VPNLink([]netip.Addr) (hostnet.Link, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.vpnLink.Name == "" {
		return hostnet.Link{}, errors.New("no interface holds the VPN addresses")
	}
	return h.vpnLink, nil
}

// RouteToLink implements the agent's Host.
func (h *Host) RouteToLink(link hostnet.Link, prefixes []netip.Prefix) error {
	h.mu.Lock()
	if err := h.hit(OpRouteToLink); err != nil {
		h.mu.Unlock()
		return err
	}
	changed := false
	for _, p := range prefixes {
		if h.vpnRoutes[p] != link.Name {
			h.vpnRoutes[p], changed = link.Name, true
		}
	}
	h.mu.Unlock()
	if changed {
		h.Notify()
	}
	return nil
}

// VPNRoutes returns the prefixes routed to a VPN link and the link.
func (h *Host) VPNRoutes() map[netip.Prefix]string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return maps.Clone(h.vpnRoutes)
}

// Changes implements the agent's Host.
func (h *Host) Changes() <-chan struct{} { return h.c }

// FailNext makes the next calls of op fail, one per error given (one
// ErrInjected when none is).
func (h *Host) FailNext(op string, errs ...error) {
	if len(errs) == 0 {
		errs = []error{ErrInjected}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.queue(op, errs...)
}

// Calls returns how many times op was called.
func (h *Host) Calls(op string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.calls[op]
}

func sortedPrefixes(ps []netip.Prefix) []netip.Prefix {
	out := slices.Clone(ps)
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return slices.Compact(out)
}
