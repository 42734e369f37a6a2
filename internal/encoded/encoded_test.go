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

// recorder is the transport end of a stream: it records what the codec makes of each message sent.
type recorder struct {
	grpc.ServerStream
	ctx  context.Context
	sent [][]byte
}

func (r *recorder) Context() context.Context { return r.ctx }

func (r *recorder) SendMsg(m any) error {
	data, err := NewCodec().Marshal(m)
	if err != nil {
		return err
	}
	r.sent = append(r.sent, data.Materialize())
	return nil
}

// TestStreamOffer: on a stream of a method StreamInterceptor serves, a message offered for is sent as the offered
// parts (nil ones left out), once: the same message sent again, another message, or a message sent with no offer,
// is encoded by the proto codec. A method it does not serve has no slot.
func TestStreamOffer(t *testing.T) {
	msg := &pb.WatchResponse{Header: &pb.ResponseHeader{Revision: 7}, WatchId: 3}
	other := &pb.WatchResponse{WatchId: 4}
	encode := func(m proto.Message) []byte {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	rec := &recorder{ctx: context.Background()}
	intercept := StreamInterceptor(map[string]bool{"/etcdserverpb.Watch/Watch": true})
	err := intercept(nil, rec, &grpc.StreamServerInfo{FullMethod: "/etcdserverpb.Watch/Watch"}, func(_ any, ss grpc.ServerStream) error {
		slot := SlotOf(ss.Context())
		if slot == nil {
			t.Fatal("no slot in a served method's stream")
		}
		slot.Offer(msg, mem.SliceBuffer("a"), nil, mem.SliceBuffer("bc"))
		if err := ss.SendMsg(msg); err != nil {
			return err
		}
		if err := ss.SendMsg(msg); err != nil { // the offer was used up
			return err
		}
		slot.Offer(msg, mem.SliceBuffer("x"))
		if err := ss.SendMsg(other); err != nil { // another message: encoded, and the offer is gone
			return err
		}
		return ss.SendMsg(msg)
	})
	if err != nil {
		t.Fatal(err)
	}
	want := [][]byte{[]byte("abc"), encode(msg), encode(other), encode(msg)}
	if len(rec.sent) != len(want) {
		t.Fatalf("sent %d messages; want %d", len(rec.sent), len(want))
	}
	for i := range want {
		if !bytes.Equal(rec.sent[i], want[i]) {
			t.Errorf("message %d: sent %q, want %q", i, rec.sent[i], want[i])
		}
	}
	err = intercept(nil, rec, &grpc.StreamServerInfo{FullMethod: "/etcdserverpb.KV/RangeStream"}, func(_ any, ss grpc.ServerStream) error {
		if SlotOf(ss.Context()) != nil {
			t.Error("a slot in a method StreamInterceptor does not serve")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
