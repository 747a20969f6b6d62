package cni

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func pfx(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, x := range s {
		out = append(out, netip.MustParsePrefix(x))
	}
	return out
}

func TestConflist(t *testing.T) {
	tests := []struct {
		name    string
		cfg     Config
		want    string
		wantErr string
	}{
		{
			name: "dual-stack",
			cfg: Config{
				Bridge:      "br-pods",
				NetworkName: "mesh",
				PodCIDRs:    pfx("10.42.1.0/24", "fd00:42:0:1::/64"),
				MTU:         1420,
				IPAMDataDir: "/var/lib/trellis/cni",
			},
			want: `{
  "cniVersion": "1.0.0",
  "name": "mesh",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "br-pods",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "mtu": 1420,
      "ipam": {
        "type": "host-local",
        "dataDir": "/var/lib/trellis/cni",
        "ranges": [
          [
            {
              "subnet": "10.42.1.0/24"
            }
          ],
          [
            {
              "subnet": "fd00:42:0:1::/64"
            }
          ]
        ],
        "routes": [
          {
            "dst": "0.0.0.0/0"
          },
          {
            "dst": "::/0"
          }
        ]
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    }
  ]
}
`,
		},
		{
			name: "IPv4 only, defaults, host bits masked",
			cfg:  Config{PodCIDRs: pfx("10.42.7.9/24")},
			want: `{
  "cniVersion": "1.0.0",
  "name": "trellis",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [
          [
            {
              "subnet": "10.42.7.0/24"
            }
          ]
        ],
        "routes": [
          {
            "dst": "0.0.0.0/0"
          }
        ]
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    }
  ]
}
`,
		},
		{
			name: "IPv6 only, two ranges in one set",
			cfg:  Config{PodCIDRs: pfx("fd00:42:0:1::/64", "fd00:43:0:1::/64")},
			want: `"ranges": [
          [
            {
              "subnet": "fd00:42:0:1::/64"
            },
            {
              "subnet": "fd00:43:0:1::/64"
            }
          ]
        ],
        "routes": [
          {
            "dst": "::/0"
          }
        ]`,
		},
		{name: "no pod CIDR", cfg: Config{}, wantErr: "no pod CIDR"},
		{name: "relative dir", cfg: Config{Dir: "net.d", PodCIDRs: pfx("10.42.1.0/24")}, wantErr: "not an absolute path"},
		{name: "bad file name", cfg: Config{FileName: "../x.conflist", PodCIDRs: pfx("10.42.1.0/24")}, wantErr: "plain file name"},
		{name: "tiny CIDR", cfg: Config{PodCIDRs: pfx("10.42.1.0/31")}, wantErr: "too small"},
		{name: "bad MTU", cfg: Config{MTU: 100, PodCIDRs: pfx("10.42.1.0/24")}, wantErr: "MTU 100"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Conflist(tt.cfg)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Conflist error = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if strings.HasPrefix(tt.want, "{") && string(got) != tt.want || !strings.Contains(string(got), tt.want) {
				t.Errorf("Conflist =\n%s\nwant\n%s", got, tt.want)
			}
		})
	}
}

func TestGateways(t *testing.T) {
	got := Gateways(pfx("10.42.1.0/24", "fd00:42:0:1::/64", "10.42.2.77/24"))
	want := pfx("10.42.1.1/24", "fd00:42:0:1::1/64", "10.42.2.1/24")
	if len(got) != len(want) {
		t.Fatalf("Gateways = %v, want %v", got, want)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Errorf("Gateways = %v, want %v", got, want)
		}
	}
}

func TestWriteRemove(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "net.d")
	cfg := Config{Dir: dir, PodCIDRs: pfx("10.42.1.0/24"), MTU: 1420}
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, DefaultFileName)
	if cfg.Path() != path {
		t.Errorf("Path = %s, want %s", cfg.Path(), path)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o644 {
		t.Errorf("mode = %v, want 0644", fi.Mode().Perm())
	}
	want, _ := Conflist(cfg)
	if got, _ := os.ReadFile(path); string(got) != string(want) {
		t.Errorf("file content = %s, want %s", got, want)
	}

	// Unchanged config: file untouched (same inode). Changed: replaced.
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	if fi2, _ := os.Stat(path); !os.SameFile(fi, fi2) {
		t.Error("rewriting an identical config replaced the file")
	}
	cfg.MTU = 1380
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(path); !strings.Contains(string(got), `"mtu": 1380`) {
		t.Errorf("file not updated: %s", got)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("directory holds %d entries, want only the conflist (temp files left?)", len(entries))
	}

	if err := Remove(cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("conflist still there after Remove: %v", err)
	}
	if err := Remove(cfg); err != nil {
		t.Errorf("second Remove: %v", err)
	}
	if err := Write(Config{Dir: dir}); err == nil {
		t.Error("Write without pod CIDRs succeeded")
	}
}
