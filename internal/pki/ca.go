// Package pki creates the cluster CA and the certificates signed by it.
//
// All keys this package creates are ECDSA P-256, written as PKCS #8 PEM with
// mode 0600; certificates are PEM with mode 0644. Files are replaced
// atomically (WriteFileAtomic).
package pki

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// File names inside the directory given to LoadOrCreateCA.
const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
)

// CALifetime is how long a new CA certificate is valid.
const CALifetime = 10 * 365 * 24 * time.Hour

// clockSkew is how far into the past NotBefore is set, so that a certificate
// is valid on machines whose clocks lag the issuer's.
const clockSkew = time.Hour

// CA is the cluster certificate authority: its certificate and private key.
// Its methods are safe for concurrent use; those that write files must not
// be called concurrently for the same directory.
type CA struct {
	cert    *x509.Certificate
	certPEM []byte // the bytes of ca.crt, exactly
	key     crypto.Signer
	now     func() time.Time
}

// LoadOrCreateCA loads the CA from dir/ca.crt and dir/ca.key, or, when
// neither file exists, creates a new ECDSA P-256 CA valid for ten years and
// writes it there (creating dir with mode 0700 if needed).
//
// It refuses to load a key file that group or others can access (the error
// says to run chmod 600): the key may have leaked, and fixing the mode
// silently would hide that. It also refuses a pair where only one file
// exists, where the key does not match the certificate, or where the
// certificate is not a currently valid CA certificate.
func LoadOrCreateCA(dir string) (*CA, error) {
	return loadOrCreateCA(dir, time.Now)
}

func loadOrCreateCA(dir string, now func() time.Time) (*CA, error) {
	certPath := filepath.Join(dir, CACertFile)
	keyPath := filepath.Join(dir, CAKeyFile)
	certData, certErr := os.ReadFile(certPath)
	keyData, keyErr := os.ReadFile(keyPath)
	certMissing := errors.Is(certErr, fs.ErrNotExist)
	keyMissing := errors.Is(keyErr, fs.ErrNotExist)
	switch {
	case certMissing && keyMissing:
		return createCA(certPath, keyPath, now)
	case certErr != nil && !certMissing:
		return nil, fmt.Errorf("load CA: %w", certErr)
	case keyErr != nil && !keyMissing:
		return nil, fmt.Errorf("load CA: %w", keyErr)
	case keyMissing:
		return nil, fmt.Errorf("load CA: %s exists but %s does not: restore %s, or remove %s to create a new CA (every node must then join again)", certPath, keyPath, keyPath, certPath)
	case certMissing:
		return nil, fmt.Errorf("load CA: %s exists but %s does not: restore %s, or remove %s to create a new CA (every node must then join again)", keyPath, certPath, certPath, keyPath)
	}
	if err := CheckPrivate(keyPath); err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	cert, err := parseCertPEM(certData)
	if err != nil {
		return nil, fmt.Errorf("load CA: parse %s: %w", certPath, err)
	}
	key, err := parseKeyPEM(keyData)
	if err != nil {
		return nil, fmt.Errorf("load CA: parse %s: %w", keyPath, err)
	}
	if !keyMatches(cert.PublicKey, key) {
		return nil, fmt.Errorf("load CA: %s does not hold the key of the certificate in %s: restore the matching pair", keyPath, certPath)
	}
	if !cert.IsCA || !cert.BasicConstraintsValid || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("load CA: %s is not a CA certificate (basic constraints CA:TRUE and key usage certSign)", certPath)
	}
	if t := now(); t.After(cert.NotAfter) || t.Before(cert.NotBefore) {
		return nil, fmt.Errorf("load CA: the CA certificate in %s is valid from %s to %s, not now (%s): check the clock, or remove %s and %s to create a new CA (every node must then join again)",
			certPath, cert.NotBefore.UTC().Format(time.RFC3339), cert.NotAfter.UTC().Format(time.RFC3339), t.UTC().Format(time.RFC3339), certPath, keyPath)
	}
	return &CA{cert: cert, certPEM: certData, key: key, now: now}, nil
}

// createCA creates a new CA and writes it to certPath and keyPath. The key is
// written first: a crash between the two writes leaves a key without a
// certificate, which LoadOrCreateCA reports instead of replacing silently.
func createCA(certPath, keyPath string, now func() time.Time) (*CA, error) {
	key, keyPEM, err := newKey()
	if err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	t := now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			CommonName:   fmt.Sprintf("trellis-ca@%d", t.Unix()),
			Organization: []string{"trellis"},
		},
		NotBefore:             t.Add(-clockSkew),
		NotAfter:              t.Add(CALifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("create CA: sign certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	pemBytes := certPEM(der)
	if err := WriteFileAtomic(keyPath, keyPEM, 0o600); err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	if err := WriteFileAtomic(certPath, pemBytes, 0o644); err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	return &CA{cert: cert, certPEM: pemBytes, key: key, now: now}, nil
}

// CertPEM returns the CA certificate as PEM: the bytes of ca.crt, exactly.
// These are the bytes to serve at /cacerts and to hash into join tokens.
// The caller may modify the returned slice.
func (ca *CA) CertPEM() []byte {
	return bytes.Clone(ca.certPEM)
}

// Pool returns a new certificate pool holding only the CA certificate, for
// tls.Config.RootCAs (agents, CLI) and tls.Config.ClientCAs (server).
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

// notAfter caps a certificate's expiry at the CA's: a certificate cannot be
// verified after its issuer expires.
func (ca *CA) notAfter(t time.Time) time.Time {
	if t.After(ca.cert.NotAfter) {
		return ca.cert.NotAfter
	}
	return t
}
