// Command tsctl is an offline Tailscale control server for the e2e tests:
// tailscale.com/tstest/integration/testcontrol behind HTTPS, with an
// embedded DERP relay and STUN responder, a required auth key, and route
// approval standing in for the ACL "autoApprovers" of a real tailnet.
//
// It serves, on the address of -listen:
//
//	https://ADDR:443   control protocol, DERP (/derp) and the admin API
//	http://ADDR:PORT   the same without DERP (for the tests' own calls)
//	udp ADDR:3478      STUN
//
// Admin API:
//
//	GET  /tsctl/healthz
//	GET  /tsctl/nodes                        JSON list of nodeInfo
//	POST /tsctl/approve?node=NAME&routes=A,B approve routes of node NAME
//
// Everything is kept in memory: a restart forgets every node.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"tailscale.com/derp/derpserver"
	"tailscale.com/net/stun"
	"tailscale.com/tailcfg"
	"tailscale.com/tstest/integration/testcontrol"
	"tailscale.com/types/key"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "tsctl:", err)
		os.Exit(1)
	}
}

func run() error {
	listen := flag.String("listen", "127.0.0.1:8080", "plain HTTP address (ip:port); HTTPS and STUN use the same IP")
	httpsPort := flag.Int("https-port", 443, "HTTPS port of the control URL and DERP")
	stunPort := flag.Int("stun-port", 3478, "STUN UDP port")
	caOut := flag.String("ca-out", "", "write the CA certificate (PEM) here; give tailscaled SSL_CERT_FILE=<it>")
	authKey := flag.String("authkey", "", "auth key every node must present (empty: none)")
	autoApprove := flag.String("auto-approve", "", "comma-separated prefixes: advertised routes inside them are approved at once")
	flag.Parse()

	host, _, err := net.SplitHostPort(*listen)
	if err != nil {
		return fmt.Errorf("-listen %q: %w", *listen, err)
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return fmt.Errorf("-listen %q: the host must be an IP address", *listen)
	}
	auto, err := parsePrefixes(*autoApprove)
	if err != nil {
		return fmt.Errorf("-auto-approve: %w", err)
	}
	logger := log.New(os.Stderr, "", log.LstdFlags|log.Lmicroseconds)
	logf := logger.Printf
	baseURL := "https://" + net.JoinHostPort(host, strconv.Itoa(*httpsPort))

	ctl := &testcontrol.Server{
		Logf:             func(f string, a ...any) { logf("control: "+f, a...) },
		RequireAuthKey:   *authKey,
		AllNodesSameUser: true,
		AllOnline:        true,
		ExplicitBaseURL:  baseURL,
	}
	d := derpserver.New(key.NewNode(), logf)
	ctl.DERPMap = derpMap(ip, *httpsPort, *stunPort)

	ap := &approver{ctl: ctl, auto: auto, manual: map[key.NodePublic][]netip.Prefix{}, applied: map[key.NodePublic]string{}}
	kick := make(chan struct{}, 1)
	// The hook runs with testcontrol's lock held: only signal here.
	ctl.SetOnMapRequest(func(key.NodePublic) {
		select {
		case kick <- struct{}{}:
		default:
		}
	})
	// testcontrol creates its keys lazily in the /key handler, but /ts2021
	// uses them without it: create them before the first client.
	ctl.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/key?v=1", nil))

	mux := http.NewServeMux()
	// testcontrol panics on paths it does not serve: forward only these.
	for _, p := range []string{"/key", "/ts2021", "/machine/", "/generate_204", "/c2n/"} {
		mux.Handle(p, ctl)
	}
	mux.HandleFunc("/tsctl/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/tsctl/nodes", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(ap.nodes())
	})
	mux.HandleFunc("POST /tsctl/approve", func(w http.ResponseWriter, r *http.Request) {
		if err := ap.approve(r.FormValue("node"), r.FormValue("routes")); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		ap.reconcile(logf)
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/", http.NotFound)

	tlsConf, err := serverTLS(ip, *caOut)
	if err != nil {
		return err
	}
	tmux := http.NewServeMux()
	tmux.Handle("/derp", derpserver.Handler(d))
	tmux.HandleFunc("/derp/probe", derpserver.ProbeHandler)
	tmux.HandleFunc("/derp/latency-check", derpserver.ProbeHandler)
	tmux.Handle("/", mux)

	tln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(*httpsPort)))
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	pc, err := net.ListenPacket("udp4", net.JoinHostPort(host, strconv.Itoa(*stunPort)))
	if err != nil {
		return fmt.Errorf("STUN: %w", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 3)
	https := &http.Server{
		Handler:   tmux,
		TLSConfig: tlsConf,
		ErrorLog:  log.New(os.Stderr, "https: ", log.LstdFlags),
		// DERP and ts2021 upgrade HTTP/1.1 connections: no HTTP/2.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	plain := &http.Server{Handler: mux}
	go func() { errc <- https.ServeTLS(tln, "", "") }()
	go func() { errc <- plain.Serve(ln) }()
	go serveSTUN(pc)
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-kick:
				time.Sleep(50 * time.Millisecond) // let testcontrol store the new Hostinfo
			case <-t.C:
			}
			ap.reconcile(logf)
		}
	}()
	logf("tsctl: control %s, admin http://%s, authkey required=%v, auto-approve=%v", baseURL, ln.Addr(), *authKey != "", auto)

	select {
	case <-ctx.Done():
		logf("tsctl: exiting")
	case err = <-errc:
	}
	_ = https.Close()
	_ = plain.Close()
	_ = pc.Close()
	return err
}

