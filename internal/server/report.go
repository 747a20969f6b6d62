package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/netmap"
	"github.com/trellis-mesh/trellis/internal/store"
)

const (
	maxReportBody        = 1 << 20
	maxObservations      = 10000
	maxAddressesInReport = 64
)

// validateReport checks a node's report about itself: addresses must be
// usable endpoints, observations must name nodes, once each.
func validateReport(self string, rep *api.Report, known func(string) bool) error {
	if len(rep.InternalIPs)+len(rep.ExternalIPs)+len(rep.Networks) > maxAddressesInReport {
		return errors.New("too many addresses")
	}
	for _, a := range rep.ExternalIPs {
		if !netmap.ValidEndpoint(a) {
			return fmt.Errorf("external IP %s cannot be reached from other hosts (loopback, link-local, multicast or unspecified)", a)
		}
	}
	for _, a := range rep.InternalIPs {
		if !netmap.ValidEndpoint(a) {
			return fmt.Errorf("node IP %s cannot be reached from other hosts (loopback, link-local, multicast or unspecified)", a)
		}
	}
	for _, p := range rep.Networks {
		if !p.IsValid() || p.Bits() == 0 {
			return fmt.Errorf("network %s is not a valid subnet", p)
		}
	}
	if err := validateVPNStatus(rep.VPN); err != nil {
		return err
	}
	if len(rep.Observations) > maxObservations {
		return errors.New("too many observations")
	}
	seen := map[string]bool{}
	for _, o := range rep.Observations {
		if o.Peer == self || seen[o.Peer] || !known(o.Peer) {
			return fmt.Errorf("observation of %q: not a peer of this node, or listed twice", o.Peer)
		}
		seen[o.Peer] = true
		if o.Endpoint.IsValid() && !netmap.ValidEndpoint(o.Endpoint.Addr()) {
			return fmt.Errorf("observation of %q: endpoint %s cannot be reached from other hosts", o.Peer, o.Endpoint)
		}
		switch o.Handshake {
		case "", api.HandshakeOK, api.HandshakeFailing:
		default:
			return fmt.Errorf("observation of %q: handshake %q is not one of ok, failing", o.Peer, o.Handshake)
		}
	}
	return nil
}

// handleReport stores what a node says about itself: its addresses (which
// change with DHCP or a VM restart) and what it sees of its peers. A node
// can only write its own record, and only these fields.
func (s *Server) handleReport(w http.ResponseWriter, r *http.Request) {
	name, ok := s.nodeAuth(w, r)
	if !ok {
		return
	}
	var rep api.Report
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxReportBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rep); err != nil {
		writeError(w, http.StatusBadRequest, api.ErrCodeBadRequest, "malformed report: "+err.Error())
		return
	}
	known := func(peer string) bool { _, ok := s.hub.record(peer); return ok }
	if err := validateReport(name, &rep, known); err != nil {
		writeError(w, http.StatusBadRequest, api.ErrCodeBadRequest, err.Error())
		return
	}
	slices.SortFunc(rep.Observations, func(a, b api.Observation) int { return strings.Compare(a.Peer, b.Peer) })
	src := remoteIP(r)
	changed, err := s.reg.update(r.Context(), name, func(rec *record) bool {
		before, _ := json.Marshal(rec.Node)
		rec.InternalIPs = rep.InternalIPs
		rec.Networks = maskAll(rep.Networks)
		rec.ExternalIPs = rep.ExternalIPs
		rec.Observations = rep.Observations
		rec.VPN = rep.VPN
		if src.IsValid() && !src.IsLoopback() {
			rec.ObservedIP = src
		}
		after, _ := json.Marshal(rec.Node)
		return string(before) != string(after)
	})
	switch {
	case errors.Is(err, store.ErrNotFound):
		writeError(w, http.StatusForbidden, api.ErrCodeNodeDeleted, fmt.Sprintf("node %q was deleted from the cluster", name))
		return
	case err != nil:
		writeError(w, http.StatusServiceUnavailable, api.ErrCodeInternal, "the server could not store the report: "+err.Error())
		return
	}
	if changed {
		s.log.Debug("node report stored", "node", name, "observations", len(rep.Observations))
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handlePaths(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, s.hub.paths())
}
