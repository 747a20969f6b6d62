//go:build e2e

package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// defaultHeadscaleVersion is the headscale the tests run unless
// TRELLIS_HEADSCALE_VERSIONS names others.
const defaultHeadscaleVersion = "v0.27.1"

// headscaleVersions are the headscale versions to test:
// TRELLIS_HEADSCALE_VERSIONS (space separated), default
// defaultHeadscaleVersion.
func headscaleVersions() []string {
	if v := strings.Fields(os.Getenv("TRELLIS_HEADSCALE_VERSIONS")); len(v) > 0 {
		return v
	}
	return []string{defaultHeadscaleVersion}
}

// headscaleBinary returns the headscale binary of version, which
// scripts/build-headscale.sh built into
// $TRELLIS_HEADSCALE_DIR/headscale-<version>/headscale (default root
// ~/.cache/trellis-e2e). Without it the test skips, or fails with
// TRELLIS_REQUIRE_HEADSCALE=1 (as CI sets it).
func headscaleBinary(t testing.TB, version string) string {
	t.Helper()
	root := os.Getenv("TRELLIS_HEADSCALE_DIR")
	if root == "" {
		cache := os.Getenv("XDG_CACHE_HOME")
		if cache == "" {
			home, _ := os.UserHomeDir()
			cache = filepath.Join(home, ".cache")
		}
		root = filepath.Join(cache, "trellis-e2e")
	}
	bin := filepath.Join(root, "headscale-"+version, "headscale")
	if fi, err := os.Stat(bin); err != nil || fi.Mode()&0o111 == 0 {
		msg := fmt.Sprintf("no headscale %s at %s: build it with HEADSCALE_VERSIONS=%s scripts/build-headscale.sh (about 7 minutes cold)", version, bin, version)
		if os.Getenv("TRELLIS_REQUIRE_HEADSCALE") == "1" {
			t.Fatal(msg + " (TRELLIS_REQUIRE_HEADSCALE=1)")
		}
		t.Skip(msg)
	}
	return bin
}

// hsUser is the headscale user the tests' nodes log in as, and
// hsUserEmail its e-mail (the seed's policy names users by e-mail).
const (
	hsUser      = "trellis"
	hsUserEmail = "trellis@example.com"
)

// seedPolicy is the tailnet policy of the seed page for a dual-stack
// cluster: autoApprovers only (no "acls" key: headscale then allows all
// traffic), each CIDR approved for approver (a JSON string, e.g.
// `"trellis@example.com"`). acls, when not empty, is put in as it is
// (e.g. `"acls": [],`), and so is extra (e.g. a tagOwners stanza).
func seedPolicy(approver, acls, extra string) string {
	return fmt.Sprintf(`// Trellis e2e policy (HuJSON), the seed page's stanza
{
  %s
  %s
  "autoApprovers": {
    "routes": {
      %q: [%s],
      %q: [%s],
    },
  },
}
`, extra, acls, clusterCIDR, approver, hsClusterCIDR6, approver)
}

// hsClusterCIDR6 is the seed page's IPv6 cluster CIDR.
const hsClusterCIDR6 = "2001:cafe:42::/56"

// Headscale is a real headscale control server on a machine of its own in a
// lab: HTTPS on port 443 with a certificate of a CA of the test, its
// embedded DERP server and STUN, sqlite, a policy file. It is a Tailnet
// whose control server is headscale: Tailnet.Start, overTailnet and the
// TSNode methods work as with tsctl; Nodes and Approve do not (use Routes
// and the CLI).
type Headscale struct {
	*Tailnet
	Version string
	bin     string
	dir     string
	config  string
	policy  string // path of the policy file
	Proc    *Proc
}

