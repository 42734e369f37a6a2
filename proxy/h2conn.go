package proxy

import (
	"bufio"
	"bytes"
	"io"
	"net"
)

// The gRPC matcher of Serve's multiplexer (cmux's HTTP2MatchHeaderFieldSendSettings) answers an HTTP/2 client's
// preface with a SETTINGS frame of its own before it can read the request's content-type, because some gRPC
// clients wait for the server's SETTINGS before they send headers. A connection it then hands to the HTTP server
// (an HTTP/2 request that is not gRPC: /health over TLS, where clients negotiate h2) carries the client's ACK of
// that frame, which the HTTP/2 server never sent and takes as a protocol error. h2Listener's connections drop that
// first SETTINGS ACK; everything else, HTTP/1 included, passes unchanged.

const h2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

type h2Listener struct{ net.Listener }

func (l h2Listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &h2Conn{Conn: c, r: bufio.NewReader(c)}, nil
}

type h2Conn struct {
	net.Conn
	r       *bufio.Reader
	started bool // the preface was looked for
	through bool // no more filtering: not HTTP/2, or the ACK is dropped
	pending int  // bytes of the current frame still to pass through
}

func (c *h2Conn) Read(p []byte) (int, error) {
	if c.through {
		return c.r.Read(p)
	}
	if !c.started {
		c.started = true
		b, err := c.r.Peek(len(h2Preface))
		if err != nil || !bytes.Equal(b, []byte(h2Preface)) {
			c.through = true
			return c.r.Read(p)
		}
		c.pending = len(h2Preface)
	}
	for c.pending == 0 {
		// A frame header: 3 bytes length, type, flags, 4 bytes stream id.
		h, err := c.r.Peek(9)
		if err != nil {
			return 0, err
		}
		n := int(h[0])<<16 | int(h[1])<<8 | int(h[2])
		if h[3] == 0x4 && h[4]&0x1 != 0 { // SETTINGS with ACK: the multiplexer's
			if _, err := c.r.Discard(9 + n); err != nil {
				return 0, err
			}
			c.through = true
			return c.r.Read(p)
		}
		c.pending = 9 + n
	}
	if len(p) > c.pending {
		p = p[:c.pending]
	}
	n, err := c.r.Read(p)
	c.pending -= n
	if err == io.EOF && c.pending > 0 {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}
