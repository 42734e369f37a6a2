// Package stream holds what the proxy's server and its overrides both need of a client's gRPC stream: the error a
// stream ends with when the proxy shuts down, and a stream that carries another context. It owns nothing else.
//
// It must not know of any service, override or upstream.
package stream

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ErrShuttingDown is what a client's stream ends with when the proxy shuts down (its server, or the shared
// upstream streams of an override): Unavailable, so that clients reconnect elsewhere, as they do when an etcd
// member goes away.
var ErrShuttingDown = status.Error(codes.Unavailable, "etcdproxy: shutting down")

// WithContext returns ss with Context returning ctx (a context derived from ss's, that something else may end).
func WithContext(ss grpc.ServerStream, ctx context.Context) grpc.ServerStream {
	return &withContext{ServerStream: ss, ctx: ctx}
}

type withContext struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *withContext) Context() context.Context { return s.ctx }
