// Package forward is the hand-written runtime that the generated passthrough (package gen) calls: one function per
// RPC shape. Each forwards the client's incoming metadata upstream, bounds the upstream call by the client's
// context (deadline and cancellation), copies upstream headers and trailers back, and returns the upstream gRPC
// status unchanged, so a client cannot tell it is not talking to etcd itself.
//
// Stream rules kept here: one goroutine owns each direction; the client-to-upstream direction ends with CloseSend
// (a client half-close is forwarded, the upstream stream keeps delivering); the handler never waits on a goroutine
// blocked in a server-side Recv (returning from the handler ends that Recv); every upstream context is cancelled
// when the handler returns.
//
// It owns the forwarding of one call and nothing else: it knows no etcd service and no override, and must not look
// inside the messages it carries.
package forward

import (
	"context"
	"errors"
	"io"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// SupportPackageIsVersion1 is asserted by the code protoc-gen-etcdproxy generates (gen/): the generated methods
// rely on this package's functions as they are at this version. A generator that emits calls this runtime does not
// have asserts a version this package does not declare, and the build fails naming it.
const SupportPackageIsVersion1 = true

// Outgoing returns a context for an upstream call made on behalf of the server-side call whose context is ctx: it
// keeps ctx's deadline, cancellation and values, and carries the client's incoming metadata as outgoing metadata.
// HTTP/2 pseudo-headers (":authority") are dropped: they describe the hop, and gRPC refuses them as metadata.
// Other transport-level keys (content-type, user-agent, te, grpc-timeout, ...) are skipped by gRPC's transport when
// it writes headers, so they need no filtering here.
func Outgoing(ctx context.Context) context.Context {
	md, ok := metadata.FromIncomingContext(ctx) // a copy of its own (keys and values), so it is edited in place
	if !ok || len(md) == 0 {
		return ctx
	}
	for k := range md {
		if len(k) > 0 && k[0] == ':' {
			delete(md, k)
		}
	}
	return metadata.NewOutgoingContext(ctx, md)
}

// Unary forwards one unary call. call is the typed upstream client's method.
func Unary[Req, Resp any](ctx context.Context, req Req,
	call func(context.Context, Req, ...grpc.CallOption) (Resp, error)) (Resp, error) {
	var header, trailer metadata.MD
	resp, err := call(Outgoing(ctx), req, grpc.Header(&header), grpc.Trailer(&trailer))
	if len(header) > 0 {
		_ = grpc.SetHeader(ctx, header)
	}
	if len(trailer) > 0 {
		_ = grpc.SetTrailer(ctx, trailer)
	}
	return resp, err
}

// ServerStream forwards a server-streaming call: one request up, a stream of responses down.
func ServerStream[Req, Resp any](req Req, ss grpc.ServerStreamingServer[Resp],
	open func(context.Context, Req, ...grpc.CallOption) (grpc.ServerStreamingClient[Resp], error)) error {
	ctx, cancel := context.WithCancel(Outgoing(ss.Context()))
	defer cancel()
	cs, err := open(ctx, req)
	if err != nil {
		return err
	}
	return pumpDown(ss, cs)
}

// ClientStream forwards a client-streaming call: a stream of requests up, one response down.
func ClientStream[Req, Resp any](ss grpc.ClientStreamingServer[Req, Resp],
	open func(context.Context, ...grpc.CallOption) (grpc.ClientStreamingClient[Req, Resp], error)) error {
	ctx, cancel := context.WithCancel(Outgoing(ss.Context()))
	defer cancel()
	cs, err := open(ctx)
	if err != nil {
		return err
	}
	for {
		req, err := ss.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err // the client is gone; cancel tears the upstream call down
		}
		if err := cs.Send(req); err != nil {
			break // the upstream call ended; CloseAndRecv returns its status
		}
	}
	resp, err := cs.CloseAndRecv()
	copyMetadata(ss, cs)
	if err != nil {
		return err
	}
	return ss.SendAndClose(resp)
}

// Bidi forwards a bidirectional stream. Requests flow up in a goroutine of their own, responses flow down in the
// handler's goroutine; the call ends when the upstream stream ends (its status is returned unchanged) or the client
// goes away.
func Bidi[Req, Resp any](ss grpc.BidiStreamingServer[Req, Resp],
	open func(context.Context, ...grpc.CallOption) (grpc.BidiStreamingClient[Req, Resp], error)) error {
	ctx, cancel := context.WithCancel(Outgoing(ss.Context()))
	defer cancel()
	cs, err := open(ctx)
	if err != nil {
		return err
	}
	go pumpUp(ss, cs, cancel)
	return pumpDown(ss, cs)
}

// pumpUp copies client requests upstream until the client half-closes (forwarded as CloseSend, so the upstream
// stream keeps delivering) or fails (the upstream call is cancelled). It owns cs's send side.
func pumpUp[Req, Resp any](ss grpc.BidiStreamingServer[Req, Resp], cs grpc.BidiStreamingClient[Req, Resp],
	cancel context.CancelFunc) {
	for {
		req, err := ss.Recv()
		if errors.Is(err, io.EOF) {
			_ = cs.CloseSend()
			return
		}
		if err != nil {
			cancel()
			return
		}
		if err := cs.Send(req); err != nil {
			return // the upstream stream ended; pumpDown receives its status
		}
	}
}

// downstream is the server side of a stream that sends responses of type Resp.
type downstream[Resp any] interface {
	SetHeader(metadata.MD) error
	SendHeader(metadata.MD) error
	SetTrailer(metadata.MD)
	Send(*Resp) error
}

// upstream is the client side of a stream that receives responses of type Resp.
type upstream[Resp any] interface {
	Header() (metadata.MD, error)
	Trailer() metadata.MD
	Recv() (*Resp, error)
}

// pumpDown copies upstream headers, then every upstream response, then the upstream trailers and status to the
// client.
func pumpDown[Resp any](ss downstream[Resp], cs upstream[Resp]) error {
	if header, err := cs.Header(); err == nil && len(header) > 0 {
		if err := ss.SendHeader(header); err != nil {
			return err
		}
	}
	for {
		resp, err := cs.Recv()
		if err != nil {
			if trailer := cs.Trailer(); len(trailer) > 0 {
				ss.SetTrailer(trailer)
			}
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if err := ss.Send(resp); err != nil {
			return err
		}
	}
}

// copyMetadata copies the headers and trailers of a finished upstream call to the client.
func copyMetadata(ss grpc.ServerStream, cs grpc.ClientStream) {
	if header, err := cs.Header(); err == nil && len(header) > 0 {
		_ = ss.SetHeader(header)
	}
	if trailer := cs.Trailer(); len(trailer) > 0 {
		ss.SetTrailer(trailer)
	}
}
