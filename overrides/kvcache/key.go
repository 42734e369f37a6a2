package kvcache

import (
	"context"

	"github.com/etcdproxy/etcdproxy/overrides/internal/upstream"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// cacheKey identifies a request and the credentials it is made with: the caller's token and authorization
// metadata, each ended by a zero byte, then the request's deterministic proto encoding. It is built on every
// cacheable read, hits included, so the encoding of a request without unknown fields is written out here
// (appendRequest), in a buffer on the stack: one allocation, the key. ok is false if proto cannot encode the request.
func cacheKey(ctx context.Context, req *pb.RangeRequest) (key string, creds upstream.Creds, ok bool) {
	c := upstream.CredsOf(ctx)
	var buf [128]byte // most keys fit: one allocation, the string
	b := appendCreds(buf[:0], c)
	if len(req.ProtoReflect().GetUnknown()) == 0 {
		b = appendRequest(b, req)
	} else {
		enc, err := proto.MarshalOptions{Deterministic: true}.Marshal(req) // not into b: buf would leave the stack
		if err != nil {
			return "", c, false
		}
		b = append(b, enc...)
	}
	return string(b), c, true
}

// appendCreds appends the start of a cache key: c's token and authorization metadata, each ended by a zero byte
// (metadata values hold none).
func appendCreds(b []byte, c upstream.Creds) []byte {
	b = append(b, c.Token...)
	b = append(b, 0)
	b = append(b, c.Authorization...)
	return append(b, 0)
}

// appendRequest appends r's encoding, as proto.MarshalOptions{Deterministic: true} makes it for a RangeRequest
// without unknown fields: every field in the order of its number, those at their zero value left out (proto3).
// TestRequestKey checks both on random requests, and that RangeRequest has no field but these.
func appendRequest(b []byte, r *pb.RangeRequest) []byte {
	b = appendBytes(b, 1, r.Key)
	b = appendBytes(b, 2, r.RangeEnd)
	b = appendVarint(b, 3, uint64(r.Limit))
	b = appendVarint(b, 4, uint64(r.Revision))
	b = appendVarint(b, 5, uint64(r.SortOrder))
	b = appendVarint(b, 6, uint64(r.SortTarget))
	b = appendVarint(b, 7, protowire.EncodeBool(r.Serializable))
	b = appendVarint(b, 8, protowire.EncodeBool(r.KeysOnly))
	b = appendVarint(b, 9, protowire.EncodeBool(r.CountOnly))
	b = appendVarint(b, 10, uint64(r.MinModRevision))
	b = appendVarint(b, 11, uint64(r.MaxModRevision))
	b = appendVarint(b, 12, uint64(r.MinCreateRevision))
	return appendVarint(b, 13, uint64(r.MaxCreateRevision))
}

// requestFields is the number of RangeRequest fields appendRequest writes.
const requestFields = 13

func appendBytes(b []byte, num protowire.Number, v []byte) []byte {
	if len(v) == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendBytes(b, v)
}

func appendVarint(b []byte, num protowire.Number, v uint64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}
