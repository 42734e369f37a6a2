package kvcache_test

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/proxy"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	protoenc "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

func rawHits(t *testing.T) float64 { return proxytest.Gauge(t, "etcdproxy_kvcache_raw_hits_total") }

// encodedRequest is a request sent as these bytes (rawCodec.Marshal), whatever they encode.
type encodedRequest []byte

// sendCodec is rawCodec that also sends an encodedRequest as it is.
type sendCodec struct{ rawCodec }

func (c sendCodec) Marshal(v any) (mem.BufferSlice, error) {
	if b, ok := v.(encodedRequest); ok {
		return mem.BufferSlice{mem.SliceBuffer(b)}, nil
	}
	return c.rawCodec.Marshal(v)
}

// rangeBytes sends req, an encoded RangeRequest, through cc and returns the reply's bytes and what they decode to.
func rangeBytes(t *testing.T, ctx context.Context, cc *grpc.ClientConn, req encodedRequest) ([]byte, *pb.RangeResponse) {
	t.Helper()
	var b []byte
	if err := cc.Invoke(ctx, "/etcdserverpb.KV/Range", req, &b,
		grpc.ForceCodecV2(sendCodec{rawCodec{encoding.GetCodecV2(protoenc.Name)}})); err != nil {
		t.Fatal(err)
	}
	r := &pb.RangeResponse{}
	if err := proto.Unmarshal(b, r); err != nil {
		t.Fatal(err)
	}
	return b, r
}

// reordered encodes req with its serializable field (7) first: another encoding of the same request, as a
// client's encoder may make it (proto decodes fields in any order).
func reordered(t *testing.T, req *pb.RangeRequest) encodedRequest {
	t.Helper()
	r := proto.Clone(req).(*pb.RangeRequest)
	r.Serializable = false
	rest, err := proto.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	b := protowire.AppendTag(nil, 7, protowire.VarintType)
	b = protowire.AppendVarint(b, protowire.EncodeBool(req.Serializable))
	return append(b, rest...)
}

// TestRawHits: a hit whose request comes as clientv3 encodes it is answered from the request's bytes (RawHit), with
// the bytes the decoded path sends for the same request encoded another way, which are etcd's: at the entry's
// revision, then at the watch's position once etcd has written elsewhere. A linearizable read (even one whose
// entry is cached) and a read at a revision are never answered so. (Credentials: TestCredentials.)
func TestRawHits(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 30*time.Second)
	for _, k := range []string{"raw/a", "raw/b", "raw/c"} {
		proxytest.Put(t, ctx, e.Direct, k, "v-"+k)
	}
	for _, req := range []*pb.RangeRequest{
		{Key: []byte("raw/a"), Serializable: true},
		{Key: []byte("raw/"), RangeEnd: []byte("raw0"), Serializable: true, Limit: 2, SortOrder: pb.RangeRequest_DESCEND},
		{Key: []byte("raw/"), RangeEnd: []byte("raw0"), Serializable: true, KeysOnly: true},
		{Key: []byte("raw/"), RangeEnd: []byte("raw0"), Serializable: true, CountOnly: true},
	} {
		canonical, err := proto.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		other := reordered(t, req)
		if bytes.Equal(canonical, other) {
			t.Fatalf("%v: the reordered encoding is the canonical one", req)
		}
		cached(t, ctx, e.Via, req)
		// read sends enc and checks that it was a hit, answered from its bytes or not as raw says.
		read := func(enc encodedRequest, raw bool) ([]byte, *pb.RangeResponse) {
			t.Helper()
			h, rh := hits(t), rawHits(t)
			b, r := rangeBytes(t, ctx, e.Via, enc)
			if hits(t) != h+1 {
				t.Errorf("%v (%x): not a hit", req, []byte(enc))
			}
			if got := rawHits(t) == rh+1; got != raw {
				t.Errorf("%v (%x): answered from the request's bytes: %v, want %v", req, []byte(enc), got, raw)
			}
			return b, r
		}
		fast, _ := read(canonical, true)
		slow, _ := read(other, false)
		direct, _ := rangeBytes(t, ctx, e.Direct, canonical)
		if !bytes.Equal(fast, direct) || !bytes.Equal(slow, direct) {
			t.Errorf("%v: from the request's bytes %x, decoded %x, etcd %x", req, fast, slow, direct)
		}
		w := proxytest.Put(t, ctx, e.Direct, "raw-other", "x") // not in the range: the entry stays
		proxytest.Eventually(t, 5*time.Second, func() bool {
			_, r := read(other, false)
			return r.Header.Revision >= w
		}, "the watch never reached the write at %d", w)
		fast, r := read(canonical, true)
		slow, _ = read(other, false)
		if !bytes.Equal(fast, slow) || r.Header.Revision < w {
			t.Errorf("%v: after a write at %d elsewhere, from the request's bytes %x (%v), decoded %x", req, w, fast, r, slow)
		}
		_, d := rangeBytes(t, ctx, e.Direct, canonical)
		d.Header.Revision = r.Header.Revision
		if !proto.Equal(r, d) {
			t.Errorf("%v: after a write elsewhere, from the request's bytes %v, etcd %v", req, r, d)
		}
	}
	// A linearizable read's entry is under its own bytes too: it is answered after a barrier (linHit), never so.
	lin := &pb.RangeRequest{Key: []byte("raw/a")}
	linCached(t, ctx, e.Via, lin)
	notCounted(t, ctx, e.Via, rawHits, "answered from the request's bytes",
		lin, &pb.RangeRequest{Key: []byte("raw/a"), Serializable: true, Revision: 2})
}

