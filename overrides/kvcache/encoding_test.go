package kvcache

import (
	"bytes"
	"context"
	"testing"

	"github.com/etcdproxy/etcdproxy/internal/encoded"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

// sentFor is what the server sends for a hit: offer's offer, made in a call of encoded.Handler, encoded by
// encoded.Codec.
func sentFor(t *testing.T, resp *pb.RangeResponse, offer func(ctx context.Context)) []byte {
	t.Helper()
	h := encoded.Handler(func(_ any, ctx context.Context, _ func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
		offer(ctx)
		return resp, nil
	})
	reply, err := h(nil, context.Background(), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	data, err := encoded.NewCodec().Marshal(reply)
	if err != nil {
		t.Fatal(err)
	}
	return data.Materialize()
}

// TestHitEncoding: a hit is sent as exactly the bytes gRPC's proto codec makes of the response it returns: the
// cached response itself, or a response with a header of its own around the cached parts (hit, linHit), for
// responses with and without kvs, header fields, More and Count, and with fields this etcd does not know.
func TestHitEncoding(t *testing.T) {
	kv := func(k, v string, rev int64) *mvccpb.KeyValue {
		return &mvccpb.KeyValue{Key: []byte(k), Value: []byte(v), CreateRevision: rev, ModRevision: rev, Version: 1, Lease: 7}
	}
	unknown := &pb.RangeResponse{Header: &pb.ResponseHeader{Revision: 3}, Count: 1}
	unknown.ProtoReflect().SetUnknown([]byte{0xa0, 0x06, 0x01}) // field 100, varint 1
	for name, resp := range map[string]*pb.RangeResponse{
		"empty":        {},
		"header only":  {Header: &pb.ResponseHeader{ClusterId: 1, MemberId: 2, Revision: 3, RaftTerm: 4}},
		"empty header": {Header: &pb.ResponseHeader{}, Kvs: []*mvccpb.KeyValue{kv("a", "1", 2)}, Count: 1},
		"kvs": {Header: &pb.ResponseHeader{ClusterId: 1, MemberId: 2, Revision: 9, RaftTerm: 4},
			Kvs: []*mvccpb.KeyValue{kv("a", "1", 2), kv("b", string(make([]byte, 300)), 9)}, More: true, Count: 5},
		"count only":     {Header: &pb.ResponseHeader{Revision: 1 << 40}, Count: 12},
		"unknown fields": unknown,
	} {
		e := encode(resp)
		want, _ := proto.Marshal(resp)
		if got := sentFor(t, resp, func(ctx context.Context) { e.offer(ctx, resp) }); !bytes.Equal(got, want) || e.size != len(want) {
			t.Errorf("%s: the cached response is not sent as its encoding", name)
		}
		for _, hdr := range []*pb.ResponseHeader{{}, {ClusterId: 1, MemberId: 2, Revision: 1 << 50, RaftTerm: 4}, {Revision: 10}} {
			out := &pb.RangeResponse{Header: hdr, Kvs: resp.Kvs, More: resp.More, Count: resp.Count}
			want, _ := proto.Marshal(out)
			if got := sentFor(t, out, func(ctx context.Context) { e.offerWithHeader(ctx, out) }); !bytes.Equal(got, want) {
				t.Errorf("%s: a response with header %v around the cached parts is not sent as its encoding", name, hdr)
			}
		}
	}
}
