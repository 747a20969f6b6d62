package pki

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func newTestCA(t testing.TB) *CA {
	t.Helper()
	ca, err := LoadOrCreateCA(filepath.Join(t.TempDir(), "tls"))
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func parsePEMCert(t testing.TB, data []byte) *x509.Certificate {
	t.Helper()
	c, err := parseCertPEM(data)
	if err != nil {
		t.Fatalf("parse certificate: %v", err)
	}
	return c
}

func mode(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

func TestLoadOrCreateCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "tls")
	ca, err := LoadOrCreateCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if m := mode(t, filepath.Join(dir, CACertFile)); m != 0o644 {
		t.Errorf("ca.crt mode %04o, want 0644", m)
	}
	if m := mode(t, filepath.Join(dir, CAKeyFile)); m != 0o600 {
		t.Errorf("ca.key mode %04o, want 0600", m)
	}
	if m := mode(t, dir); m != 0o700 {
		t.Errorf("created directory mode %04o, want 0700", m)
	}
	onDisk, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(onDisk, ca.CertPEM()) {
		t.Error("CertPEM differs from ca.crt")
	}
	c := parsePEMCert(t, ca.CertPEM())
	if !c.IsCA || !c.MaxPathLenZero || c.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Errorf("CA certificate: IsCA=%v MaxPathLenZero=%v KeyUsage=%b", c.IsCA, c.MaxPathLenZero, c.KeyUsage)
	}
	if pub, ok := c.PublicKey.(*ecdsa.PublicKey); !ok || pub.Curve != elliptic.P256() {
		t.Errorf("CA key is %T, want ECDSA P-256", c.PublicKey)
	}
	if life := time.Until(c.NotAfter); life < CALifetime-time.Hour || life > CALifetime {
		t.Errorf("CA valid for another %v, want about %v", life, CALifetime)
	}

	again, err := LoadOrCreateCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again.CertPEM(), ca.CertPEM()) {
		t.Error("loading the CA again gave another certificate")
	}
	// The loaded CA signs certificates the first one's pool accepts.
	certPEM, _, err := again.IssueClient("admin", OrgAdmins, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := parsePEMCert(t, certPEM).Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("certificate of the reloaded CA does not verify: %v", err)
	}

	// CertPEM returns a copy.
	b := ca.CertPEM()
	b[0] = 'X'
	if ca.CertPEM()[0] == 'X' {
		t.Error("CertPEM exposes the CA's own slice")
	}
}

