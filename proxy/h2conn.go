package proxy

import (
	"bufio"
	"bytes"
	"io"
	"net"
)

// The gRPC matcher of Serve's multiplexer (cmux's HTTP2MatchHeaderFieldPrefixSendSettings) answers each SETTINGS
// frame an HTTP/2 client sends before its first request headers with a SETTINGS frame of its own, because some
// gRPC clients wait for the server's SETTINGS before they send headers. A connection it then hands to the HTTP
// server (an HTTP/2 request that is not gRPC: /health over TLS, where clients negotiate h2) carries the client's
// ACKs of those frames, which the HTTP/2 server never sent and takes as a protocol error. h2Listener's connections
// drop as many SETTINGS ACKs as the client sent SETTINGS frames before its first HEADERS (the client acknowledges
// in the order it received: the multiplexer's frames came first); everything else, HTTP/1 included, passes
// unchanged.

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
	r        *bufio.Reader
	started  bool // the preface has been checked
	through  bool // no more filtering: not HTTP/2, or every ACK to drop is dropped
	headers  bool // the client's first HEADERS frame has passed: no more SETTINGS are counted
	settings int  // SETTINGS frames the client sent before its first HEADERS, so the multiplexer answered
	acks     int  // ACKs dropped so far
	pending  int  // bytes of the current frame still to pass through
}

func (c *h2Conn) Read(p []byte) (int, error) {
	if c.through {
		return c.r.Read(p)
	}
	if !c.started {
		http2, err := c.preface()
		if err != nil {
			return 0, err
		}
		c.started = true
		if !http2 {
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
		switch typ, ack := h[3], h[4]&0x1 != 0; {
		case typ == 0x4 && ack && c.acks < c.settings: // an ACK of the multiplexer's SETTINGS
			if _, err := c.r.Discard(9 + n); err != nil {
				return 0, err
			}
			c.acks++
			if c.headers && c.acks == c.settings {
				c.through = true
				return c.r.Read(p)
			}
			continue
		case typ == 0x4 && !ack && !c.headers:
			c.settings++
		case typ == 0x1: // HEADERS: the multiplexer stopped at the first request's headers
			c.headers = true
			if c.acks == c.settings {
				c.through = true
			}
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

// preface reports whether the connection starts with HTTP/2's client preface. It compares what has arrived as it
// arrives, so a short HTTP/1 request is told apart at its first byte that differs, without waiting for 24 bytes.
func (c *h2Conn) preface() (bool, error) {
	for n := 1; ; n++ {
		b, err := c.r.Peek(max(n, min(c.r.Buffered(), len(h2Preface))))
		if !bytes.HasPrefix([]byte(h2Preface), b) {
			return false, nil
		}
		if len(b) == len(h2Preface) {
			return true, nil
		}
		if err != nil {
			return false, err
		}
		n = len(b)
	}
}
