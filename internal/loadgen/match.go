package loadgen

import "bytes"

// lineMatcher finds, in a byte stream read in chunks of any size, the end
// of the first line (the '\n') that contains marker. It keeps only the last
// len(marker)-1 bytes between chunks, so a virtual agent can follow a
// stream of megabyte-sized netmaps without buffering or decoding them.
type lineMatcher struct {
	marker  []byte
	carry   []byte // tail of the stream so far, at most len(marker)-1 bytes
	matched bool   // marker seen; waiting for the end of its line
	done    bool   // the line ended
}

func newLineMatcher(marker []byte) *lineMatcher {
	return &lineMatcher{marker: marker, carry: make([]byte, 0, len(marker))}
}

// feed consumes the next chunk and reports whether the line holding the
// marker ended in it. After it has returned true once it returns false.
func (m *lineMatcher) feed(chunk []byte) bool {
	if m.done || len(m.marker) == 0 {
		return false
	}
	from := 0 // where the search for '\n' starts in chunk
	if !m.matched {
		// A marker that straddles the previous chunk and this one.
		k := min(len(m.marker)-1, len(chunk))
		join := append(m.carry[:len(m.carry):len(m.carry)], chunk[:k]...)
		if i := bytes.Index(join, m.marker); i >= 0 {
			m.matched, from = true, i+len(m.marker)-len(m.carry)
		} else if i := bytes.Index(chunk, m.marker); i >= 0 {
			m.matched, from = true, i+len(m.marker)
		}
		m.keepTail(chunk)
	}
	if m.matched && bytes.IndexByte(chunk[from:], '\n') >= 0 {
		m.done = true
		return true
	}
	return false
}

// keepTail keeps the last len(marker)-1 bytes of the stream in carry.
func (m *lineMatcher) keepTail(chunk []byte) {
	keep := len(m.marker) - 1
	if len(chunk) >= keep {
		m.carry = append(m.carry[:0], chunk[len(chunk)-keep:]...)
		return
	}
	m.carry = append(m.carry, chunk...)
	if over := len(m.carry) - keep; over > 0 {
		m.carry = append(m.carry[:0], m.carry[over:]...)
	}
}
