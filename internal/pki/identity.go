package pki

import (
	"crypto/x509"
	"fmt"
	"slices"
	"strings"
)

// Organizations (subject O) of the client certificates the server issues.
// They say what kind of client a certificate identifies.
const (
	// OrgNodes is the organization of node certificates, whose common
	// name is NodeCommonName(name).
	OrgNodes = "trellis:nodes"
	// OrgAdmins is the organization of administrator certificates, whose
	// common name is the administrator's name.
	OrgAdmins = "trellis:admins"
	// OrgEgress is the organization of egress certificates: a Kubernetes
	// API server that reaches kubelets and pods through the tunnels (HTTP
	// CONNECT) and can do nothing else. The common name names the client.
	OrgEgress = "trellis:egress"
)

// NodeCommonNamePrefix starts the common name of a node certificate.
const NodeCommonNamePrefix = "node:"

// NodeCommonName returns the common name of the certificate of the node
// called name.
func NodeCommonName(name string) string {
	return NodeCommonNamePrefix + name
}

// IdentityKind says what kind of client an Identity is. The zero value is
// no kind at all.
type IdentityKind uint8

// Kinds of identity.
const (
	// KindNode is a node (agent or server), identified by its node name.
	KindNode IdentityKind = iota + 1
	// KindAdmin is an administrator.
	KindAdmin
	// KindEgress is an API server's egress: it may CONNECT to kubelets
	// and pods through the tunnels, nothing else.
	KindEgress
)

// String returns "node" or "admin".
func (k IdentityKind) String() string {
	switch k {
	case KindNode:
		return "node"
	case KindAdmin:
		return "admin"
	case KindEgress:
		return "egress"
	default:
		return fmt.Sprintf("IdentityKind(%d)", uint8(k))
	}
}

// Identity is who a client certificate identifies.
type Identity struct {
	Kind IdentityKind
	// Name is the node name (without NodeCommonNamePrefix) or the
	// administrator's name.
	Name string
}

// IdentityFromCert returns the identity of a client certificate, and false
// if c identifies nobody: it must have exactly one organization, OrgNodes
// with a common name NodeCommonName(name) for a non-empty name, or OrgAdmins
// or OrgEgress with a non-empty common name; and it must allow client
// authentication.
//
// IdentityFromCert does not verify c: pass only a certificate from a verified
// chain (tls.ConnectionState.VerifiedChains[0][0] of a server that requires
// and verifies client certificates against the CA's Pool).
func IdentityFromCert(c *x509.Certificate) (Identity, bool) {
	if c == nil || len(c.Subject.Organization) != 1 || !slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		return Identity{}, false
	}
	cn := c.Subject.CommonName
	switch c.Subject.Organization[0] {
	case OrgNodes:
		name, ok := strings.CutPrefix(cn, NodeCommonNamePrefix)
		if !ok || name == "" {
			return Identity{}, false
		}
		return Identity{Kind: KindNode, Name: name}, true
	case OrgAdmins:
		if cn == "" {
			return Identity{}, false
		}
		return Identity{Kind: KindAdmin, Name: cn}, true
	case OrgEgress:
		if cn == "" {
			return Identity{}, false
		}
		return Identity{Kind: KindEgress, Name: cn}, true
	}
	return Identity{}, false
}
