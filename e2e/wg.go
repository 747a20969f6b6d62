//go:build e2e

package e2e

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// WGDevice is a WireGuard device as `wg show IFACE dump` prints it.
type WGDevice struct {
	PublicKey  string
	ListenPort int
	Peers      []WGPeer
}

// WGPeer is one peer line of `wg show IFACE dump`.
type WGPeer struct {
	PublicKey       string
	Endpoint        string   // "(none)" when unknown
	AllowedIPs      []string // empty when none
	LatestHandshake time.Time
	RxBytes         uint64
	TxBytes         uint64
}

// Peer returns the peer with public key key.
func (d WGDevice) Peer(key string) (WGPeer, bool) {
	for _, p := range d.Peers {
		if p.PublicKey == key {
			return p, true
		}
	}
	return WGPeer{}, false
}

// WGShow runs `wg show iface dump` with the process's private
// /run/wireguard and network namespace, and parses the result.
func (p *Proc) WGShow(iface string) (WGDevice, error) {
	out, err := p.Nsenter("wg", "show", iface, "dump")
	if err != nil {
		return WGDevice{}, err
	}
	return ParseWGDump(out)
}

// ParseWGDump parses the output of `wg show IFACE dump`: a line for the
// interface (private key, public key, listen port, fwmark), then one per
// peer (public key, preshared key, endpoint, allowed IPs, latest handshake,
// rx, tx, keepalive), tab-separated.
func ParseWGDump(out string) (WGDevice, error) {
	var d WGDevice
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) == 0 || lines[0] == "" {
		return d, fmt.Errorf("wg dump is empty")
	}
	f := strings.Split(lines[0], "\t")
	if len(f) != 4 {
		return d, fmt.Errorf("wg dump: interface line has %d fields, want 4: %q", len(f), lines[0])
	}
	d.PublicKey = f[1]
	d.ListenPort, _ = strconv.Atoi(f[2])
	for _, line := range lines[1:] {
		f := strings.Split(line, "\t")
		if len(f) != 8 {
			return d, fmt.Errorf("wg dump: peer line has %d fields, want 8: %q", len(f), line)
		}
		p := WGPeer{PublicKey: f[0], Endpoint: f[2]}
		if f[3] != "(none)" {
			p.AllowedIPs = strings.Split(f[3], ",")
		}
		if sec, _ := strconv.ParseInt(f[4], 10, 64); sec > 0 {
			p.LatestHandshake = time.Unix(sec, 0)
		}
		p.RxBytes, _ = strconv.ParseUint(f[5], 10, 64)
		p.TxBytes, _ = strconv.ParseUint(f[6], 10, 64)
		d.Peers = append(d.Peers, p)
	}
	return d, nil
}