func TestLoadOrCreateCAErrors(t *testing.T) {
	other := newTestCA(t)
	otherKey, err := x509.MarshalPKCS8PrivateKey(other.key)
	if err != nil {
		t.Fatal(err)
	}
	otherKeyPEM := pem.EncodeToMemory(&pem.Block{Type: pemPrivateKey, Bytes: otherKey})
	leafCert, leafKey, err := other.IssueClient("admin", OrgAdmins, time.Hour)
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name    string
		setup   func(t *testing.T, dir string) // after a CA was created in dir
		now     func() time.Time
		wantErr string
	}{
		{
			name:    "key readable by others",
			setup:   func(t *testing.T, dir string) { chmod(t, filepath.Join(dir, CAKeyFile), 0o644) },
			wantErr: "run chmod 600 " + "DIR/ca.key",
		},
		{
			name:    "key readable by group",
			setup:   func(t *testing.T, dir string) { chmod(t, filepath.Join(dir, CAKeyFile), 0o640) },
			wantErr: "run chmod 600",
		},
		{
			name:    "key missing",
			setup:   func(t *testing.T, dir string) { remove(t, filepath.Join(dir, CAKeyFile)) },
			wantErr: "DIR/ca.crt exists but DIR/ca.key does not: restore DIR/ca.key, or remove DIR/ca.crt",
		},
		{
			name:    "certificate missing",
			setup:   func(t *testing.T, dir string) { remove(t, filepath.Join(dir, CACertFile)) },
			wantErr: "DIR/ca.key exists but DIR/ca.crt does not",
		},
		{
			name:    "key of another CA",
			setup:   func(t *testing.T, dir string) { write(t, filepath.Join(dir, CAKeyFile), otherKeyPEM, 0o600) },
			wantErr: "does not hold the key of the certificate",
		},
		{
			name: "not a CA certificate",
			setup: func(t *testing.T, dir string) {
				write(t, filepath.Join(dir, CACertFile), leafCert, 0o644)
				write(t, filepath.Join(dir, CAKeyFile), leafKey, 0o600)
			},
			wantErr: "is not a CA certificate",
		},
		{
			name:    "garbage certificate",
			setup:   func(t *testing.T, dir string) { write(t, filepath.Join(dir, CACertFile), []byte("hello"), 0o644) },
			wantErr: "parse DIR/ca.crt: no PEM CERTIFICATE block",
		},
		{
			name: "two certificates",
			setup: func(t *testing.T, dir string) {
				b, err := os.ReadFile(filepath.Join(dir, CACertFile))
				if err != nil {
					t.Fatal(err)
				}
				write(t, filepath.Join(dir, CACertFile), append(b, other.CertPEM()...), 0o644)
			},
			wantErr: "want exactly one block",
		},
		{
			name: "garbage key",
			setup: func(t *testing.T, dir string) {
				write(t, filepath.Join(dir, CAKeyFile), []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), 0o600)
			},
			wantErr: "parse DIR/ca.key",
		},
		{
			name:    "expired",
			setup:   func(t *testing.T, dir string) {},
			now:     func() time.Time { return time.Now().Add(CALifetime + time.Hour) },
			wantErr: "not now",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			if _, err := LoadOrCreateCA(dir); err != nil {
				t.Fatal(err)
			}
			tt.setup(t, dir)
			now := tt.now
			if now == nil {
				now = time.Now
			}
			_, err := loadOrCreateCA(dir, now)
			if err == nil {
				t.Fatalf("loadOrCreateCA succeeded, want an error containing %q", tt.wantErr)
			}
			want := strings.ReplaceAll(tt.wantErr, "DIR", dir)
			if !strings.Contains(err.Error(), want) {
				t.Fatalf("error %q, want it to contain %q", err, want)
			}
		})
	}
}

func chmod(t *testing.T, path string, m os.FileMode) {
	t.Helper()
	if err := os.Chmod(path, m); err != nil {
		t.Fatal(err)
	}
}

func remove(t *testing.T, path string) {
	t.Helper()
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
}

func write(t *testing.T, path string, data []byte, m os.FileMode) {
	t.Helper()
	if err := WriteFileAtomic(path, data, m); err != nil {
		t.Fatal(err)
	}
}

func TestPoolRejectsOtherCA(t *testing.T) {
	ca, other := newTestCA(t), newTestCA(t)
	opts := x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}

	good, _, err := ca.IssueClient(NodeCommonName("a"), OrgNodes, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := parsePEMCert(t, good).Verify(opts); err != nil {
		t.Fatalf("certificate of the CA: %v", err)
	}
	bad, _, err := other.IssueClient(NodeCommonName("a"), OrgNodes, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := parsePEMCert(t, bad).Verify(opts); err == nil {
		t.Fatal("a certificate signed by another CA verified against Pool")
	}
	// Nor does the other CA's certificate itself.
	if _, err := parsePEMCert(t, other.CertPEM()).Verify(x509.VerifyOptions{Roots: ca.Pool()}); err == nil {
		t.Fatal("another CA's certificate verified against Pool")
	}
}

// csrWithExtras makes a CSR that asks for much more than a node should get.
func csrWithExtras(t testing.TB) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse("spiffe://evil/admin")
	basicCA, err := asn1.Marshal(struct {
		IsCA bool `asn1:"optional"`
	}{true})
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:        pkix.Name{CommonName: "admin", Organization: []string{OrgAdmins, OrgNodes}},
		DNSNames:       []string{"evil.example.com", "localhost"},
		IPAddresses:    []net.IP{net.ParseIP("192.0.2.1")},
		EmailAddresses: []string{"root@example.com"},
		URIs:           []*url.URL{u},
		ExtraExtensions: []pkix.Extension{
			{Id: asn1.ObjectIdentifier{2, 5, 29, 19}, Critical: true, Value: basicCA}, // basicConstraints CA:TRUE
		},
	}, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: pemCSR, Bytes: der})
}

