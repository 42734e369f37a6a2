package proxy

import (
	"context"

	"github.com/etcdproxy/etcdproxy/internal/encoded"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// handlers registers services on the server with their unary methods' handlers wrapped: each call grows its
// goroutine's stack at once (grown), the methods in offering may answer with an encoding they keep
// (encoded.Handler; the server's codec is encoded.Codec), and those in raw may answer from the request's bytes
// before it is decoded (encoded.Raw), a panic there becoming codes.Internal as under recoverUnary.
type handlers struct {
	grpc.ServiceRegistrar
	raw map[string]encoded.Answer // by full method name
	lg  *zap.Logger
}

// offering names the unary methods whose handlers may answer with an encoding they keep (internal/encoded): Range,
// whose cache hits offer their entry's encoding.
var offering = map[string]bool{
	"/etcdserverpb.KV/Range": true,
}

// offeringStreams names the stream methods whose sender may offer encodings (encoded.StreamInterceptor): Watch,
// whose fan-out shares the encoding of an event between the watchers it goes to.
var offeringStreams = map[string]bool{
	"/etcdserverpb.Watch/Watch": true,
}

func (r handlers) RegisterService(desc *grpc.ServiceDesc, impl any) {
	d := *desc
	d.Methods = make([]grpc.MethodDesc, len(desc.Methods))
	for i, m := range desc.Methods {
		name := "/" + desc.ServiceName + "/" + m.MethodName
		if offering[name] {
			m.Handler = encoded.Handler(m.Handler)
		}
		if answer := r.raw[name]; answer != nil {
			m.Handler = recovered(r.lg, name, encoded.Raw(m.Handler, answer))
		}
		m.Handler = grown(m.Handler)
		d.Methods[i] = m
	}
	r.ServiceRegistrar.RegisterService(&d, impl)
}

// recovered turns a panic in h into codes.Internal for the call, as recoverUnary does under the interceptors
// (which a call answered by encoded.Raw does not reach).
func recovered(lg *zap.Logger, method string, h grpc.MethodHandler) grpc.MethodHandler {
	return func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (resp any, err error) {
		defer func() {
			if r := recover(); r != nil {
				resp, err = nil, panicked(lg, method, r)
			}
		}()
		return h(srv, ctx, dec, interceptor)
	}
}

// grown wraps a unary method's handler so that the call's goroutine grows its stack once, first, to what a call
// needs. On one of gRPC's stream workers (streamWorkers, proxy.go) the stack is grown already, mostly, and this is a
// check; a call that found every worker busy runs as before the workers: gRPC starts a goroutine for it, with the
// runtime's starting stack (the average of the process's
// stacks, small: most of the proxy's goroutines are idle ones), and the call used to outgrow it twice, the second
// time deep in decoding the request or in the upstream call; each growth copies the stack and adjusts every frame
// on it, which the runtime looks up frame by frame. Grown from here, near the bottom of the stack, it is one copy
// of a few frames. Measured on cache hits from 16 clients (BenchmarkCacheHitParallel's profile): stack growth took
// 3.5–4.5 µs of CPU per call, 1.6–2.5 µs grown (the growth on entering gRPC's processUnaryRPC, before any
// handler, remains).
func grown(h grpc.MethodHandler) grpc.MethodHandler {
	return func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
		growStack()
		return h(srv, ctx, dec, interceptor)
	}
}

// stackReserve is how much stack growStack makes room for: a cache hit needs 4 KiB beyond this point, a call
// forwarded upstream more (with 4 KiB, its stack still grew in the upstream call).
const stackReserve = 8 << 10

// growStack takes stackReserve bytes of stack, so that the runtime grows the stack now (in one step, to the
// first power of two that holds them) if it is smaller; the stack stays that large for the rest of the call.
//
//go:noinline
func growStack() {
	var reserve [stackReserve]byte
	use(reserve[:])
}

// use keeps reserve on growStack's frame (a frame the compiler cannot leave out).
//
//go:noinline
func use([]byte) {}
