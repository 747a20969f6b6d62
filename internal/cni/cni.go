// Package cni sets up the pod bridge and writes the CNI network config
// that puts pods on the mesh.
//
// The config uses the standard reference plugins: "bridge" (the node's
// gateway lives on the bridge; no masquerading, since pod addresses are
// routed across the mesh) with "host-local" IPAM over the node's pod
// CIDRs, followed by "portmap".
package cni

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
)

// Defaults applied to zero fields of Config.
const (
	DefaultDir         = "/etc/cni/net.d"
	DefaultFileName    = "10-trellis.conflist"
	DefaultNetworkName = "trellis"
	DefaultBridge      = "cni0"
	// CNIVersion is the spec version of the generated config.
	CNIVersion = "1.0.0"
)

// Config describes the node's pod network.
type Config struct {
	// Dir holds CNI network configs; default /etc/cni/net.d.
	Dir string
	// FileName of the conflist in Dir; default "10-trellis.conflist".
	FileName string
	// NetworkName is the CNI network name; default "trellis".
	NetworkName string
	// Bridge is the pod bridge; default "cni0".
	Bridge string
	// PodCIDRs are this node's pod prefixes, at most one per family in
	// the usual case (e.g. 10.42.1.0/24 and fd00:42:0:1::/64). Required.
	PodCIDRs []netip.Prefix
	// MTU of the pods' interfaces; 0 lets the plugin choose (the
	// bridge's). Set it to the WireGuard MTU.
	MTU int
	// IPAMDataDir is where host-local records leases; empty uses the
	// plugin's default (/var/lib/cni/networks).
	IPAMDataDir string
}

func (c Config) withDefaults() Config {
	if c.Dir == "" {
		c.Dir = DefaultDir
	}
	if c.FileName == "" {
		c.FileName = DefaultFileName
	}
	if c.NetworkName == "" {
		c.NetworkName = DefaultNetworkName
	}
	if c.Bridge == "" {
		c.Bridge = DefaultBridge
	}
	return c
}

// Path returns the conflist's path after defaults.
func (c Config) Path() string {
	c = c.withDefaults()
	return filepath.Join(c.Dir, c.FileName)
}

// Validate reports whether c (after defaults) describes a usable network.
func (c Config) Validate() error {
	c = c.withDefaults()
	var errs []error
	if !filepath.IsAbs(c.Dir) {
		errs = append(errs, fmt.Errorf("CNI config directory %q is not an absolute path", c.Dir))
	}
	if c.FileName != filepath.Base(c.FileName) || !strings.HasSuffix(c.FileName, ".conflist") {
		errs = append(errs, fmt.Errorf("CNI config file name %q must be a plain file name ending in .conflist", c.FileName))
	}
	if len(c.Bridge) > 15 || strings.ContainsAny(c.Bridge, "/ \t\n:") {
		errs = append(errs, fmt.Errorf("bridge name %q is not a valid Linux interface name", c.Bridge))
	}
	if len(c.PodCIDRs) == 0 {
		errs = append(errs, errors.New("no pod CIDR is set; the node has not been given one yet"))
	}
	for _, p := range c.PodCIDRs {
		switch {
		case !p.IsValid():
			errs = append(errs, fmt.Errorf("pod CIDR %s is not a valid prefix", p))
		case p.Addr().Is4() && p.Bits() > 30, p.Addr().Is6() && p.Bits() > 126:
			errs = append(errs, fmt.Errorf("pod CIDR %s is too small for a gateway and pods", p))
		}
	}
	if c.MTU != 0 && (c.MTU < 576 || c.MTU > 65535) {
		errs = append(errs, fmt.Errorf("MTU %d is out of range; use 0 or 576-65535", c.MTU))
	}
	if c.IPAMDataDir != "" && !filepath.IsAbs(c.IPAMDataDir) {
		errs = append(errs, fmt.Errorf("IPAM data directory %q is not an absolute path", c.IPAMDataDir))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("CNI config: %w", err)
	}
	return nil
}

// Gateways returns the gateway address of each pod CIDR as the bridge
// carries it: the first address with the CIDR's length (10.42.1.0/24 →
// 10.42.1.1/24), which is also host-local's default gateway.
func Gateways(podCIDRs []netip.Prefix) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(podCIDRs))
	for _, p := range podCIDRs {
		p = p.Masked()
		out = append(out, netip.PrefixFrom(p.Addr().Next(), p.Bits()))
	}
	return out
}