func parsePrefixes(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return nil, err
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// derpMap is a one-region DERP map pointing at this server.
func derpMap(ip netip.Addr, httpsPort, stunPort int) *tailcfg.DERPMap {
	return &tailcfg.DERPMap{
		OmitDefaultRegions: true,
		Regions: map[int]*tailcfg.DERPRegion{
			900: {
				RegionID:   900,
				RegionCode: "lab",
				RegionName: "e2e lab",
				Nodes: []*tailcfg.DERPNode{{
					Name:             "900a",
					RegionID:         900,
					HostName:         ip.String(),
					IPv4:             ip.String(),
					IPv6:             "none",
					STUNPort:         stunPort,
					DERPPort:         httpsPort,
					InsecureForTests: true,
				}},
			},
		},
	}
}

// serverTLS makes a throwaway CA (written to caOut) and a certificate for
// ip signed by it.
func serverTLS(ip netip.Addr, caOut string) (*tls.Config, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "tsctl e2e CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(30 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	if caOut != "" {
		if err := os.WriteFile(caOut, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644); err != nil {
			return nil, fmt.Errorf("write CA: %w", err)
		}
	}
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: ip.String()},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(30 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{ip.AsSlice()},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, caCert, &leafKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("create server certificate: %w", err)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{leafDER, caDER}, PrivateKey: leafKey}},
		NextProtos:   []string{"http/1.1"},
	}, nil
}

func serveSTUN(pc net.PacketConn) {
	buf := make([]byte, 64<<10)
	for {
		n, addr, err := pc.ReadFrom(buf)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		ua, ok := addr.(*net.UDPAddr)
		if err != nil || !ok || !stun.Is(buf[:n]) {
			continue
		}
		txid, err := stun.ParseBindingRequest(buf[:n])
		if err != nil {
			continue
		}
		_, _ = pc.WriteTo(stun.Response(txid, ua.AddrPort()), addr)
	}
}

// approver turns advertised routes (Hostinfo.RoutableIPs) into approved
// ones: those inside an auto-approved prefix, and those approved by hand.
type approver struct {
	ctl  *testcontrol.Server
	auto []netip.Prefix

	mu      sync.Mutex
	manual  map[key.NodePublic][]netip.Prefix // guarded by mu
	applied map[key.NodePublic]string         // guarded by mu; last routes set, as text
}

func covers(outer, inner netip.Prefix) bool {
	return outer.Addr().Is4() == inner.Addr().Is4() && outer.Bits() <= inner.Bits() && outer.Contains(inner.Addr())
}

func (a *approver) reconcile(logf func(string, ...any)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, n := range a.ctl.AllNodes() {
		if !n.Hostinfo.Valid() {
			continue
		}
		var ok []netip.Prefix
		for _, p := range n.Hostinfo.RoutableIPs().All() {
			if slices.ContainsFunc(a.auto, func(q netip.Prefix) bool { return covers(q, p) }) || slices.Contains(a.manual[n.Key], p) {
				ok = append(ok, p)
			}
		}
		if s := fmt.Sprint(ok); a.applied[n.Key] != s {
			a.applied[n.Key] = s
			logf("tsctl: node %q: approved routes %v", n.Hostinfo.Hostname(), ok)
			a.ctl.SetSubnetRoutes(n.Key, ok)
		}
	}
}

func (a *approver) approve(name, routes string) error {
	ps, err := parsePrefixes(routes)
	if err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, n := range a.ctl.AllNodes() {
		if n.Hostinfo.Valid() && n.Hostinfo.Hostname() == name {
			a.manual[n.Key] = ps
			return nil
		}
	}
	return fmt.Errorf("no node with host name %q", name)
}

// nodeInfo is one node as GET /tsctl/nodes lists it.
type nodeInfo struct {
	Name       string         `json:"name"`
	Addresses  []netip.Prefix `json:"addresses"`
	Advertised []netip.Prefix `json:"advertised"` // Hostinfo.RoutableIPs
	Approved   []netip.Prefix `json:"approved"`   // primary routes served to peers
}

func (a *approver) nodes() []nodeInfo {
	out := []nodeInfo{}
	for _, n := range a.ctl.AllNodes() {
		ni := nodeInfo{Addresses: n.Addresses}
		if n.Hostinfo.Valid() {
			ni.Name = n.Hostinfo.Hostname()
			ni.Advertised = n.Hostinfo.RoutableIPs().AsSlice()
		}
		if mr, err := a.ctl.MapResponse(&tailcfg.MapRequest{NodeKey: n.Key}); err == nil && mr != nil && mr.Node != nil {
			ni.Approved = mr.Node.PrimaryRoutes
		}
		out = append(out, ni)
	}
	return out
}
