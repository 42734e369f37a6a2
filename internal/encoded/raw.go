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

// Request is a call's request as the bytes the client sent (decompressed), held until the call ends: what Codec
// decodes into a *Request.
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
		defer req.buf.Free()
		if parts, n, ok := answer(ctx, req.buf.ReadOnlyData()); ok {
			return &reply{bufs: parts, n: n}, nil
		}
		return h(srv, ctx, req.decode, interceptor)
	}
}

// protoCodec is gRPC's registered proto codec, which decodes requests (Codec's base).
var protoCodec = encoding.GetCodecV2(proto.Name)

// decode decodes the request into v as gRPC's server does, with the status it gives bytes that do not decode.
func (r *Request) decode(v any) error {
	if err := protoCodec.Unmarshal(mem.BufferSlice{r.buf}, v); err != nil {
		return status.Errorf(codes.Internal, "grpc: error unmarshalling request: %v", err)
	}
	return nil
}
