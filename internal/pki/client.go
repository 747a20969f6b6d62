package pki

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"time"
	"unicode"
	"unicode/utf8"
)

// maxNameLen is the longest common name or organization SignCSR accepts.
// It is above the 64 of X.520 (which Go and Kubernetes do not enforce), so
// that "node:" plus a 253-byte DNS name fits.
const maxNameLen = 512

// SignCSR issues a client certificate for the public key in the PEM
// certificate request csrPEM, valid for ttl (capped at the CA's own expiry).
//
// It checks the request's self-signature, and then uses nothing from the
// request but its public key: the subject, SANs and extensions the requester
// asked for are ignored. The certificate's subject is CN=commonName,
// O=org, and its only extended key usage is client authentication.
func (ca *CA) SignCSR(csrPEM []byte, commonName, org string, ttl time.Duration) (certPEM []byte, err error) {
	block, err := decodeOnePEM(csrPEM, pemCSR, pemCSRLegacy)
	if err != nil {
		return nil, fmt.Errorf("sign CSR: %w", err)
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("sign CSR: parse: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("sign CSR: the request's signature does not verify: %w", err)
	}
	if err := checkPublicKey(csr.PublicKey); err != nil {
		return nil, fmt.Errorf("sign CSR: %w", err)
	}
	certPEM, err = ca.signClient(csr.PublicKey, commonName, org, ttl)
	if err != nil {
		return nil, fmt.Errorf("sign CSR: %w", err)
	}
	return certPEM, nil
}

// IssueClient creates a key and a client certificate for it, as SignCSR
// would issue, for credentials made on the server such as the admin's.
func (ca *CA) IssueClient(commonName, org string, ttl time.Duration) (certPEM, keyPEM []byte, err error) {
	key, keyPEM, err := newKey()
	if err != nil {
		return nil, nil, fmt.Errorf("issue client certificate: %w", err)
	}
	certPEM, err = ca.signClient(key.Public(), commonName, org, ttl)
	if err != nil {
		return nil, nil, fmt.Errorf("issue client certificate: %w", err)
	}
	return certPEM, keyPEM, nil
}

// NewKeyAndCSR creates an ECDSA P-256 key and a certificate request for it,
// both PEM, for a node to send to the server. The request names no identity:
// the server chooses it (see SignCSR).
func NewKeyAndCSR() (keyPEM, csrPEM []byte, err error) {
	key, keyPEM, err := newKey()
	if err != nil {
		return nil, nil, fmt.Errorf("new CSR: %w", err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("new CSR: %w", err)
	}
	return keyPEM, pem.EncodeToMemory(&pem.Block{Type: pemCSR, Bytes: der}), nil
}

// signClient issues a client certificate for pub.
func (ca *CA) signClient(pub crypto.PublicKey, commonName, org string, ttl time.Duration) ([]byte, error) {
	if err := checkName("common name", commonName); err != nil {
		return nil, err
	}
	if err := checkName("organization", org); err != nil {
		return nil, err
	}
	if ttl <= 0 {
		return nil, fmt.Errorf("certificate lifetime %v is not positive", ttl)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	now := ca.now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			CommonName:   commonName,
			Organization: []string{org},
		},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              ca.notAfter(now.Add(ttl)),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	return certPEM(der), nil
}

// checkName rejects a subject field that is empty, too long, or not
// printable text.
func checkName(what, s string) error {
	if s == "" {
		return fmt.Errorf("%s is empty", what)
	}
	if len(s) > maxNameLen {
		return fmt.Errorf("%s is %d bytes long, more than %d", what, len(s), maxNameLen)
	}
	if !utf8.ValidString(s) {
		return fmt.Errorf("%s is not valid UTF-8", what)
	}
	for _, r := range s {
		if !unicode.IsPrint(r) {
			return errors.New(what + " contains a character that is not printable")
		}
	}
	return nil
}
