package tunnel

import (
	"errors"
	"io"
	"net"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

// wsConn is a websocket as a net.Conn: every Write is one binary message;
// Read runs through messages as one byte stream. An empty binary message
// is the end of the stream (CloseWrite): websockets have no half close of
// their own, and proxied protocols need one (an HTTP server that closes
// after its response). It pings the other end
// and fails reads once nothing (data, ping, pong) has arrived for the
// timeout.
type wsConn struct {
	ws     *websocket.Conn
	timing Timing

	rmu sync.Mutex // serialises Read
	r   io.Reader  // guarded by rmu; the current message
	// fresh is true until the current message has given a byte.
	fresh bool // guarded by rmu
	eof   bool // guarded by rmu; the other end closed its sending half

	wmu sync.Mutex // serialises Write (gorilla allows one writer)

	done      chan struct{} // closed by Close; stops the pinger
	pinger    sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

// NewConn wraps a websocket as a net.Conn that sends and expects binary
// messages, with keepalives as t says (zero: defaults). Closing it closes
// the websocket.
func NewConn(ws *websocket.Conn, t Timing) net.Conn {
	c := &wsConn{ws: ws, timing: t.withDefaults(), done: make(chan struct{})}
	c.alive()
	ws.SetPongHandler(func(string) error { c.alive(); return nil })
	// Both ends ping, and any frame counts as a sign of life, so pings are
	// not answered: a pong written from the reader would wait for the
	// write lock behind a large message, while the other end's reader
	// waits the same way, and both would stall until the timeout.
	ws.SetPingHandler(func(string) error { c.alive(); return nil })
	c.pinger.Go(c.ping)
	return c
}

// alive pushes the read deadline out: something arrived.
func (c *wsConn) alive() { _ = c.ws.SetReadDeadline(time.Now().Add(c.timing.Timeout)) }

func (c *wsConn) ping() {
	t := time.NewTicker(c.timing.PingInterval)
	defer t.Stop()
	for {
		select {
		case <-c.done:
			return
		case <-t.C:
			if err := c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(c.timing.Timeout)); err != nil {
				return // the reader will fail too
			}
		}
	}
}

func (c *wsConn) Read(p []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	for {
		if c.eof {
			return 0, io.EOF
		}
		if c.r == nil {
			typ, r, err := c.ws.NextReader()
			if err != nil {
				var ce *websocket.CloseError
				if errors.As(err, &ce) && ce.Code == websocket.CloseNormalClosure {
					return 0, io.EOF
				}
				return 0, err
			}
			c.alive()
			if typ != websocket.BinaryMessage {
				return 0, errors.New("tunnel: websocket sent a text message; want binary")
			}
			c.r, c.fresh = r, true
		}
		if len(p) == 0 {
			return 0, nil
		}
		n, err := c.r.Read(p)
		if n > 0 {
			c.fresh = false
		}
		if errors.Is(err, io.EOF) {
			if n == 0 && c.fresh {
				c.eof = true // an empty message
				return 0, io.EOF
			}
			c.r = nil
			if n == 0 {
				continue
			}
			err = nil
		}
		return n, err
	}
}

func (c *wsConn) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil // an empty message would end the stream
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// CloseWrite ends the stream this end sends (an empty message); reading
// goes on.
func (c *wsConn) CloseWrite() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.ws.WriteMessage(websocket.BinaryMessage, nil)
}

// Close sends a close message (best effort, bounded), closes the
// connection and stops the pinger.
func (c *wsConn) Close() error {
	c.closeOnce.Do(func() {
		close(c.done)
		_ = c.ws.WriteControl(websocket.CloseMessage,
			websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
		c.closeErr = c.ws.Close()
		c.pinger.Wait()
	})
	return c.closeErr
}

func (c *wsConn) LocalAddr() net.Addr                { return c.ws.LocalAddr() }
func (c *wsConn) RemoteAddr() net.Addr               { return c.ws.RemoteAddr() }
func (c *wsConn) SetReadDeadline(t time.Time) error  { return c.ws.SetReadDeadline(t) }
func (c *wsConn) SetWriteDeadline(t time.Time) error { return c.ws.SetWriteDeadline(t) }
func (c *wsConn) SetDeadline(t time.Time) error {
	return errors.Join(c.ws.SetReadDeadline(t), c.ws.SetWriteDeadline(t))
}
