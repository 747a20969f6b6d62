package mesh

import (
	"strings"
	"testing"
)

func TestConfigValidate(t *testing.T) {
	key := [32]byte{1}
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"defaults", Config{PrivateKey: key}, ""},
		{"explicit", Config{Interface: "wg0", ListenPort: 51821, PrivateKey: key, MTU: 1380, Mode: ModeUserspace}, ""},
		{"no key", Config{}, "no WireGuard private key"},
		{"long name", Config{Interface: "trellis-wg-too-long", PrivateKey: key}, "longer than 15"},
		{"slash", Config{Interface: "a/b", PrivateKey: key}, "not a valid Linux interface name"},
		{"port", Config{ListenPort: 70000, PrivateKey: key}, "listen port 70000"},
		{"mtu", Config{MTU: 100, PrivateKey: key}, "MTU 100"},
		{"mode", Config{Mode: Mode(7), PrivateKey: key}, "unknown WireGuard mode"},
	}
	for _, tt := range tests {
		err := tt.cfg.Validate()
		if tt.want == "" && err != nil || tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)) {
			t.Errorf("%s: Validate = %v, want %q", tt.name, err, tt.want)
		}
	}
	if c := (Config{}).withDefaults(); c.Interface != DefaultInterface || c.ListenPort != DefaultListenPort {
		t.Errorf("defaults = %+v", c)
	}
}

func TestTunnelMTU(t *testing.T) {
	if got := TunnelMTU(1500); got != 1420 {
		t.Errorf("TunnelMTU(1500) = %d, want 1420", got)
	}
	if got := TunnelMTU(9001); got != 8921 {
		t.Errorf("TunnelMTU(9001) = %d, want 8921", got)
	}
}

func FuzzParseMode(f *testing.F) {
	for _, s := range []string{"", "auto", "kernel", "userspace", "User", " KERNEL ", "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		m, err := ParseMode(s)
		if err != nil {
			return
		}
		again, err := ParseMode(m.String())
		if err != nil || again != m {
			t.Fatalf("ParseMode(%q) = %v; round trip gives %v, %v", s, m, again, err)
		}
	})
}
