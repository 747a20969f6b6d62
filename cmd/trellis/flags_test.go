package main

import (
	"flag"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/internal/kube"
)

func testFlags() (*flag.FlagSet, *string, *listFlag, *bool) {
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	name := fs.String("node-name", "default", "")
	var ips listFlag
	fs.Var(&ips, "node-external-ip", "")
	ext := fs.Bool("flannel-external-ip", false, "")
	return fs, name, &ips, ext
}

func TestPrecedenceFlagsEnvFileDefaults(t *testing.T) {
	file, err := parseConfig("/etc/trellis/config.yaml", []byte("node-name: from-file\nnode-external-ip:\n  - 203.0.113.1\n  - 203.0.113.2\nflannel-external-ip: true\n"))
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"TRELLIS_NODE_EXTERNAL_IP": "198.51.100.7"}
	for _, tc := range []struct {
		name     string
		args     []string
		env      map[string]string
		files    []configFile
		wantName string
		wantIPs  string
		wantExt  bool
	}{
		{"defaults", nil, nil, nil, "default", "", false},
		{"file over defaults", nil, nil, []configFile{file}, "from-file", "203.0.113.1,203.0.113.2", true},
		{"env over file", nil, env, []configFile{file}, "from-file", "198.51.100.7", true},
		{"flags over env", []string{"--node-external-ip=192.0.2.9", "--node-name=cli"}, env, []configFile{file}, "cli", "192.0.2.9", true},
		{"repeatable and comma lists", []string{"--node-external-ip=192.0.2.1,192.0.2.2", "--node-external-ip", "192.0.2.3"}, nil, nil, "default", "192.0.2.1,192.0.2.2,192.0.2.3", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs, name, ips, ext := testFlags()
			if err := fs.Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			if err := settle(fs, func(k string) string { return tc.env[k] }, tc.files); err != nil {
				t.Fatal(err)
			}
			if *name != tc.wantName || ips.String() != tc.wantIPs || *ext != tc.wantExt {
				t.Fatalf("got name=%q ips=%q ext=%v, want %q %q %v", *name, ips.String(), *ext, tc.wantName, tc.wantIPs, tc.wantExt)
			}
		})
	}
}

func TestDropInsOverrideMainFile(t *testing.T) {
	dir := t.TempDir()
	main := filepath.Join(dir, "config.yaml")
	os.WriteFile(main, []byte("node-name: main\n"), 0o600)
	os.MkdirAll(main+".d", 0o700)
	os.WriteFile(filepath.Join(main+".d", "50-x.yaml"), []byte("node-name: dropin\n"), 0o600)
	files, err := loadConfigFiles(main, true)
	if err != nil {
		t.Fatal(err)
	}
	fs, name, _, _ := testFlags()
	fs.Parse(nil)
	if err := settle(fs, func(string) string { return "" }, files); err != nil {
		t.Fatal(err)
	}
	if *name != "dropin" {
		t.Fatalf("node-name = %q, want the drop-in's", *name)
	}
	if _, err := loadConfigFiles(filepath.Join(dir, "missing.yaml"), true); err == nil {
		t.Fatal("an explicit missing config file must be an error")
	}
	if _, err := loadConfigFiles(filepath.Join(dir, "missing.yaml"), false); err != nil {
		t.Fatalf("a missing default config file is fine: %v", err)
	}
}

func TestUnknownKeyNamesKeyAndFile(t *testing.T) {
	file, err := parseConfig("/etc/trellis/config.yaml", []byte("node-nmae: typo\n"))
	if err != nil {
		t.Fatal(err)
	}
	fs, _, _, _ := testFlags()
	fs.Parse(nil)
	err = settle(fs, func(string) string { return "" }, []configFile{file})
	if err == nil || !strings.Contains(err.Error(), `"node-nmae"`) || !strings.Contains(err.Error(), "/etc/trellis/config.yaml") {
		t.Fatalf("err = %v, want one naming the key and the file", err)
	}
}

// emptyConfig is an empty config file, so that a test does not read the
// machine's /etc/trellis/config.yaml.
func emptyConfig(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return "--config=" + p
}