// NewHeadscale starts headscale version on a new machine named "headscale"
// with public address ctlCIDR and the given policy (HuJSON), creates the
// user hsUser and a reusable pre-auth key for it (the Tailnet's AuthKey).
func (l *Lab) NewHeadscale(version, ctlCIDR, policy string) *Headscale {
	l.t.Helper()
	bin := headscaleBinary(l.t, version)
	ts := tailscaleDir(l.t)
	ctl := l.Machine("headscale", ctlCIDR, nil, "")
	dir := l.TempDir("headscale")
	ip := ctl.PublicIP
	hs := &Headscale{
		Tailnet: &Tailnet{
			lab: l, bin: ts, Ctl: ctl,
			URL:    "https://" + ip.String() + ":443",
			ca:     filepath.Join(dir, "ca.pem"),
			byNode: map[*Node]*TSNode{},
		},
		Version: version,
		bin:     bin,
		dir:     dir,
		config:  filepath.Join(dir, "config.yaml"),
		policy:  filepath.Join(dir, "policy.hujson"),
	}
	if err := writeTLS(dir, ip); err != nil {
		l.t.Fatal(err)
	}
	if err := os.WriteFile(hs.policy, []byte(policy), 0o644); err != nil {
		l.t.Fatal(err)
	}
	if err := os.WriteFile(hs.config, []byte(headscaleConfig(dir, ip)), 0o644); err != nil {
		l.t.Fatal(err)
	}
	start := time.Now()
	hs.Proc = ctl.Start(bin, "-c", hs.config, "serve")
	hs.ctlProc = hs.Proc
	hs.waitReady()
	l.t.Logf("headscale %s answers %.2fs after its start", version, time.Since(start).Seconds())
	if _, err := hs.CLI("users", "create", hsUser, "--email", hsUserEmail); err != nil {
		l.t.Fatal(err)
	}
	key, err := hs.NewKey()
	if err != nil {
		l.t.Fatal(err)
	}
	hs.AuthKey = key
	return hs
}

// waitReady waits until headscale serves its CLI (the unix socket) and its
// HTTPS port.
func (hs *Headscale) waitReady() {
	l := hs.lab
	l.t.Helper()
	WaitFor(l.t, defaultTimeout, "headscale to answer", func() error {
		if err := hs.Proc.Err(); err != nil {
			return err
		}
		if _, err := hs.CLI("users", "list"); err != nil {
			return err
		}
		_, err := l.Exec(hs.Ctl.NS, "bash", "-c", "exec 3<>/dev/tcp/"+hs.Ctl.PublicIP.String()+"/443")
		return err
	})
}

// headscaleConfig is a headscale configuration that needs nothing from
// outside the lab: no Tailscale DERP map, no update check, no DNS.
func headscaleConfig(dir string, ip netip.Addr) string {
	return fmt.Sprintf(`# headscale for the Trellis e2e tests: fully offline
server_url: https://%[2]s:443
listen_addr: %[2]s:443
metrics_listen_addr: 127.0.0.1:9090
grpc_listen_addr: 127.0.0.1:50443
grpc_allow_insecure: false
tls_cert_path: %[1]s/server.pem
tls_key_path: %[1]s/server.key
noise:
  private_key_path: %[1]s/noise_private.key
prefixes:
  v4: 100.64.0.0/10
  v6: fd7a:115c:a1e0::/48
  allocation: sequential
derp:
  server:
    enabled: true
    region_id: 999
    region_code: headscale
    region_name: Headscale Embedded DERP
    verify_clients: true
    stun_listen_addr: %[2]s:3478
    private_key_path: %[1]s/derp_server_private.key
    automatically_add_embedded_derp_region: true
    # without these a node with a global IPv6 address (a dual-stack pod
    # CIDR) waits 3 s for a v6 STUN probe that cannot work
    ipv4: %[2]s
    ipv6: none
  urls: []
  paths: []
  auto_update_enabled: false
  update_frequency: 3h
disable_check_updates: true
ephemeral_node_inactivity_timeout: 30m
database:
  type: sqlite
  sqlite:
    path: %[1]s/db.sqlite
    write_ahead_log: true
log:
  level: info
  format: text
policy:
  mode: file
  path: %[1]s/policy.hujson
dns:
  magic_dns: false
  base_domain: ""
  override_local_dns: false
  nameservers:
    global: []
    split: {}
  search_domains: []
unix_socket: %[1]s/headscale.sock
unix_socket_permission: "0770"
logtail:
  enabled: false
randomize_client_port: false
`, dir, ip)
}

// writeTLS writes a CA (ca.pem) and a server certificate for ip
// (server.pem, server.key) into dir. tailscaled dials the control URL and
// the embedded DERP server at the bare IP: the certificate needs an IP SAN.
func writeTLS(dir string, ip netip.Addr) error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "trellis e2e headscale CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("headscale CA: %w", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: ip.String()},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{ip.AsSlice()}, DNSNames: []string{"headscale.test"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("headscale server certificate: %w", err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	for name, blk := range map[string]*pem.Block{
		"ca.pem":     {Type: "CERTIFICATE", Bytes: caDER},
		"server.pem": {Type: "CERTIFICATE", Bytes: der},
		"server.key": {Type: "EC PRIVATE KEY", Bytes: keyDER},
	} {
		if err := os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(blk), 0o600); err != nil {
			return err
		}
	}
	return nil
}

