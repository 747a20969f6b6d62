// Package deploy holds the files that install Trellis: the systemd units
// in systemd/ (installed by scripts/install.sh) and the Kubernetes
// manifests in kubernetes/. Its tests check the units with
// systemd-analyze and the manifests against a real API server.
package deploy

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

var units = []string{"trellis-server.service", "trellis-agent.service"}

// TestSystemdUnitsVerify runs systemd-analyze verify on each unit (with
// ExecStart pointing at an executable that exists here) and wants no
// complaint at all: systemd only warns about a misspelt setting.
func TestSystemdUnitsVerify(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze is not installed (apt-get install systemd): cannot verify the units")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range units {
		t.Run(u, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join("systemd", u))
			if err != nil {
				t.Fatal(err)
			}
			text := string(b)
			for _, want := range []string{"Restart=always", "KillMode=process", "EnvironmentFile=-/etc/default/" + strings.TrimSuffix(u, ".service"),
				"ExecStart=/usr/local/bin/trellis ", "WantedBy=multi-user.target", "After=network-online.target"} {
				if !strings.Contains(text, want) {
					t.Errorf("%s lacks %q", u, want)
				}
			}
			text = strings.Replace(text, "ExecStart=/usr/local/bin/trellis", "ExecStart="+exe, 1)
			path := filepath.Join(t.TempDir(), u)
			if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(sa, "verify", "--man=no", path)
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &out
			err = cmd.Run()
			if err != nil && strings.Contains(out.String(), "Failed to initialize") {
				t.Skipf("systemd-analyze cannot run here: %s", out.String())
			}
			if err != nil || strings.TrimSpace(out.String()) != "" {
				t.Errorf("systemd-analyze verify %s: %v\n%s", u, err, out.String())
			}
		})
	}
}

// TestInstallScript installs both roles into a scratch root (DESTDIR) and
// checks what lands where.
func TestInstallScript(t *testing.T) {
	if _, err := exec.LookPath("bash"); err != nil {
		t.Skip("no bash")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	for _, role := range []string{"server", "agent"} {
		cmd := exec.Command("bash", "../scripts/install.sh", role)
		cmd.Env = append(os.Environ(), "DESTDIR="+root, "BIN="+exe)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("install.sh %s: %v\n%s", role, err, out)
		}
		unit, err := os.ReadFile(filepath.Join(root, "etc/systemd/system/trellis-"+role+".service"))
		if err != nil {
			t.Fatal(err)
		}
		want, _ := os.ReadFile(filepath.Join("systemd", "trellis-"+role+".service"))
		if !bytes.Equal(unit, want) {
			t.Errorf("installed unit of %s differs from deploy/systemd", role)
		}
		if fi, err := os.Stat(filepath.Join(root, "etc/default/trellis-"+role)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("/etc/default/trellis-%s: want mode 0600 (it may hold a token): %v %v", role, fi, err)
		}
	}
	if fi, err := os.Stat(filepath.Join(root, "usr/local/bin/trellis")); err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("binary: %v %v", fi, err)
	}
	if fi, err := os.Stat(filepath.Join(root, "etc/trellis/config.yaml.d")); err != nil || !fi.IsDir() {
		t.Errorf("config drop-in dir: %v %v", fi, err)
	}
	cmd := exec.Command("bash", "../scripts/install.sh", "nonsense")
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "usage") {
		t.Errorf("a wrong role: want usage, got %v %s", err, out)
	}
}
