package pki

import (
	"bytes"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"time"
)

// File names of the embedded etcd member's certificate, inside the
// directory given to IssueEtcd.
const (
	EtcdCertFile = "etcd.crt"
	EtcdKeyFile  = "etcd.key"
)

// EtcdLifetime is how long an etcd member certificate is valid. A new one
// is issued at every start, so the lifetime only has to outlast one run.
const EtcdLifetime = 365 * 24 * time.Hour

// IssueEtcd issues a new key and certificate for an embedded etcd member
// and writes them to dir/etcd.crt and dir/etcd.key (the key first, 0600).
// The certificate is valid for server and client authentication, because
// etcd members dial each other with the certificate they serve with, and
// names sans plus localhost, 127.0.0.1 and ::1 (the member's client port
// listens on loopback). It is issued anew on every call: members restart
// rarely, and a fresh certificate always carries the current addresses.
func (ca *CA) IssueEtcd(dir, name string, sans SANs) (certPath, keyPath string, err error) {
	want, err := sans.normalize()
	if err != nil {
		return "", "", fmt.Errorf("etcd certificate: %w", err)
	}
	key, keyPEM, err := newKey()
	if err != nil {
		return "", "", fmt.Errorf("etcd certificate: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return "", "", fmt.Errorf("etcd certificate: %w", err)
	}
	ips := make([]net.IP, len(want.IPs))
	for i, ip := range want.IPs {
		ips[i] = ip.AsSlice()
	}
	now := ca.now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			CommonName:   "etcd:" + name,
			Organization: []string{"trellis:etcd"},
		},
		DNSNames:              want.DNSNames,
		IPAddresses:           ips,
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              ca.notAfter(now.Add(EtcdLifetime)),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		return "", "", fmt.Errorf("etcd certificate: sign: %w", err)
	}
	certPath, keyPath = filepath.Join(dir, EtcdCertFile), filepath.Join(dir, EtcdKeyFile)
	if err := WriteFileAtomic(keyPath, keyPEM, 0o600); err != nil {
		return "", "", fmt.Errorf("etcd certificate: %w", err)
	}
	if err := WriteFileAtomic(certPath, certPEM(der), 0o644); err != nil {
		return "", "", fmt.Errorf("etcd certificate: %w", err)
	}
	return certPath, keyPath, nil
}

// KeyPEM returns the CA's private key as PKCS #8 PEM. Only a server
// handing the CA to another server of the same cluster (authenticated by
// the server token) may call it: whoever holds the key can issue any
// credential of the cluster.
func (ca *CA) KeyPEM() ([]byte, error) {
	b, err := x509.MarshalPKCS8PrivateKey(ca.key)
	if err != nil {
		return nil, fmt.Errorf("encode CA key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: pemPrivateKey, Bytes: b}), nil
}

// InstallCA writes a CA received from another server of the cluster into
// dir (ca.crt 0644, ca.key 0600), so that LoadOrCreateCA loads it. It
// checks that the pair matches and is a valid CA. If dir already holds a
// CA, the same one is accepted and another one is refused: replacing a CA
// would orphan every credential it issued.
func InstallCA(dir string, certData, keyData []byte) error {
	cert, err := parseCertPEM(certData)
	if err != nil {
		return fmt.Errorf("install CA: certificate: %w", err)
	}
	key, err := parseKeyPEM(keyData)
	if err != nil {
		return fmt.Errorf("install CA: key: %w", err)
	}
	if !keyMatches(cert.PublicKey, key) {
		return errors.New("install CA: the key does not belong to the certificate")
	}
	if !cert.IsCA || !cert.BasicConstraintsValid || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return errors.New("install CA: the certificate is not a CA certificate")
	}
	certPath := filepath.Join(dir, CACertFile)
	keyPath := filepath.Join(dir, CAKeyFile)
	if have, err := os.ReadFile(certPath); err == nil {
		if !bytes.Equal(have, certData) {
			return fmt.Errorf("install CA: %s holds the CA of another cluster: a server joins a cluster with an empty data dir; remove %s and %s (this server's nodes must then join again) or use another --data-dir", certPath, certPath, keyPath)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("install CA: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("install CA: %w", err)
	}
	if err := WriteFileAtomic(keyPath, keyData, 0o600); err != nil {
		return fmt.Errorf("install CA: %w", err)
	}
	if err := WriteFileAtomic(certPath, certData, 0o644); err != nil {
		return fmt.Errorf("install CA: %w", err)
	}
	return nil
}
