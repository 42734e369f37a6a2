package proxy_test

import (
	"bufio"
	"bytes"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
)

// TestHTTP2ManySettings: an HTTP/2 client (not gRPC) that sends two SETTINGS frames before its request, and
// acknowledges each SETTINGS frame it receives, gets its /health answer on the gRPC port: the multiplexer's
// answers to both SETTINGS frames are hidden from the HTTP server.
func TestHTTP2ManySettings(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	fr := dialHTTP2(t, e.ProxyAddr, 10*time.Second)
	for i := 0; i < 2; i++ {
		if err := fr.WriteSettings(); err != nil {
			t.Fatal(err)
		}
	}
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, f := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", "proxy"}, {":path", "/health"}} {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndStream: true, EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	dec := hpack.NewDecoder(4096, nil)
	answered := false
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("reading the answer: %v", err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				if err := fr.WriteSettingsAck(); err != nil {
					t.Fatal(err)
				}
			}
		case *http2.GoAwayFrame:
			t.Fatalf("the server ended the connection: %v %s", f.ErrCode, f.DebugData())
		case *http2.HeadersFrame:
			fields, err := dec.DecodeFull(f.HeaderBlockFragment())
			if err != nil {
				t.Fatal(err)
			}
			for _, hf := range fields {
				if hf.Name == ":status" && hf.Value != "200" {
					t.Fatalf("GET /health over HTTP/2: status %s", hf.Value)
				}
			}
			// Then a PING: its answer comes once the server has read every frame sent before it, the ACKs
			// included, without finding fault with them.
			answered = true
			if err := fr.WritePing(false, [8]byte{1}); err != nil {
				t.Fatal(err)
			}
		case *http2.PingFrame:
			if f.IsAck() && answered {
				return
			}
		}
	}
}

// TestShortHTTP1Request: an HTTP/1 request shorter than HTTP/2's preface, on a connection the client keeps open,
// is answered.
func TestShortHTTP1Request(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	conn, err := net.Dial("tcp", e.ProxyAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write([]byte("GET / HTTP/1.0\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "HTTP/1.") {
		t.Fatalf("answer to an 18-byte HTTP/1.0 request: %q, %v", line, err)
	}
}

// TestGRPCContentSubtype: a gRPC client that names its codec (content-type application/grpc+proto) is served as
// gRPC, as etcd serves it.
func TestGRPCContentSubtype(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 10*time.Second)
	for name, cc := range map[string]*grpc.ClientConn{"etcd": e.Direct, "proxy": e.Via} {
		if _, err := pb.NewKVClient(cc).Put(ctx, &pb.PutRequest{Key: []byte("k")}, grpc.CallContentSubtype("proto")); err != nil {
			t.Errorf("%s: a put with content-type application/grpc+proto: %v", name, err)
		}
	}
}

// dialHTTP2 opens a raw HTTP/2 connection to addr (the client preface sent, nothing else), closed when the test
// ends; every read and write on it fails after timeout.
func dialHTTP2(t *testing.T, addr string, timeout time.Duration) *http2.Framer {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if _, err := conn.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatal(err)
	}
	return http2.NewFramer(conn, conn)
}
