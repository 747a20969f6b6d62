package server

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	"github.com/trellis-mesh/trellis/internal/api"
)

// netmapDigests identify a netmap's content apart from its version, so
// that a stream keeps 32 bytes, not the map (N maps of N peers would be
// O(N²) memory).
type netmapDigests struct {
	// whole covers everything after the version: a stream of whole
	// netmaps skips a map whose digest it sent last.
	whole [sha256.Size]byte
	// content covers self, the cluster CIDRs and the peers, not the
	// server list that every delta carries anyway: api.NetMap.Digest, the
	// digest an agent resuming its stream on any server sends.
	content [sha256.Size]byte
}

// digestKinds says which of netmapDigests to compute: each hashes most of
// the line (a megabyte at 5000 peers), so only what a stream compares.
type digestKinds uint8

const (
	digestWhole digestKinds = 1 << iota
	digestContent
	digestBoth = digestWhole | digestContent
)

// encodeNetMap encodes nm once for both the line and the digests want
// names (the others are left zero: a stream of deltas that does not
// resume needs none). The peers, most of a netmap's bytes, are written by
// appendPeer, about three times faster than encoding/json and byte for
// byte the same.
func encodeNetMap(nm api.NetMap, want digestKinds) ([]byte, netmapDigests, error) {
	var ds netmapDigests
	version, peers := nm.Version, nm.Peers
	nm.Version, nm.Peers = 0, []api.Peer{}
	frame, err := json.Marshal(nm)
	if err != nil {
		return nil, ds, err
	}
	const zero, slot = `{"version":0,`, `"peers":[]`
	i := bytes.Index(frame, []byte(slot))
	if !bytes.HasPrefix(frame, []byte(zero)) || i < 0 {
		return nil, ds, errors.New("netmap encoding does not start with its version or has no peers")
	}
	line := make([]byte, 0, len(frame)+len(peers)*200+24)
	line = fmt.Appendf(line, `{"version":%d,`, version)
	afterVersion := len(line) - 1 // the comma
	line = append(line, frame[len(zero):i+len(slot)-1]...)
	for k, p := range peers {
		if k > 0 {
			line = append(line, ',')
		}
		line = appendPeer(line, p)
	}
	peersEnd := len(line) + 1 // after the list's ']'
	line = append(line, frame[i+len(slot)-1:]...)
	if want&digestWhole != 0 {
		ds.whole = sha256.Sum256(line[afterVersion:])
	}
	if want&digestContent != 0 {
		ds.content = sha256.Sum256(line[afterVersion:peersEnd])
	}
	return append(line, '\n'), ds, nil
}

// appendPeer appends p as encoding/json would encode it.
func appendPeer(b []byte, p api.Peer) []byte {
	b = append(b, `{"name":`...)
	b = appendString(b, p.Name)
	b = append(b, `,"publicKey":"`...)
	b = base64.StdEncoding.AppendEncode(b, p.PublicKey[:])
	b = append(b, '"')
	if p.Endpoint.IsValid() {
		b = append(b, `,"endpoint":"`...)
		b = p.Endpoint.AppendTo(b)
		b = append(b, '"')
	}
	b = append(b, `,"allowedIPs":`...)
	if p.AllowedIPs == nil {
		b = append(b, "null"...)
	} else {
		b = append(b, '[')
		for i, q := range p.AllowedIPs {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, '"')
			b = q.AppendTo(b)
			b = append(b, '"')
		}
		b = append(b, ']')
	}
	if p.PersistentKeepalive != 0 {
		b = append(b, `,"persistentKeepalive":`...)
		b = strconv.AppendInt(b, int64(p.PersistentKeepalive), 10)
	}
	if p.Via != "" {
		b = append(b, `,"via":`...)
		b = appendString(b, p.Via)
	}
	if p.Reason != "" {
		b = append(b, `,"reason":`...)
		b = appendString(b, p.Reason)
	}
	return append(b, '}')
}

// appendString appends s as a JSON string the way encoding/json does:
// plain printable ASCII directly, anything else through encoding/json.
func appendString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x20 || c > 0x7e || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			q, _ := json.Marshal(s)
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}