// TestRawHitsOff: where something between the client and the cache changes a hit, the raw path is off and every
// hit is decoded: a namespace (the cache holds the namespaced request and etcd's keys, which the namespace strips;
// from the bytes, a client's "ns/a" would match the entry of its "a"), serializable ordering (every read's revision
// raises the floor) and the call log (it logs decoded requests).
func TestRawHitsOff(t *testing.T) {
	for _, c := range []struct {
		name string
		cfg  func(*proxy.Config)
	}{
		{"namespace", func(c *proxy.Config) { c.Overrides.Namespace = "ns/" }},
		{"ordering", func(c *proxy.Config) { c.Overrides.ReadYourWrites.Ordering = true }},
		{"call log", func(c *proxy.Config) { c.LogCalls = true }},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := proxytest.Start(t, proxytest.Options{Proxy: c.cfg})
			ctx := proxytest.Timeout(t, 30*time.Second)
			proxytest.Put(t, ctx, e.Direct, "ns/a", "1")
			req := &pb.RangeRequest{Key: []byte("a"), Serializable: true}
			if c.name != "namespace" {
				req.Key = []byte("ns/a")
			}
			before := rawHits(t)
			cached(t, ctx, e.Via, req)
			if r := get(t, ctx, e.Via, req); value(r) != "1" {
				t.Errorf("read %s: %v", req.Key, r)
			}
			if c.name == "namespace" {
				// The same bytes the entry was stored with, as the client's: etcd has no "ns/ns/a".
				if r := get(t, ctx, e.Via, &pb.RangeRequest{Key: []byte("ns/a"), Serializable: true}); len(r.Kvs) != 0 {
					t.Errorf(`read "ns/a" in namespace "ns/": %v, want nothing`, r)
				}
			}
			if n := rawHits(t) - before; n != 0 {
				t.Errorf("%v hits answered from the request's bytes", n)
			}
		})
	}
}

// TestRawBadRequest: bytes that do not decode to a RangeRequest get from the proxy what etcd gives them (the raw
// path decodes a request it does not answer as gRPC does, error included); a request with a field etcd does not
// know is answered as etcd answers it.
func TestRawBadRequest(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 30*time.Second)
	proxytest.Put(t, ctx, e.Direct, "bad/a", "1")
	sc := grpc.ForceCodecV2(sendCodec{rawCodec{encoding.GetCodecV2(protoenc.Name)}})
	for _, b := range []encodedRequest{
		{0x0a, 0x05, 'b'},  // a key longer than the bytes left
		{0x08},             // a tag without its value
		{0x3a, 0x01, 0x01}, // field 7 (a bool) as bytes
		{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, // a varint too long
	} {
		var via, direct []byte
		viaErr := e.Via.Invoke(ctx, "/etcdserverpb.KV/Range", b, &via, sc)
		directErr := e.Direct.Invoke(ctx, "/etcdserverpb.KV/Range", b, &direct, sc)
		if directErr == nil || status.Code(viaErr) != status.Code(directErr) ||
			status.Convert(viaErr).Message() != status.Convert(directErr).Message() {
			t.Errorf("%x: the proxy gave %v, etcd %v", []byte(b), viaErr, directErr)
		}
	}
	// Field 100, unknown to etcd, after a serializable read of bad/a: decoded, it is skipped; read twice, in case
	// a first read is remembered only (admit.go).
	req, err := proto.Marshal(&pb.RangeRequest{Key: []byte("bad/a"), Serializable: true})
	if err != nil {
		t.Fatal(err)
	}
	req = protowire.AppendVarint(protowire.AppendTag(req, 100, protowire.VarintType), 1)
	for range 3 {
		via, r := rangeBytes(t, ctx, e.Via, req)
		direct, _ := rangeBytes(t, ctx, e.Direct, req)
		if value(r) != "1" || !bytes.Equal(via, direct) {
			t.Errorf("a read with an unknown field: the proxy sent %x, etcd %x", via, direct)
		}
	}
}