func TestSignCSRIgnoresRequestedIdentity(t *testing.T) {
	ca := newTestCA(t)
	certPEM, err := ca.SignCSR(csrWithExtras(t), NodeCommonName("web-1"), OrgNodes, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	c := parsePEMCert(t, certPEM)
	if c.Subject.CommonName != "node:web-1" || !slices.Equal(c.Subject.Organization, []string{OrgNodes}) {
		t.Errorf("subject %v, want CN=node:web-1, O=%s", c.Subject, OrgNodes)
	}
	if len(c.DNSNames)+len(c.IPAddresses)+len(c.EmailAddresses)+len(c.URIs) != 0 {
		t.Errorf("certificate carries SANs from the request: %v %v %v %v", c.DNSNames, c.IPAddresses, c.EmailAddresses, c.URIs)
	}
	if c.IsCA {
		t.Error("certificate is a CA")
	}
	if !slices.Equal(c.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) || len(c.UnknownExtKeyUsage) != 0 {
		t.Errorf("ExtKeyUsage = %v %v, want client auth only", c.ExtKeyUsage, c.UnknownExtKeyUsage)
	}
	if time.Until(c.NotAfter) > 24*time.Hour || time.Until(c.NotAfter) < 23*time.Hour {
		t.Errorf("NotAfter %v, want in 24h", c.NotAfter)
	}
	id, ok := IdentityFromCert(c)
	if want := (Identity{Kind: KindNode, Name: "web-1"}); !ok || id != want {
		t.Errorf("IdentityFromCert = %+v, %v; want %+v", id, ok, want)
	}
	roots := ca.Pool()
	if _, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("client verification: %v", err)
	}
	if _, err := c.Verify(x509.VerifyOptions{Roots: roots, DNSName: "evil.example.com"}); err == nil {
		t.Error("the node certificate verified as a server certificate")
	}
}

func TestSignCSRKeyTypes(t *testing.T) {
	ca := newTestCA(t)
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	weakRSA, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name    string
		key     any
		wantErr string
	}{
		{"ed25519", edKey, ""},
		{"rsa 2048", rsaKey, ""},
		{"rsa 1024", weakRSA, "RSA key has 1024 bits"},
		{"p224", p224, "not on curve"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, tt.key)
			if err != nil {
				t.Skipf("cannot make a CSR with this key here: %v", err)
			}
			_, err = ca.SignCSR(pem.EncodeToMemory(&pem.Block{Type: pemCSR, Bytes: der}), NodeCommonName("n"), OrgNodes, time.Hour)
			if tt.wantErr == "" && err != nil {
				t.Fatal(err)
			}
			if tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("error %v, want it to contain %q", err, tt.wantErr)
			}
		})
	}
}

