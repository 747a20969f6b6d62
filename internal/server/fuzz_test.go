package server

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"testing"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/netmap"
)

func FuzzJoinRequest(f *testing.F) {
	f.Add([]byte(`{"nodeName":"a","nodePassword":"0123456789abcdef","publicKey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","csr":"AA==","listenPort":51820,"externalIPs":["203.0.113.1"],"networks":["10.0.0.0/24"]}`))
	f.Add([]byte(`{"nodeName":"","externalIPs":["127.0.0.1"]}`))
	f.Add([]byte(`{"internalIPs":["::ffff:127.0.0.1"],"networks":["0.0.0.0/0"]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var req api.JoinRequest
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields()
		if dec.Decode(&req) != nil {
			return
		}
		if validateJoin(&req) != nil {
			return
		}
		// Whatever passes must be safe to store and to hand to peers.
		for _, a := range append(append([]netip.Addr{}, req.ExternalIPs...), req.InternalIPs...) {
			if !netmap.ValidEndpoint(a) {
				t.Fatalf("accepted external IP %v", a)
			}
		}
		if err := ValidateNodeName(req.NodeName); err != nil {
			t.Fatalf("accepted node name %q", req.NodeName)
		}
	})
}

func FuzzReport(f *testing.F) {
	f.Add([]byte(`{"internalIPs":["10.0.0.1"],"observations":[{"peer":"b","endpoint":"203.0.113.1:51820","handshake":"ok"}]}`))
	f.Add([]byte(`{"observations":[{"peer":"a"},{"peer":"a"}]}`))
	f.Add([]byte(`{"externalIPs":["fe80::1"]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var rep api.Report
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields()
		if dec.Decode(&rep) != nil {
			return
		}
		known := func(p string) bool { return p == "b" || p == "c" }
		if validateReport("a", &rep, known) != nil {
			return
		}
		seen := map[string]bool{}
		for _, o := range rep.Observations {
			if o.Peer == "a" || !known(o.Peer) || seen[o.Peer] {
				t.Fatalf("accepted observation of %q", o.Peer)
			}
			seen[o.Peer] = true
			if o.Endpoint.IsValid() && !netmap.ValidEndpoint(o.Endpoint.Addr()) {
				t.Fatalf("accepted observed endpoint %v", o.Endpoint)
			}
		}
	})
}
