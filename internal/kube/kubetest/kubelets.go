package kubetest

import (
	"crypto/x509/pkix"
	"encoding/base64"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
)

// What a real kubelet needs from the control plane (see Options.Kubelets).

// NodeKubeconfig writes a kubeconfig with the credentials of node name's
// kubelet (as NodeClient) and returns its path.
func (e *Env) NodeKubeconfig(t testing.TB, name string) string {
	t.Helper()
	cert, key, err := e.ca.issue(pkix.Name{CommonName: "system:node:" + name, Organization: []string{"system:nodes"}}, false, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return e.writeKubeconfig("node-"+name, fmt.Sprintf("client-certificate-data: %s\n    client-key-data: %s",
		base64.StdEncoding.EncodeToString(cert), base64.StdEncoding.EncodeToString(key)))
}

// ServingCert writes a serving certificate signed by the CA for the DNS
// names and IPs, and its key, into dir; it returns their paths.
func (e *Env) ServingCert(t testing.TB, dir, name string, dns []string, ips []netip.Addr) (certFile, keyFile string) {
	t.Helper()
	var nips []net.IP
	for _, ip := range ips {
		nips = append(nips, ip.AsSlice())
	}
	cert, key, err := e.ca.issue(pkix.Name{CommonName: name}, true, dns, nips)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	must(t, os.WriteFile(certFile, cert, 0o644))
	must(t, os.WriteFile(keyFile, key, 0o600))
	return certFile, keyFile
}
