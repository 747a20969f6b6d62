package client

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"
)

// selfSigned returns a self-signed certificate and its key (PEM).
func selfSigned(t testing.TB) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})
}

func TestConfigValidate(t *testing.T) {
	ca, _ := selfSigned(t)
	for _, c := range []struct {
		name string
		cfg  Config
		err  string
	}{
		{"defaults", Config{URL: "https://192.0.2.1:6443/", CA: ca}, ""},
		{"http", Config{URL: "http://192.0.2.1:6443", CA: ca}, "must be an https:// URL"},
		{"no host", Config{URL: "https://", CA: ca}, "must be an https:// URL"},
		{"no CA", Config{URL: "https://192.0.2.1:6443"}, "not a PEM certificate"},
		{"CA not PEM", Config{URL: "https://192.0.2.1:6443", CA: []byte("x")}, "not a PEM certificate"},
		{"negative", Config{URL: "https://192.0.2.1:6443", CA: ca, Timeout: -1}, "must not be negative"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := c.cfg.Validate()
			if (err == nil) != (c.err == "") || (err != nil && !strings.Contains(err.Error(), c.err)) {
				t.Fatalf("Validate() = %v, want %q", err, c.err)
			}
			if err == nil && (c.cfg.URL != "https://192.0.2.1:6443" || c.cfg.Timeout != DefaultTimeout ||
				c.cfg.TLSHandshakeTimeout != DefaultTLSHandshakeTimeout || c.cfg.ResponseHeaderTimeout != DefaultResponseHeaderTimeout) {
				t.Errorf("defaults not filled in: %+v", c.cfg)
			}
		})
	}
	c, err := New(Config{URL: "https://192.0.2.1:6443/", CA: ca})
	if err != nil {
		t.Fatal(err)
	}
	other := c.WithBase("https://192.0.2.2:6443/")
	if c.Base() != "https://192.0.2.1:6443" || other.Base() != "https://192.0.2.2:6443" || other.http != c.http {
		t.Errorf("WithBase: %s and %s, shared transport %v", c.Base(), other.Base(), other.http == c.http)
	}
	c.Close()
	c.Close()
}

func adminYAML(t testing.TB, ac AdminConfig) []byte {
	b, err := yaml.Marshal(ac)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParseAdminConfig(t *testing.T) {
	cert, key := selfSigned(t)
	b64 := base64.StdEncoding.EncodeToString
	good := AdminConfig{Server: "https://192.0.2.1:6443", CertificateAuthorityData: b64(cert), ClientCertificateData: b64(cert), ClientKeyData: b64(key)}
	for _, c := range []struct {
		name string
		mod  func(*AdminConfig)
		raw  string
		err  string
	}{
		{name: "good", mod: func(*AdminConfig) {}},
		{name: "no CA", mod: func(a *AdminConfig) { a.CertificateAuthorityData = "" }, err: "certificate-authority-data is missing or not base64"},
		{name: "CA not base64", mod: func(a *AdminConfig) { a.CertificateAuthorityData = "%%" }, err: "certificate-authority-data is missing or not base64"},
		{name: "no key", mod: func(a *AdminConfig) { a.ClientKeyData = "" }, err: "client-key-data is missing or not base64"},
		{name: "key of another", mod: func(a *AdminConfig) { _, k := selfSigned(t); a.ClientKeyData = b64(k) }, err: "client certificate: "},
		{name: "CA not PEM", mod: func(a *AdminConfig) { a.CertificateAuthorityData = b64([]byte("x")) }, err: "certificate-authority-data is not a PEM certificate"},
		{name: "http", mod: func(a *AdminConfig) { a.Server = "http://192.0.2.1:6443" }, err: `server "http://192.0.2.1:6443" must be an https:// URL`},
		{name: "unknown key", raw: "serverr: x\n", err: "unknown field"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := []byte(c.raw)
			if c.mod != nil {
				ac := good
				c.mod(&ac)
				b = adminYAML(t, ac)
			}
			cfg, err := ParseAdminConfig(b)
			if (err == nil) != (c.err == "") || (err != nil && !strings.Contains(err.Error(), c.err)) {
				t.Fatalf("ParseAdminConfig = %v, want %q", err, c.err)
			}
			if err == nil && (cfg.URL != good.Server || cfg.Certificate == nil || cfg.Timeout != DefaultTimeout) {
				t.Errorf("config %+v", cfg)
			}
		})
	}
	path := filepath.Join(t.TempDir(), "admin.yaml")
	if _, err := ReadAdminConfig(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	if err := os.WriteFile(path, []byte("server: [\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadAdminConfig(path); err == nil || !strings.HasPrefix(err.Error(), "admin config "+path+": ") {
		t.Errorf("broken file: %v, want it named", err)
	}
}

// FuzzParseAdminConfig: any file parses or is refused without a panic;
// what parses is a valid client configuration.
func FuzzParseAdminConfig(f *testing.F) {
	cert, key := selfSigned(f)
	b64 := base64.StdEncoding.EncodeToString
	f.Add(adminYAML(f, AdminConfig{Server: "https://192.0.2.1:6443", CertificateAuthorityData: b64(cert), ClientCertificateData: b64(cert), ClientKeyData: b64(key)}))
	f.Add([]byte("server: https://x\ncertificate-authority-data: eA==\n"))
	f.Add([]byte("{}"))
	f.Add([]byte("- a\n- b"))
	f.Fuzz(func(t *testing.T, b []byte) {
		cfg, err := ParseAdminConfig(b)
		if err != nil {
			return
		}
		if err := cfg.Validate(); err != nil || cfg.Certificate == nil {
			t.Fatalf("parsed %q into an invalid config: %v", b, err)
		}
	})
}