// CLI runs the headscale command (over its unix socket: no API key) and
// returns its standard output.
func (hs *Headscale) CLI(args ...string) (string, error) {
	return hs.lab.Output(hs.Ctl.NS, append([]string{hs.bin, "-c", hs.config, "--force"}, args...)...)
}

// userID returns the ID of headscale user name.
func (hs *Headscale) userID(name string) (string, error) {
	out, err := hs.CLI("users", "list", "-o", "json")
	if err != nil {
		return "", err
	}
	var users []struct {
		ID   json.Number `json:"id"`
		Name string      `json:"name"`
	}
	if err := json.Unmarshal([]byte(out), &users); err != nil {
		return "", fmt.Errorf("headscale users list -o json: %w: %q", err, out)
	}
	for _, u := range users {
		if u.Name == name {
			return u.ID.String(), nil
		}
	}
	return "", fmt.Errorf("headscale has no user %q: %s", name, out)
}

// NewKey creates a reusable pre-auth key of hsUser, with tags if given
// (e.g. "tag:trellis"), and returns it.
func (hs *Headscale) NewKey(tags ...string) (string, error) {
	id, err := hs.userID(hsUser)
	if err != nil {
		return "", err
	}
	args := []string{"preauthkeys", "create", "--user", id, "--reusable", "--expiration", "2h", "-o", "json"}
	if len(tags) > 0 {
		args = append(args, "--tags", strings.Join(tags, ","))
	}
	out, err := hs.CLI(args...)
	if err != nil {
		return "", err
	}
	var k struct {
		Key string `json:"key"`
	}
	if err := json.Unmarshal([]byte(out), &k); err != nil || k.Key == "" {
		return "", fmt.Errorf("headscale preauthkeys create: no key in %q (%v)", out, err)
	}
	return k.Key, nil
}

// HSRoutes are a node's routes as headscale lists them.
type HSRoutes struct {
	Available []netip.Prefix
	Approved  []netip.Prefix
	Serving   []netip.Prefix
}

// Routes returns the routes of each node headscale knows, by host name
// (`headscale nodes list-routes -o json`).
func (hs *Headscale) Routes() (map[string]HSRoutes, error) {
	out, err := hs.CLI("nodes", "list-routes", "-o", "json")
	if err != nil {
		return nil, err
	}
	var list []struct {
		GivenName string   `json:"given_name"`
		Available []string `json:"available_routes"`
		Approved  []string `json:"approved_routes"`
		Serving   []string `json:"subnet_routes"`
	}
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		return nil, fmt.Errorf("headscale nodes list-routes -o json: %w: %q", err, out)
	}
	parse := func(ss []string) ([]netip.Prefix, error) {
		var ps []netip.Prefix
		for _, s := range ss {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				return nil, fmt.Errorf("headscale nodes list-routes: %w", err)
			}
			ps = append(ps, p)
		}
		slices.SortFunc(ps, comparePrefixes)
		return ps, nil
	}
	m := map[string]HSRoutes{}
	for _, n := range list {
		var r HSRoutes
		if r.Available, err = parse(n.Available); err != nil {
			return nil, err
		}
		if r.Approved, err = parse(n.Approved); err != nil {
			return nil, err
		}
		if r.Serving, err = parse(n.Serving); err != nil {
			return nil, err
		}
		m[n.GivenName] = r
	}
	return m, nil
}

func comparePrefixes(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

// SetPolicy replaces the policy file and makes headscale read it again
// (SIGHUP).
func (hs *Headscale) SetPolicy(policy string) error {
	if err := os.WriteFile(hs.policy, []byte(policy), 0o644); err != nil {
		return err
	}
	return syscall.Kill(hs.Proc.Pid(), syscall.SIGHUP)
}

// Restart stops headscale and starts it again on the same state, and waits
// until it answers.
func (hs *Headscale) Restart() error {
	if err := hs.Proc.Restart(); err != nil {
		return err
	}
	hs.waitReady()
	return nil
}
