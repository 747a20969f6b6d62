package mesh

import (
	"errors"
	"fmt"
	"strings"
)

// Defaults applied to zero fields of Config.
const (
	DefaultInterface  = "trellis-wg"
	DefaultListenPort = 51820
)

// Mode selects the WireGuard implementation behind a Device.
type Mode int

const (
	// ModeAuto uses kernel WireGuard when the kernel supports the
	// "wireguard" link type and embedded wireguard-go otherwise.
	ModeAuto Mode = iota
	// ModeKernel requires kernel WireGuard (Linux >= 5.6 or the module).
	ModeKernel
	// ModeUserspace runs wireguard-go inside this process on a TUN device.
	ModeUserspace
)

// String returns "auto", "kernel" or "userspace".
func (m Mode) String() string {
	switch m {
	case ModeAuto:
		return "auto"
	case ModeKernel:
		return "kernel"
	case ModeUserspace:
		return "userspace"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// ParseMode parses the output of Mode.String ("" means auto).
func ParseMode(s string) (Mode, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "auto":
		return ModeAuto, nil
	case "kernel":
		return ModeKernel, nil
	case "userspace", "user":
		return ModeUserspace, nil
	}
	return 0, fmt.Errorf("parse WireGuard mode %q: want auto, kernel or userspace", s)
}

// Config describes a node's WireGuard device. Zero fields take the
// documented defaults.
type Config struct {
	// Interface is the link name; default "trellis-wg". At most 15 bytes.
	Interface string
	// ListenPort is the UDP port WireGuard listens on; default 51820.
	ListenPort int
	// PrivateKey is the node's Curve25519 private key. Required.
	PrivateKey [32]byte
	// MTU of the WireGuard link. 0 derives it: the MTU of the interface
	// that carries the default route minus Overhead (80 bytes); 1420 when
	// there is no default route.
	MTU int
	// Mode selects kernel WireGuard or embedded wireguard-go; default
	// ModeAuto.
	Mode Mode
}

// withDefaults returns c with zero fields replaced by their defaults.
func (c Config) withDefaults() Config {
	if c.Interface == "" {
		c.Interface = DefaultInterface
	}
	if c.ListenPort == 0 {
		c.ListenPort = DefaultListenPort
	}
	return c
}

// Validate reports whether c (after defaults) can be used by Open.
func (c Config) Validate() error {
	c = c.withDefaults()
	var errs []error
	if len(c.Interface) > 15 {
		errs = append(errs, fmt.Errorf("interface name %q is longer than 15 bytes; choose a shorter name", c.Interface))
	}
	if strings.ContainsAny(c.Interface, "/ \t\n:%") || c.Interface == "." || c.Interface == ".." {
		errs = append(errs, fmt.Errorf("interface name %q is not a valid Linux interface name", c.Interface))
	}
	if c.ListenPort < 1 || c.ListenPort > 65535 {
		errs = append(errs, fmt.Errorf("listen port %d is out of range; use 1-65535", c.ListenPort))
	}
	if c.PrivateKey == ([32]byte{}) {
		errs = append(errs, errors.New("no WireGuard private key is set; generate one with `wg genkey`"))
	}
	if c.MTU != 0 && (c.MTU < 576 || c.MTU > 65535) {
		errs = append(errs, fmt.Errorf("MTU %d is out of range; use 0 (derive) or 576-65535", c.MTU))
	}
	if c.Mode < ModeAuto || c.Mode > ModeUserspace {
		errs = append(errs, fmt.Errorf("unknown WireGuard mode %d; use auto, kernel or userspace", int(c.Mode)))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("mesh config: %w", err)
	}
	return nil
}
