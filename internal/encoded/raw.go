package encoded

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
)

// A unary method may also answer a call from its request's bytes, before they are decoded (Raw): a cache whose keys
// are requests' encodings finds a hit without decoding the request, and sends the bytes it keeps. The calls it does
// not answer are decoded as gRPC decodes them and served by the method's handler, interceptors and all.

// Request is a call's request as the bytes the client sent (decompressed), held until they are decoded or the
// call is answered: what Codec decodes into a *Request.
type Request struct{ buf mem.Buffer }

// Answer answers the call whose server context is ctx and whose request's encoding is req, with the n parts of its
// response's encoding (what gRPC's proto codec makes of the response, never modified afterwards), or says false:
// then the method's handler serves the call. It must not keep req.
type Answer func(ctx context.Context, req []byte) (parts [2]mem.Buffer, n int, ok bool)

// Raw wraps h, the handler of a unary method, so that answer may answer each call first, from its request's bytes. A
// call it does not answer is decoded as gRPC's server decodes it (bytes that do not decode get the error gRPC gives)
// and served by h. An answered call runs none of the server's unary interceptors, so answer must check, or leave to
// h, whatever they would. The server's codec must be Codec.
func Raw(h grpc.MethodHandler, answer Answer) grpc.MethodHandler {
	return func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
		var req Request
		if err := dec(&req); err != nil {
			return nil, err
		}
		defer req.free()
		if parts, n, ok := answer(ctx, req.buf.ReadOnlyData()); ok {
			return &reply{Context: ctx, bufs: parts, n: n}, nil
		}
		// The bytes are let go once decoded, as gRPC does, not held while h waits on etcd.
		return h(srv, ctx, req.decodeOnce, interceptor)
	}
}

// protoCodec is gRPC's registered proto codec, which decodes requests (Codec's base).
var protoCodec = encoding.GetCodecV2(proto.Name)

// decodeOnce decodes the request into v as gRPC's server does, with the status it gives bytes that do not decode,
// and lets the bytes go (gRPC's own decoding function may be called once too).
func (r *Request) decodeOnce(v any) error {
	if r.buf == nil {
		return status.Error(codes.Internal, "grpc: error unmarshalling request: decoded twice")
	}
	defer r.free()
	if err := protoCodec.Unmarshal(mem.BufferSlice{r.buf}, v); err != nil {
		return status.Errorf(codes.Internal, "grpc: error unmarshalling request: %v", err)
	}
	return nil
}

// free lets the bytes go, if they are still held.
func (r *Request) free() {
	if r.buf != nil {
		r.buf.Free()
		r.buf = nil
	}
}
