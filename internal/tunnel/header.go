package tunnel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"unicode/utf8"
)

// The stream header. The server opens a stream and writes a request for a
// port on the node's loopback:
//
//	magic 'T' (0x54) | version 1 | port (uint16, big endian)
//
// or, for another of the node's addresses (its kubelet on the node IP, a
// pod's address), version 2 with the address:
//
//	magic 'T' | version 2 | port (uint16) | family (4 or 6) | address (4 or 16 bytes)
//
// Version 1 is what agents before version 2 understand; a server sends it
// for loopback so that they keep working.
//
// The agent answers with a reply before any payload:
//
//	status (uint8) | message length (uint16, big endian) | message (UTF-8)
//
// A stream whose reply is not StatusOK is closed by the agent after the
// reply.
const (
	requestMagic = 'T'
	// requestLoopback and requestAddr are the versions of a request for
	// the loopback and for an address.
	requestLoopback = 1
	requestAddr     = 2
	requestLen      = 4 // magic, version, port
	// maxReplyMessage bounds the reply's message.
	maxReplyMessage = 1024
)

// Status is the agent's answer to a stream request.
type Status uint8

// Stream statuses.
const (
	// StatusOK: the port is allowed and the agent connected to it; the
	// stream now carries the connection.
	StatusOK Status = 0
	// StatusNotAllowed: the node does not let the tunnel reach this port
	// (see --tunnel-allow-port).
	StatusNotAllowed Status = 1
	// StatusUnreachable: the port is allowed but nothing accepted the
	// connection on the node's loopback.
	StatusUnreachable Status = 2
	// StatusBadRequest: the request header was malformed.
	StatusBadRequest Status = 3
)

func (s Status) String() string {
	switch s {
	case StatusOK:
		return "ok"
	case StatusNotAllowed:
		return "not allowed"
	case StatusUnreachable:
		return "unreachable"
	case StatusBadRequest:
		return "bad request"
	}
	return fmt.Sprintf("status %d", uint8(s))
}

// encodeRequest returns the request header for addr:port on the node;
// an invalid addr means the loopback.
func encodeRequest(addr netip.Addr, port int) ([]byte, error) {
	if port < 1 || port > 65535 {
		return nil, fmt.Errorf("port %d is out of range 1-65535", port)
	}
	addr = addr.Unmap()
	if !addr.IsValid() {
		b := []byte{requestMagic, requestLoopback, 0, 0}
		binary.BigEndian.PutUint16(b[2:], uint16(port))
		return b, nil
	}
	if addr.Zone() != "" {
		return nil, fmt.Errorf("address %s has a zone; only global addresses go through the tunnel", addr)
	}
	b := []byte{requestMagic, requestAddr, 0, 0, 4}
	binary.BigEndian.PutUint16(b[2:], uint16(port))
	if addr.Is6() {
		b[4] = 6
	}
	return append(b, addr.AsSlice()...), nil
}

// readRequest reads and parses a request header: the address (invalid
// for the loopback) and the port.
func readRequest(r io.Reader) (netip.Addr, int, error) {
	var b [requestLen]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return netip.Addr{}, 0, fmt.Errorf("read stream request: %w", err)
	}
	if b[0] != requestMagic {
		return netip.Addr{}, 0, fmt.Errorf("stream request starts with 0x%02x, want 0x%02x", b[0], requestMagic)
	}
	if b[1] != requestLoopback && b[1] != requestAddr {
		return netip.Addr{}, 0, fmt.Errorf("stream request version %d is not supported (want %d or %d): upgrade the older of server and agent", b[1], requestLoopback, requestAddr)
	}
	port := int(binary.BigEndian.Uint16(b[2:]))
	if port == 0 {
		return netip.Addr{}, 0, errors.New("stream request names port 0")
	}
	if b[1] == requestLoopback {
		return netip.Addr{}, port, nil
	}
	var fam [1]byte
	if _, err := io.ReadFull(r, fam[:]); err != nil {
		return netip.Addr{}, 0, fmt.Errorf("read stream request address: %w", err)
	}
	var n int
	switch fam[0] {
	case 4:
		n = 4
	case 6:
		n = 16
	default:
		return netip.Addr{}, 0, fmt.Errorf("stream request address family %d is not 4 or 6", fam[0])
	}
	raw := make([]byte, n)
	if _, err := io.ReadFull(r, raw); err != nil {
		return netip.Addr{}, 0, fmt.Errorf("read stream request address: %w", err)
	}
	addr, _ := netip.AddrFromSlice(raw)
	if addr.Is4In6() {
		return netip.Addr{}, 0, fmt.Errorf("stream request address %s is an IPv4-mapped IPv6 address; send it as IPv4", addr)
	}
	return addr, port, nil
}

// encodeReply returns a reply; msg is cut to maxReplyMessage bytes.
func encodeReply(s Status, msg string) []byte {
	if len(msg) > maxReplyMessage {
		msg = msg[:maxReplyMessage]
	}
	b := make([]byte, 3, 3+len(msg))
	b[0] = byte(s)
	binary.BigEndian.PutUint16(b[1:], uint16(len(msg)))
	return append(b, msg...)
}

// readReply reads a reply.
func readReply(r io.Reader) (Status, string, error) {
	var h [3]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, "", fmt.Errorf("read stream reply: %w", err)
	}
	n := int(binary.BigEndian.Uint16(h[1:]))
	if n > maxReplyMessage {
		return 0, "", fmt.Errorf("stream reply message is %d bytes, more than %d", n, maxReplyMessage)
	}
	msg := make([]byte, n)
	if _, err := io.ReadFull(r, msg); err != nil {
		return 0, "", fmt.Errorf("read stream reply: %w", err)
	}
	if !utf8.Valid(msg) {
		return 0, "", errors.New("stream reply message is not UTF-8")
	}
	s := Status(h[0])
	if s > StatusBadRequest {
		return 0, "", fmt.Errorf("stream reply has unknown status %d", h[0])
	}
	return s, string(msg), nil
}
