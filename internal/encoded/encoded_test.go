package encoded

import (
	"bytes"
	"context"
	"testing"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
)

// sent is what the server sends for the reply a wrapped handler returns: Codec's encoding of it.
func sent(t *testing.T, h func(ctx context.Context) (any, error)) []byte {
	t.Helper()
	wrapped := Handler(func(_ any, ctx context.Context, _ func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
		return h(ctx)
	})
	reply, err := wrapped(nil, context.Background(), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	data, err := NewCodec().Marshal(reply)
	if err != nil {
		t.Fatal(err)
	}
	return data.Materialize()
}

// TestOfferedBytesSent: the bytes offered for the message a call returns are what it sends; a call that returns
// another message (a copy made by a wrapper, say), or offers nothing, sends the proto encoding of what it returns.
func TestOfferedBytesSent(t *testing.T) {
	msg := &pb.RangeResponse{Header: &pb.ResponseHeader{Revision: 7}, Count: 1}
	other := &pb.RangeResponse{Header: &pb.ResponseHeader{Revision: 8}, Count: 2}
	want, err := proto.Marshal(other)
	if err != nil {
		t.Fatal(err)
	}
	offered := [][]byte{[]byte("offered "), []byte("bytes")}
	for _, c := range []struct {
		name string
		h    func(ctx context.Context) (any, error)
		want []byte
	}{
		{"offered and returned", func(ctx context.Context) (any, error) {
			Offer(ctx, msg, mem.SliceBuffer(offered[0]), mem.SliceBuffer(offered[1]))
			return msg, nil
		}, []byte("offered bytes")},
		{"the last offer counts", func(ctx context.Context) (any, error) {
			Offer(ctx, other, mem.SliceBuffer(offered[0]))
			Offer(ctx, msg, mem.SliceBuffer(offered[1]))
			return msg, nil
		}, []byte("bytes")},
		{"another message returned", func(ctx context.Context) (any, error) {
			Offer(ctx, msg, mem.SliceBuffer(offered[0]))
			return other, nil
		}, want},
		{"offered from a derived context", func(ctx context.Context) (any, error) {
			ctx, cancel := context.WithCancel(context.WithValue(ctx, struct{}{}, 1))
			defer cancel()
			Offer(ctx, other, mem.SliceBuffer(offered[1]))
			return other, nil
		}, []byte("bytes")},
		{"nothing offered", func(ctx context.Context) (any, error) { return other, nil }, want},
		{"too many parts", func(ctx context.Context) (any, error) {
			Offer(ctx, other, mem.SliceBuffer(offered[0]), mem.SliceBuffer(offered[1]), mem.SliceBuffer(offered[1]))
			return other, nil
		}, want},
	} {
		if got := sent(t, c.h); !bytes.Equal(got, c.want) {
			t.Errorf("%s: sent %q, want %q", c.name, got, c.want)
		}
	}
}

// TestOfferWithoutSlot: Offer outside a wrapped handler does nothing, and an error is returned as it is.
func TestOfferWithoutSlot(t *testing.T) {
	Offer(context.Background(), &pb.RangeResponse{}, mem.SliceBuffer("x"))
	wrapped := Handler(func(_ any, ctx context.Context, _ func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
		Offer(ctx, nil, mem.SliceBuffer("x"))
		return nil, context.Canceled
	})
	if reply, err := wrapped(nil, context.Background(), nil, nil); reply != nil || err != context.Canceled {
		t.Errorf("a failed call returned %v, %v", reply, err)
	}
}
