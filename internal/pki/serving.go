package pki

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// File names inside the directory given to LoadOrCreateServing.
const (
	ServingCertFile = "serving.crt"
	ServingKeyFile  = "serving.key"
)

// ServingLifetime is how long a new serving certificate is valid.
const ServingLifetime = 365 * 24 * time.Hour

// ServingRenewBefore is how long before its expiry LoadOrCreateServing
// replaces a serving certificate.
const ServingRenewBefore = 30 * 24 * time.Hour

// SANs are the subject alternative names of a serving certificate: the names
// and addresses clients use to reach the server.
type SANs struct {
	// DNSNames are host names, compared without regard to case. A name
	// that parses as an IP address is treated as one of IPs, so that
	// --tls-san values can be passed here unsorted.
	DNSNames []string
	// IPs are IP addresses. IPv4-mapped IPv6 addresses are unmapped and
	// zones are dropped.
	IPs []netip.Addr
}

// normalize returns s plus the default SANs, cleaned, deduplicated and
// sorted.
func (s SANs) normalize() (SANs, error) {
	// The defaults, in every serving certificate.
	out := SANs{IPs: []netip.Addr{netip.AddrFrom4([4]byte{127, 0, 0, 1}), netip.IPv6Loopback()}}
	for _, list := range [][]string{{"localhost"}, s.DNSNames} {
		for _, name := range list {
			if ip, err := netip.ParseAddr(name); err == nil {
				out.IPs = append(out.IPs, ip)
				continue
			}
			name = strings.TrimSuffix(strings.ToLower(name), ".")
			if !validDNSName(name) {
				return SANs{}, fmt.Errorf("%q is not a valid DNS name or IP address for the serving certificate", name)
			}
			out.DNSNames = append(out.DNSNames, name)
		}
	}
	out.IPs = append(out.IPs, s.IPs...)
	for i, ip := range out.IPs {
		if !ip.IsValid() {
			return SANs{}, errors.New("an invalid (zero) IP address was given for the serving certificate")
		}
		out.IPs[i] = ip.Unmap().WithZone("")
	}
	slices.Sort(out.DNSNames)
	out.DNSNames = slices.Compact(out.DNSNames)
	slices.SortFunc(out.IPs, netip.Addr.Compare)
	out.IPs = slices.Compact(out.IPs)
	return out, nil
}

// validDNSName reports whether name can be a DNS SAN: letters, digits, '-',
// '_' and '.', with an optional leading "*." wildcard label.
func validDNSName(name string) bool {
	name = strings.TrimPrefix(name, "*.")
	if name == "" || len(name) > 253 {
		return false
	}
	for _, label := range strings.Split(name, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for _, c := range []byte(label) {
			if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// LoadOrCreateServing returns the server's TLS certificate from
// dir/serving.crt and dir/serving.key, issuing a new one (key and
// certificate, valid for a year) when the files are missing or unusable.
// "localhost", 127.0.0.1 and ::1 are always added to sans.
//
// An existing certificate is replaced when it lacks any of the requested
// SANs (so a new --tls-san or a new address takes effect on restart),
// expires within ServingRenewBefore, was not issued by ca for server
// authentication, does not match its key, or when its key file is accessible
// by group or others. A replaced certificate keeps none of its old SANs.
func (ca *CA) LoadOrCreateServing(dir string, sans SANs) (tls.Certificate, error) {
	want, err := sans.normalize()
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("serving certificate: %w", err)
	}
	certPath := filepath.Join(dir, ServingCertFile)
	keyPath := filepath.Join(dir, ServingKeyFile)
	if c, ok := ca.loadServing(certPath, keyPath, want); ok {
		return c, nil
	}
	c, err := ca.issueServing(certPath, keyPath, want)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("serving certificate: %w", err)
	}
	return c, nil
}

// loadServing loads the serving certificate and reports whether it can be
// used as it is.
func (ca *CA) loadServing(certPath, keyPath string, want SANs) (tls.Certificate, bool) {
	if CheckPrivate(keyPath) != nil {
		return tls.Certificate{}, false
	}
	certData, err := os.ReadFile(certPath)
	if err != nil {
		return tls.Certificate{}, false
	}
	keyData, err := os.ReadFile(keyPath)
	if err != nil {
		return tls.Certificate{}, false
	}
	c, err := tls.X509KeyPair(certData, keyData) // checks that they match
	if err != nil || len(c.Certificate) != 1 {
		return tls.Certificate{}, false
	}
	leaf, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		return tls.Certificate{}, false
	}
	c.Leaf = leaf
	now := ca.now()
	if leaf.NotAfter.Sub(now) < ServingRenewBefore {
		return tls.Certificate{}, false
	}
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots:       ca.Pool(),
		CurrentTime: now,
		KeyUsages:   []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}); err != nil {
		return tls.Certificate{}, false
	}
	return c, hasSANs(leaf, want)
}

// hasSANs reports whether c carries every SAN in want (normalized).
func hasSANs(c *x509.Certificate, want SANs) bool {
	have := make(map[string]bool)
	for _, n := range c.DNSNames {
		have[strings.ToLower(n)] = true
	}
	for _, n := range want.DNSNames {
		if !have[n] {
			return false
		}
	}
	haveIP := make(map[netip.Addr]bool)
	for _, ip := range c.IPAddresses {
		if a, ok := netip.AddrFromSlice(ip); ok {
			haveIP[a.Unmap()] = true
		}
	}
	for _, ip := range want.IPs {
		if !haveIP[ip] {
			return false
		}
	}
	return true
}

// issueServing issues a serving certificate for sans (normalized) with a new
// key and writes both files, the key first.
func (ca *CA) issueServing(certPath, keyPath string, sans SANs) (tls.Certificate, error) {
	key, keyPEM, err := newKey()
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := newSerial()
	if err != nil {
		return tls.Certificate{}, err
	}
	ips := make([]net.IP, len(sans.IPs))
	for i, ip := range sans.IPs {
		ips[i] = ip.AsSlice()
	}
	now := ca.now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			CommonName:   "trellis-server",
			Organization: []string{"trellis"},
		},
		DNSNames:              sans.DNSNames,
		IPAddresses:           ips,
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              ca.notAfter(now.Add(ServingLifetime)),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("sign: %w", err)
	}
	crtPEM := certPEM(der)
	if err := WriteFileAtomic(keyPath, keyPEM, 0o600); err != nil {
		return tls.Certificate{}, err
	}
	if err := WriteFileAtomic(certPath, crtPEM, 0o644); err != nil {
		return tls.Certificate{}, err
	}
	c, err := tls.X509KeyPair(crtPEM, keyPEM)
	if err != nil {
		return tls.Certificate{}, err
	}
	if c.Leaf == nil {
		c.Leaf, err = x509.ParseCertificate(der)
		if err != nil {
			return tls.Certificate{}, err
		}
	}
	return c, nil
}