func TestSignCSRErrors(t *testing.T) {
	ca := newTestCA(t)
	_, csr, err := NewKeyAndCSR()
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(csr)
	tampered := bytes.Clone(block.Bytes)
	tampered[len(tampered)-1] ^= 0xff // in the signature
	tamperedPEM := pem.EncodeToMemory(&pem.Block{Type: pemCSR, Bytes: tampered})
	legacy := pem.EncodeToMemory(&pem.Block{Type: pemCSRLegacy, Bytes: block.Bytes})

	tests := []struct {
		name    string
		csr     []byte
		cn, org string
		ttl     time.Duration
		wantErr string
	}{
		{name: "ok", csr: csr, cn: "node:a", org: OrgNodes, ttl: time.Hour},
		{name: "legacy PEM type", csr: legacy, cn: "node:a", org: OrgNodes, ttl: time.Hour},
		{name: "empty", csr: nil, cn: "node:a", org: OrgNodes, ttl: time.Hour, wantErr: "no PEM CERTIFICATE REQUEST block"},
		{name: "certificate instead", csr: ca.CertPEM(), cn: "node:a", org: OrgNodes, ttl: time.Hour, wantErr: `PEM block is a "CERTIFICATE"`},
		{name: "trailing data", csr: append(bytes.Clone(csr), "junk"...), cn: "node:a", org: OrgNodes, ttl: time.Hour, wantErr: "data follows"},
		{name: "bad signature", csr: tamperedPEM, cn: "node:a", org: OrgNodes, ttl: time.Hour, wantErr: "signature does not verify"},
		{name: "bad DER", csr: pem.EncodeToMemory(&pem.Block{Type: pemCSR, Bytes: []byte{1, 2, 3}}), cn: "node:a", org: OrgNodes, ttl: time.Hour, wantErr: "sign CSR: parse"},
		{name: "too large", csr: bytes.Repeat([]byte{' '}, maxPEMSize+1), cn: "node:a", org: OrgNodes, ttl: time.Hour, wantErr: "more than"},
		{name: "empty CN", csr: csr, cn: "", org: OrgNodes, ttl: time.Hour, wantErr: "common name is empty"},
		{name: "empty org", csr: csr, cn: "node:a", org: "", ttl: time.Hour, wantErr: "organization is empty"},
		{name: "control character", csr: csr, cn: "node:a\n", org: OrgNodes, ttl: time.Hour, wantErr: "not printable"},
		{name: "long CN", csr: csr, cn: strings.Repeat("a", maxNameLen+1), org: OrgNodes, ttl: time.Hour, wantErr: "long"},
		{name: "zero ttl", csr: csr, cn: "node:a", org: OrgNodes, ttl: 0, wantErr: "not positive"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ca.SignCSR(tt.csr, tt.cn, tt.org, tt.ttl)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error %v, want it to contain %q", err, tt.wantErr)
			}
		})
	}
}

func TestClientTTLCappedAtCAExpiry(t *testing.T) {
	ca := newTestCA(t)
	certPEM, _, err := ca.IssueClient("admin", OrgAdmins, 20*CALifetime)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := parsePEMCert(t, certPEM).NotAfter, ca.cert.NotAfter; !got.Equal(want) {
		t.Errorf("NotAfter %v, want the CA's %v", got, want)
	}
}

func TestIdentityFromCert(t *testing.T) {
	tests := []struct {
		name  string
		cert  *x509.Certificate
		want  Identity
		valid bool
	}{
		{"node", clientCert("node:a", OrgNodes), Identity{KindNode, "a"}, true},
		{"admin", clientCert("alice", OrgAdmins), Identity{KindAdmin, "alice"}, true},
		{"admin named like a node", clientCert("node:a", OrgAdmins), Identity{KindAdmin, "node:a"}, true},
		{"node without prefix", clientCert("a", OrgNodes), Identity{}, false},
		{"node with empty name", clientCert("node:", OrgNodes), Identity{}, false},
		{"admin with empty name", clientCert("", OrgAdmins), Identity{}, false},
		{"egress", clientCert("kube-apiserver", OrgEgress), Identity{KindEgress, "kube-apiserver"}, true},
		{"egress with empty name", clientCert("", OrgEgress), Identity{}, false},
		{"unknown org", clientCert("node:a", "trellis"), Identity{}, false},
		{"two orgs", clientCert("node:a", OrgNodes, OrgAdmins), Identity{}, false},
		{"no org", clientCert("node:a"), Identity{}, false},
		{"server cert", &x509.Certificate{Subject: pkix.Name{CommonName: "alice", Organization: []string{OrgAdmins}}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}, Identity{}, false},
		{"nil", nil, Identity{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := IdentityFromCert(tt.cert)
			if got != tt.want || ok != tt.valid {
				t.Errorf("IdentityFromCert = %+v, %v; want %+v, %v", got, ok, tt.want, tt.valid)
			}
		})
	}
	if KindNode.String() != "node" || KindAdmin.String() != "admin" || IdentityKind(0).String() != "IdentityKind(0)" {
		t.Error("IdentityKind.String")
	}
}

