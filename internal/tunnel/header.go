package tunnel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"
)

// The stream header. The server opens a stream and writes a request:
//
//	magic 'T' (0x54) | version 1 | port (uint16, big endian)
//
// The agent answers with a reply before any payload:
//
//	status (uint8) | message length (uint16, big endian) | message (UTF-8)
//
// A stream whose reply is not StatusOK is closed by the agent after the
// reply.
const (
	requestMagic   = 'T'
	requestVersion = 1
	requestLen     = 4
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

// encodeRequest returns the request header for port.
func encodeRequest(port int) ([]byte, error) {
	if port < 1 || port > 65535 {
		return nil, fmt.Errorf("port %d is out of range 1-65535", port)
	}
	b := []byte{requestMagic, requestVersion, 0, 0}
	binary.BigEndian.PutUint16(b[2:], uint16(port))
	return b, nil
}

// parseRequest parses a request header.
func parseRequest(b []byte) (int, error) {
	if len(b) != requestLen {
		return 0, fmt.Errorf("stream request is %d bytes, want %d", len(b), requestLen)
	}
	if b[0] != requestMagic {
		return 0, fmt.Errorf("stream request starts with 0x%02x, want 0x%02x", b[0], requestMagic)
	}
	if b[1] != requestVersion {
		return 0, fmt.Errorf("stream request version %d is not supported (want %d): upgrade the older of server and agent", b[1], requestVersion)
	}
	port := int(binary.BigEndian.Uint16(b[2:]))
	if port == 0 {
		return 0, errors.New("stream request names port 0")
	}
	return port, nil
}

// readRequest reads and parses a request header.
func readRequest(r io.Reader) (int, error) {
	var b [requestLen]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return 0, fmt.Errorf("read stream request: %w", err)
	}
	return parseRequest(b[:])
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