func TestBadFlagValues(t *testing.T) {
	cfg := emptyConfig(t)
	for _, args := range [][]string{
		{"agent", "--server=https://x:6443", "--token=t", "--node-name=n", "--node-external-ip=not-an-ip", cfg},
		{"agent", "--server=https://x:6443", "--token=t", "--node-name=n", "--config=/nonexistent"},
		{"server", "--cluster-cidr=10.42.0.0/33", "--node-name=n"},
		{"server", "--cluster-cidr=10.42.0.1/16", "--node-name=n"},
		{"agent", "--server=ftp://x", "--token=t", "--node-name=n"},
		{"agent", "--server=https://x:6443", "--token=t", "--node-name=Bad_Name"},
		{"agent", "--server=https://x:6443", "--token=t", "--node-name=n", "--flannel-backend=vxlan"},
		{"server", "--kube-api-qps=0", "--node-name=n"},
		{"server", "--kube-api-qps=-5", "--node-name=n"},
		{"server", "--kube-api-qps=fast", "--node-name=n"},
		{"bogus"},
	} {
		if args[0] != "bogus" && !strings.HasPrefix(args[len(args)-1], "--config=") {
			args = append(args, cfg)
		}
		err := run(t.Context(), args, io.Discard, io.Discard, func(string) string { return "" })
		if err == nil {
			t.Errorf("%v: no error", args)
			continue
		}
		t.Logf("%v: %v", args, err)
		if strings.Count(err.Error(), "\n") > 0 {
			t.Errorf("%v: error is not one line: %q", args, err)
		}
	}
}

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte("node-name: a\nnode-external-ip: [1.2.3.4, 5.6.7.8]\n"))
	f.Add([]byte("token: K10abc::server:x\nflannel-external-ip: true\nwireguard-listen-port: 51820\n"))
	f.Add([]byte("- a\n- b\n"))
	f.Add([]byte("a: {b: c}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cf, err := parseConfig("f.yaml", data)
		if err != nil {
			return
		}
		fs, _, _, _ := testFlags()
		fs.Parse(nil)
		_ = settle(fs, func(string) string { return "" }, []configFile{cf})
	})
}

// TestKubeconfigFlag: --kubeconfig (or TRELLIS_KUBECONFIG, or the key
// kubeconfig in a config file) puts the server in Kubernetes mode, as
// running in a pod with a service account does; without either it stays
// out of it.
func TestKubeconfigFlag(t *testing.T) {
	file, err := parseConfig("/etc/trellis/config.yaml", []byte("kubeconfig: /etc/rancher/k3s/k3s.yaml\n"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name      string
		args      []string
		env       map[string]string
		files     []configFile
		inCluster bool
		want      string // "" for no Kubernetes mode, "in-cluster", or the path
	}{
		{"none", nil, nil, nil, false, ""},
		{"flag", []string{"--kubeconfig=/root/.kube/config"}, nil, nil, false, "/root/.kube/config"},
		{"env", nil, map[string]string{"TRELLIS_KUBECONFIG": "/etc/kube.yaml"}, nil, false, "/etc/kube.yaml"},
		{"config file", nil, nil, []configFile{file}, false, "/etc/rancher/k3s/k3s.yaml"},
		{"in a pod", nil, nil, nil, true, "in-cluster"},
		{"in a pod with a kubeconfig", []string{"--kubeconfig=/k"}, nil, nil, true, "/k"},
		{"with a QPS", []string{"--kubeconfig=/k", "--kube-api-qps=200"}, nil, nil, false, "/k"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs, _, sf := newServerFlags()
			fs.SetOutput(io.Discard)
			if err := fs.Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			if err := settle(fs, func(k string) string { return tc.env[k] }, tc.files); err != nil {
				t.Fatal(err)
			}
			kc := sf.kubeConfig(tc.inCluster)
			got := ""
			switch {
			case kc != nil && kc.Kubeconfig == "":
				got = "in-cluster"
			case kc != nil:
				got = kc.Kubeconfig
			}
			if got != tc.want {
				t.Fatalf("Kubernetes mode %q, want %q", got, tc.want)
			}
			wantQPS := float32(kube.DefaultQPS)
			if slices.Contains(tc.args, "--kube-api-qps=200") {
				wantQPS = 200
			}
			if kc != nil && kc.QPS != wantQPS {
				t.Fatalf("QPS %v, want %v", kc.QPS, wantQPS)
			}
		})
	}
}