func clientCert(cn string, orgs ...string) *x509.Certificate {
	return &x509.Certificate{
		Subject:     pkix.Name{CommonName: cn, Organization: orgs},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

func TestServing(t *testing.T) {
	ca := newTestCA(t)
	dir := filepath.Join(t.TempDir(), "serving")
	sans := SANs{DNSNames: []string{"Server.Example.COM."}, IPs: []netip.Addr{mustAddr("198.51.100.10")}}

	first, err := ca.LoadOrCreateServing(dir, sans)
	if err != nil {
		t.Fatal(err)
	}
	leaf := first.Leaf
	if !slices.Equal(leaf.DNSNames, []string{"localhost", "server.example.com"}) {
		t.Errorf("DNSNames %v", leaf.DNSNames)
	}
	var ips []string
	for _, ip := range leaf.IPAddresses {
		ips = append(ips, ip.String())
	}
	if want := []string{"127.0.0.1", "198.51.100.10", "::1"}; !slices.Equal(ips, want) {
		t.Errorf("IPs %v, want %v", ips, want)
	}
	if !slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}) {
		t.Errorf("ExtKeyUsage %v, want server auth", leaf.ExtKeyUsage)
	}
	if m := mode(t, filepath.Join(dir, ServingKeyFile)); m != 0o600 {
		t.Errorf("serving.key mode %04o", m)
	}
	for _, name := range []string{"server.example.com", "localhost", "198.51.100.10", "::1"} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), DNSName: name}); err != nil {
			t.Errorf("verify for %s: %v", name, err)
		}
	}

	serial := func(c tls.Certificate) string { return c.Leaf.SerialNumber.String() }
	load := func(ca *CA, sans SANs) tls.Certificate {
		t.Helper()
		c, err := ca.LoadOrCreateServing(dir, sans)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}

	// Same or fewer SANs: kept.
	if c := load(ca, sans); serial(c) != serial(first) {
		t.Error("reissued although nothing changed")
	}
	if c := load(ca, SANs{DNSNames: []string{"localhost", "server.example.com", "127.0.0.1"}}); serial(c) != serial(first) {
		t.Error("reissued although no SAN was added")
	}

	// A new DNS name: reissued, carrying it.
	sans.DNSNames = append(sans.DNSNames, "other.example.com")
	second := load(ca, sans)
	if serial(second) == serial(first) || !slices.Contains(second.Leaf.DNSNames, "other.example.com") {
		t.Fatalf("adding a DNS SAN: serial %s -> %s, DNSNames %v", serial(first), serial(second), second.Leaf.DNSNames)
	}
	// A new IP, given among the DNS names as --tls-san values are: reissued.
	third := load(ca, SANs{DNSNames: append(slices.Clone(sans.DNSNames), "2001:db8::1"), IPs: sans.IPs})
	if serial(third) == serial(second) || len(third.Leaf.IPAddresses) != 4 {
		t.Fatalf("adding an IP SAN: IPs %v", third.Leaf.IPAddresses)
	}
	sans.IPs = append(sans.IPs, mustAddr("2001:db8::1"))
	if serial(load(ca, sans)) != serial(third) {
		t.Error("reissued for the same SANs in another order")
	}

	// Expiring within 30 days: reissued.
	later := *ca
	later.now = func() time.Time { return time.Now().Add(ServingLifetime - ServingRenewBefore + time.Hour) }
	fourth := load(&later, sans)
	if serial(fourth) == serial(third) {
		t.Error("not reissued although it expires within 30 days")
	}
	if d := fourth.Leaf.NotAfter.Sub(later.now()); d < ServingLifetime-time.Minute {
		t.Errorf("reissued certificate valid for %v after the (fake) now", d)
	}

	// Key readable by others: reissued.
	chmod(t, filepath.Join(dir, ServingKeyFile), 0o644)
	fifth := load(ca, sans)
	if serial(fifth) == serial(fourth) || mode(t, filepath.Join(dir, ServingKeyFile)) != 0o600 {
		t.Error("not reissued although its key was readable by others")
	}

	// Issued by another CA: reissued by this one.
	other := newTestCA(t)
	sixth := load(other, sans)
	if _, err := sixth.Leaf.Verify(x509.VerifyOptions{Roots: other.Pool()}); err != nil {
		t.Errorf("certificate of a new CA: %v", err)
	}

	// Mismatched files (a crash between the two writes): reissued.
	write(t, filepath.Join(dir, ServingCertFile), certPEM(first.Leaf.Raw), 0o644)
	if _, err := other.LoadOrCreateServing(dir, sans); err != nil {
		t.Fatal(err)
	}
}

