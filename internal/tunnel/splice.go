package tunnel

import (
	"errors"
	"io"
	"net"

	"github.com/hashicorp/yamux"
)

// closeWriter is a connection that can close its sending half (TCP,
// TLS).
type closeWriter interface{ CloseWrite() error }

// Splice copies a to b and b to a until both directions end, then closes
// both. When one side ends its stream cleanly the other side's sending
// half is closed, so half-closed protocols work; an error on either side
// closes both at once.
func Splice(a, b io.ReadWriteCloser) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		copyHalf(a, b)
	}()
	copyHalf(b, a)
	<-done
	_ = a.Close()
	_ = b.Close()
}

// copyHalf copies src to dst.
func copyHalf(dst, src io.ReadWriteCloser) {
	_, err := io.Copy(dst, src)
	if st, ok := src.(*yamux.Stream); ok && err == nil && st.Session().IsClosed() {
		// yamux ends the streams of a dead session with io.EOF; that is
		// not the end of the data.
		err = errors.New("tunnel session ended")
	}
	if err != nil {
		abort(dst)
		abort(src)
		return
	}
	halfClose(dst)
}

// abort closes c, with a TCP reset where it is a TCP connection, so that
// the other end does not take a cut connection for a complete one.
func abort(c io.ReadWriteCloser) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// halfClose closes the sending half of c where the protocol has one: TCP,
// the websocket of NewConn (an empty message), and a yamux stream, whose
// Close is such a half close (a FIN; reading goes on).
func halfClose(c io.ReadWriteCloser) {
	switch c := c.(type) {
	case closeWriter:
		_ = c.CloseWrite()
	case *yamux.Stream:
		_ = c.Close()
	}
}
