package pki

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"slices"
)

// PEM block types.
const (
	pemCertificate = "CERTIFICATE"
	pemPrivateKey  = "PRIVATE KEY" // PKCS #8, what this package writes
	pemECKey       = "EC PRIVATE KEY"
	pemRSAKey      = "RSA PRIVATE KEY"
	pemCSR         = "CERTIFICATE REQUEST"
	pemCSRLegacy   = "NEW CERTIFICATE REQUEST"
)

// maxPEMSize bounds the PEM input this package parses. A certificate or CSR
// is a few hundred bytes; 64 KiB leaves room for large RSA keys.
const maxPEMSize = 64 << 10

// decodeOnePEM decodes the single PEM block in data, of one of the given
// types. Anything but white space around the block is an error.
func decodeOnePEM(data []byte, types ...string) (*pem.Block, error) {
	if len(data) > maxPEMSize {
		return nil, fmt.Errorf("PEM data is %d bytes, more than the %d allowed", len(data), maxPEMSize)
	}
	block, rest := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("no PEM %s block found", types[0])
	}
	if !slices.Contains(types, block.Type) {
		return nil, fmt.Errorf("PEM block is a %q, want a %q", block.Type, types[0])
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("data follows the PEM %s block: want exactly one block", types[0])
	}
	return block, nil
}

// parseCertPEM parses a PEM file holding exactly one certificate.
func parseCertPEM(data []byte) (*x509.Certificate, error) {
	block, err := decodeOnePEM(data, pemCertificate)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(block.Bytes)
}

// parseKeyPEM parses a PEM file holding exactly one private key, in PKCS #8
// (what this package writes), SEC 1 or PKCS #1 form.
func parseKeyPEM(data []byte) (crypto.Signer, error) {
	block, err := decodeOnePEM(data, pemPrivateKey, pemECKey, pemRSAKey)
	if err != nil {
		return nil, err
	}
	var key any
	switch block.Type {
	case pemPrivateKey:
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case pemECKey:
		key, err = x509.ParseECPrivateKey(block.Bytes)
	case pemRSAKey:
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	}
	if err != nil {
		return nil, err
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("private key of type %T cannot sign", key)
	}
	return signer, nil
}

// newKey generates the key type this package uses everywhere: ECDSA P-256.
func newKey() (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("marshal key: %w", err)
	}
	return key, pem.EncodeToMemory(&pem.Block{Type: pemPrivateKey, Bytes: der}), nil
}

// certPEM encodes a DER certificate as PEM.
func certPEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: pemCertificate, Bytes: der})
}

// keyMatches reports whether pub is the public half of key.
func keyMatches(pub crypto.PublicKey, key crypto.Signer) bool {
	k, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(pub)
}

// checkPublicKey rejects public keys too weak, or of a kind not worth
// supporting, for a certificate this package signs.
func checkPublicKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256(), elliptic.P384(), elliptic.P521():
			return nil
		}
		return errors.New("ECDSA key is not on curve P-256, P-384 or P-521")
	case ed25519.PublicKey:
		return nil
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return fmt.Errorf("RSA key has %d bits, want at least 2048", k.N.BitLen())
		}
		return nil
	default:
		return fmt.Errorf("unsupported public key type %T", pub)
	}
}

// newSerial returns a random positive 128-bit certificate serial number.
func newSerial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("generate serial number: %w", err)
	}
	return n.Add(n, big.NewInt(1)), nil
}