func TestServingInvalidSANs(t *testing.T) {
	ca := newTestCA(t)
	for _, sans := range []SANs{
		{DNSNames: []string{"has space.example.com"}},
		{DNSNames: []string{"a..b"}},
		{DNSNames: []string{"ünïcode.example"}},
		{IPs: []netip.Addr{{}}},
	} {
		if _, err := ca.LoadOrCreateServing(t.TempDir(), sans); err == nil {
			t.Errorf("LoadOrCreateServing(%v) succeeded, want an error", sans)
		}
	}
	// Wildcards, zones and mapped addresses are fine.
	c, err := ca.LoadOrCreateServing(t.TempDir(), SANs{
		DNSNames: []string{"*.example.com"},
		IPs:      []netip.Addr{mustAddr("::ffff:192.0.2.7"), mustAddr("fe80::1%eth0")},
	})
	if err != nil {
		t.Fatal(err)
	}
	var ips []string
	for _, ip := range c.Leaf.IPAddresses {
		ips = append(ips, ip.String())
	}
	if want := []string{"127.0.0.1", "192.0.2.7", "::1", "fe80::1"}; !slices.Equal(ips, want) {
		t.Errorf("IPs %v, want %v", ips, want)
	}
}

// TestHandshake runs TLS between a server with the serving certificate that
// requires client certificates, and clients with certificates from the CA
// and from another CA.
func TestHandshake(t *testing.T) {
	ca := newTestCA(t)
	serving, err := ca.LoadOrCreateServing(t.TempDir(), SANs{DNSNames: []string{"trellis.example"}})
	if err != nil {
		t.Fatal(err)
	}

	keyPEM, csrPEM, err := NewKeyAndCSR()
	if err != nil {
		t.Fatal(err)
	}
	nodeCertPEM, err := ca.SignCSR(csrPEM, NodeCommonName("n1"), OrgNodes, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	nodeCert, err := tls.X509KeyPair(nodeCertPEM, keyPEM)
	if err != nil {
		t.Fatalf("NewKeyAndCSR key and the signed certificate do not pair: %v", err)
	}
	other := newTestCA(t)
	strangerPEM, strangerKey, err := other.IssueClient(NodeCommonName("n1"), OrgNodes, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	stranger, err := tls.X509KeyPair(strangerPEM, strangerKey)
	if err != nil {
		t.Fatal(err)
	}

	handshake := func(client tls.Certificate) (Identity, bool, error) {
		cc, sc := net.Pipe()
		defer cc.Close()
		defer sc.Close()
		srv := tls.Server(sc, &tls.Config{
			Certificates: []tls.Certificate{serving},
			ClientCAs:    ca.Pool(),
			ClientAuth:   tls.RequireAndVerifyClientCert,
		})
		cli := tls.Client(cc, &tls.Config{
			RootCAs:      ca.Pool(),
			ServerName:   "trellis.example",
			Certificates: []tls.Certificate{client},
		})
		errc := make(chan error, 1)
		go func() {
			err := cli.Handshake()
			if err == nil {
				// TLS 1.3: the server checks the client certificate
				// after the client's handshake ends; read its verdict.
				_, err = cli.Read(make([]byte, 1))
			}
			errc <- err
		}()
		serr := srv.Handshake()
		var id Identity
		var ok bool
		if serr == nil {
			id, ok = IdentityFromCert(srv.ConnectionState().VerifiedChains[0][0])
			srv.Close()
		} else {
			sc.Close()
		}
		<-errc
		return id, ok, serr
	}

	id, ok, err := handshake(nodeCert)
	if err != nil || !ok || id != (Identity{KindNode, "n1"}) {
		t.Errorf("node handshake: %+v, %v, %v", id, ok, err)
	}
	if _, _, err := handshake(stranger); err == nil {
		t.Error("a client certificate from another CA was accepted")
	}
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "x", "y", "secret")
	if err := WriteFileAtomic(path, []byte("one"), 0o600); err != nil {
		t.Fatal(err)
	}
	if m := mode(t, filepath.Join(dir, "x")); m != 0o700 {
		t.Errorf("parent mode %04o, want 0700", m)
	}
	if err := WriteFileAtomic(path, []byte("two"), 0o640); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "two" {
		t.Errorf("content %q, %v", b, err)
	}
	if m := mode(t, path); m != 0o640 {
		t.Errorf("mode %04o, want 0640", m)
	}
	entries, err := os.ReadDir(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		t.Errorf("directory holds %d entries, want only the file (no temporary files)", len(entries))
	}
	// A directory in the way: an error that names the path.
	if err := WriteFileAtomic(filepath.Join(dir, "x"), nil, 0o600); err == nil || !strings.Contains(err.Error(), filepath.Join(dir, "x")) {
		t.Errorf("writing over a directory: %v", err)
	}
}

func TestCheckPrivate(t *testing.T) {
	dir := t.TempDir()
	for _, tt := range []struct {
		mode os.FileMode
		ok   bool
	}{
		{0o600, true},
		{0o400, true},
		{0o640, false},
		{0o604, false},
		{0o602, false},
		{0o644, false},
	} {
		path := filepath.Join(dir, tt.mode.String())
		write(t, path, []byte("k"), tt.mode)
		err := CheckPrivate(path)
		if (err == nil) != tt.ok {
			t.Errorf("mode %04o: %v, want ok=%v", tt.mode, err, tt.ok)
		}
		if err != nil && !strings.Contains(err.Error(), "run chmod 600 "+path) {
			t.Errorf("mode %04o: error %q does not say what to run", tt.mode, err)
		}
	}
	if err := CheckPrivate(filepath.Join(dir, "missing")); err == nil {
		t.Error("CheckPrivate of a missing file succeeded")
	}
}

func FuzzSignCSR(f *testing.F) {
	ca := newTestCA(f)
	_, csr, err := NewKeyAndCSR()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(csr)
	f.Add(csrWithExtras(f))
	f.Add(ca.CertPEM())
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"))
	f.Add([]byte{})
	block, _ := pem.Decode(csr)
	f.Add(block.Bytes) // DER, not PEM
	f.Fuzz(func(t *testing.T, data []byte) {
		// Also try data as the DER inside a PEM block, to reach the
		// ASN.1 parser more often.
		for _, in := range [][]byte{data, pem.EncodeToMemory(&pem.Block{Type: pemCSR, Bytes: data})} {
			certPEM, err := ca.SignCSR(in, NodeCommonName("fuzz"), OrgNodes, time.Hour)
			if err != nil {
				continue
			}
			c := parsePEMCert(t, certPEM)
			if id, ok := IdentityFromCert(c); !ok || id != (Identity{KindNode, "fuzz"}) || c.IsCA || len(c.DNSNames) != 0 {
				t.Fatalf("signed a certificate with the wrong identity: %+v %v IsCA=%v %v", id, ok, c.IsCA, c.DNSNames)
			}
		}
	})
}
