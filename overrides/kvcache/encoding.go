package kvcache

import (
	"context"

	"github.com/etcdproxy/etcdproxy/internal/encoded"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// A hit is sent as its entry's encoding, made once when the entry is stored, instead of being encoded again at
// every hit (internal/encoded): the bytes are what gRPC's proto codec makes of the response, so a client gets the
// same bytes either way. A hit answered with a newer header (hit, linHit) is a new response around the cached
// parts: it is sent as its header's encoding followed by the rest of the entry's, which is the encoding of the
// cached parts. Nothing is offered when the response cannot be encoded so (then gRPC encodes it, as before).

// encoding is a cached response's encoding, boxed once as the buffers gRPC sends.
type encoding struct {
	all  mem.Buffer // the whole response
	rest mem.Buffer // every field after the header (Kvs, More, Count); nil if the response has unknown fields
	size int        // of all
}

// encode encodes resp as gRPC's proto codec does (proto.Marshal: the codec's options, none).
func encode(resp *pb.RangeResponse) encoding {
	b, err := proto.Marshal(resp)
	if err != nil {
		return encoding{size: proto.Size(resp)}
	}
	e := encoding{all: mem.SliceBuffer(b), size: len(b)}
	if len(resp.ProtoReflect().GetUnknown()) > 0 {
		return e // a response around the cached parts leaves them out: its encoding is not the header's plus the rest
	}
	// Fields are encoded in the order of their numbers, the header (1) first; it is encoded if set, empty or not.
	if resp.Header != nil {
		num, typ, n := protowire.ConsumeTag(b)
		if num != 1 || typ != protowire.BytesType {
			return e
		}
		_, m := protowire.ConsumeBytes(b[n:])
		if m < 0 {
			return e
		}
		b = b[n+m:]
	}
	e.rest = mem.SliceBuffer(b)
	return e
}

// offer offers the encoding for resp, the cached response itself.
func (e encoding) offer(ctx context.Context, resp *pb.RangeResponse) {
	if e.all != nil {
		encoded.Offer(ctx, resp, e.all)
	}
}

// offerWithHeader offers an encoding for resp, a new response with a header of its own around the cached parts
// (every field but the header is the cached response's).
func (e encoding) offerWithHeader(ctx context.Context, resp *pb.RangeResponse) {
	if hdr, ok := e.header(resp.Header); ok {
		encoded.Offer(ctx, resp, hdr, e.rest)
	}
}

// header returns the encoding of field 1 (the header) holding h, which followed by rest is the encoding of a
// response with header h around the cached parts; false if there is no such encoding (see encode).
func (e encoding) header(h *pb.ResponseHeader) (mem.Buffer, bool) {
	if e.rest == nil {
		return nil, false
	}
	size := proto.Size(h)
	b := make([]byte, 0, protowire.SizeTag(1)+protowire.SizeBytes(size))
	b = protowire.AppendTag(b, 1, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(size))
	b, err := proto.MarshalOptions{UseCachedSize: true}.MarshalAppend(b, h)
	if err != nil {
		return nil, false
	}
	return mem.SliceBuffer(b), true
}
