package proxy_test

import (
	"bytes"
	"encoding/binary"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/proxy"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/protobuf/proto"
)

// TestClientWindowsStatic: the proxy's flow-control windows toward clients are static (proxy.go,
// clientStreamWindow): a raw HTTP/2 client is told gRPC's 64 KiB stream window (what the proxy holds of a stream it
// does not read stays what etcd holds) and a connection window of gRPC's estimator's ceiling, and its calls, one
// at a time, draw no PING from the proxy. With --grpc-dynamic-window (Config.DynamicWindows), gRPC-Go's default:
// each call draws a bandwidth-estimation PING (a write and a read more per message for both sides).
func TestClientWindowsStatic(t *testing.T) {
	const calls = 5
	e := proxytest.Start(t, proxytest.Options{})
	streamWindow, connWindow, pings := callOneAtATime(t, e, calls)
	if streamWindow > 64<<10 {
		t.Errorf("stream window %d bytes: above gRPC's starting 64 KiB, which etcd keeps for a stream it does not read", streamWindow)
	}
	if connWindow < 16<<20 {
		t.Errorf("connection window %d bytes: below gRPC's estimator's ceiling, 16 MiB", connWindow)
	}
	if pings != 0 {
		t.Errorf("%d calls one at a time drew %d PINGs from the proxy, want none", calls, pings)
	}

	dyn := proxytest.Start(t, proxytest.Options{Proxy: func(c *proxy.Config) { c.DynamicWindows = true }})
	if _, _, pings := callOneAtATime(t, dyn, calls); pings < calls-1 {
		t.Errorf("dynamic windows: %d calls one at a time drew %d PINGs from the proxy, want one each", calls, pings)
	}
}

// callOneAtATime makes that many serializable gets to e's proxy over a raw HTTP/2 connection, one after the other,
// answering what the proxy asks to be answered as a client does; it returns the stream window the proxy told, its
// connection window, and the PINGs it sent.
func callOneAtATime(t *testing.T, e *proxytest.Env, calls int) (streamWindow, connWindow uint32, pings int) {
	t.Helper()
	proxytest.Put(t, proxytest.Timeout(t, 10*time.Second), e.Via, "k", "v")
	fr := dialHTTP2(t, e.ProxyAddr, 20*time.Second)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	req, err := proto.Marshal(&pb.RangeRequest{Key: []byte("k"), Serializable: true})
	if err != nil {
		t.Fatal(err)
	}
	msg := binary.BigEndian.AppendUint32([]byte{0}, uint32(len(req)))
	msg = append(msg, req...)
	dec := hpack.NewDecoder(4096, nil)
	streamWindow, connWindow = 65535, 65535
	for i := 0; i < calls; i++ {
		id := uint32(2*i + 1)
		var hb bytes.Buffer
		enc := hpack.NewEncoder(&hb)
		for _, f := range [][2]string{{":method", "POST"}, {":scheme", "http"}, {":authority", "proxy"},
			{":path", "/etcdserverpb.KV/Range"}, {"content-type", "application/grpc"}, {"te", "trailers"}} {
			_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
		}
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
		if err := fr.WriteData(id, true, msg); err != nil {
			t.Fatal(err)
		}
		for done := false; !done; {
			f, err := fr.ReadFrame()
			if err != nil {
				t.Fatalf("call %d: %v", i, err)
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if f.IsAck() {
					continue
				}
				if v, ok := f.Value(http2.SettingInitialWindowSize); ok {
					streamWindow = v
				}
				if err := fr.WriteSettingsAck(); err != nil {
					t.Fatal(err)
				}
			case *http2.WindowUpdateFrame:
				if f.StreamID == 0 {
					connWindow += f.Increment
				}
			case *http2.PingFrame:
				if !f.IsAck() {
					pings++
					if err := fr.WritePing(true, f.Data); err != nil {
						t.Fatal(err)
					}
				}
			case *http2.GoAwayFrame:
				t.Fatalf("the server ended the connection: %v %s", f.ErrCode, f.DebugData())
			case *http2.RSTStreamFrame:
				t.Fatalf("call %d: stream reset: %v", i, f.ErrCode)
			case *http2.HeadersFrame:
				// Every header block is decoded, the response's headers too: HPACK's table is the connection's,
				// and the trailers may refer to what the headers added to it.
				fields, err := dec.DecodeFull(f.HeaderBlockFragment())
				if err != nil {
					t.Fatal(err)
				}
				if f.StreamID != id || !f.StreamEnded() {
					continue
				}
				status := "none"
				for _, hf := range fields {
					if hf.Name == "grpc-status" {
						status = hf.Value
					}
				}
				if status != "0" {
					t.Fatalf("call %d: grpc-status %s, want 0", i, status)
				}
				done = true
			}
		}
	}
	return streamWindow, connWindow, pings
}