// The conflist's JSON shape, limited to what Trellis sets.
type (
	conflist struct {
		CNIVersion string `json:"cniVersion"`
		Name       string `json:"name"`
		Plugins    []any  `json:"plugins"`
	}
	bridgePlugin struct {
		Type        string `json:"type"`
		Bridge      string `json:"bridge"`
		IsGateway   bool   `json:"isGateway"`
		IPMasq      bool   `json:"ipMasq"`
		HairpinMode bool   `json:"hairpinMode"`
		MTU         int    `json:"mtu,omitempty"`
		IPAM        ipam   `json:"ipam"`
	}
	ipam struct {
		Type    string        `json:"type"`
		DataDir string        `json:"dataDir,omitempty"`
		Ranges  [][]ipamRange `json:"ranges"`
		Routes  []ipamRoute   `json:"routes"`
	}
	ipamRange struct {
		Subnet netip.Prefix `json:"subnet"`
	}
	ipamRoute struct {
		Dst netip.Prefix `json:"dst"`
	}
	portmapPlugin struct {
		Type         string          `json:"type"`
		Capabilities map[string]bool `json:"capabilities"`
	}
)

// Conflist returns the network config list for cfg: a "bridge" plugin
// (isGateway, no masquerade, hairpin, MTU) with "host-local" IPAM that has
// one range set per address family present in PodCIDRs and a default
// route per family, then "portmap". The output is deterministic and ends
// in a newline.
func Conflist(cfg Config) ([]byte, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	var v4, v6 []ipamRange
	for _, p := range cfg.PodCIDRs {
		p = p.Masked()
		if p.Addr().Is4() {
			v4 = append(v4, ipamRange{Subnet: p})
		} else {
			v6 = append(v6, ipamRange{Subnet: p})
		}
	}
	im := ipam{Type: "host-local", DataDir: cfg.IPAMDataDir}
	if len(v4) > 0 {
		im.Ranges = append(im.Ranges, v4)
		im.Routes = append(im.Routes, ipamRoute{Dst: netip.MustParsePrefix("0.0.0.0/0")})
	}
	if len(v6) > 0 {
		im.Ranges = append(im.Ranges, v6)
		im.Routes = append(im.Routes, ipamRoute{Dst: netip.MustParsePrefix("::/0")})
	}
	list := conflist{
		CNIVersion: CNIVersion,
		Name:       cfg.NetworkName,
		Plugins: []any{
			bridgePlugin{
				Type: "bridge", Bridge: cfg.Bridge, IsGateway: true, IPMasq: false, HairpinMode: true,
				MTU: cfg.MTU, IPAM: im,
			},
			portmapPlugin{Type: "portmap", Capabilities: map[string]bool{"portMappings": true}},
		},
	}
	b, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode CNI config: %w", err)
	}
	return append(b, '\n'), nil
}

// Write writes the conflist for cfg to cfg.Path() atomically (a temporary
// file in the same directory, then rename), mode 0644, creating the
// directory if needed. An identical existing file is left alone, so
// runtimes that watch the directory see no change.
func Write(cfg Config) error {
	data, err := Conflist(cfg)
	if err != nil {
		return fmt.Errorf("write CNI config: %w", err)
	}
	path := cfg.Path()
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
		return nil
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("write CNI config: create %s: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write CNI config: %w", err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after the rename
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write CNI config %s: %w", tmp, err)
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return fmt.Errorf("write CNI config %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("write CNI config %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write CNI config %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write CNI config: %w", err)
	}
	return nil
}

// RemoveOwn deletes the conflist at cfg's path if Trellis wrote it (its
// network is cfg's network name): a file another installer put there is
// left alone. A missing file is not an error.
func RemoveOwn(cfg Config) error {
	cfg = cfg.withDefaults()
	b, err := os.ReadFile(cfg.Path())
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove CNI config: %w", err)
	}
	var list struct {
		Name string `json:"name"`
	}
	if json.Unmarshal(b, &list) != nil || list.Name != cfg.NetworkName {
		return nil
	}
	return Remove(cfg)
}

// Remove deletes the conflist; a missing file is not an error.
func Remove(cfg Config) error {
	if err := os.Remove(cfg.Path()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove CNI config: %w", err)
	}
	return nil
}
