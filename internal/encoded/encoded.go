// Package encoded lets a unary handler answer with bytes it keeps instead of having gRPC encode its reply at every
// call: a handler that returns a message it holds the encoding of (a cache hit) offers the encoding along with the
// message (Offer), and the server sends those bytes, if the message the call returns in the end is that very one
// (the same pointer: a wrapper that returns another message, a copy with keys stripped say, gets it encoded as
// usual). Every interceptor still sees the message; only the encoding is skipped.
//
// A unary method may also answer a call from its request's bytes before they are decoded (Raw, raw.go).
//
// It owns the reply slot a call's context carries (Handler), the offer slot of a stream (StreamInterceptor, below),
// the request kept as bytes (Raw) and the server codec that sends an offered encoding (Codec); it must not decide
// what is offered or answered, nor make an encoding: the offerer's bytes must be exactly what gRPC's proto codec
// makes of the message, and must never change.
package encoded

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
)

// reply is the slot a call's context carries (it is the context: one allocation per call), and, once offered, the
// reply Handler returns to gRPC for Codec to send.
type reply struct {
	context.Context
	msg  any
	bufs [2]mem.Buffer
	n    int
}

type slotKey struct{}

func (r *reply) Value(key any) any {
	if key == (slotKey{}) {
		return r
	}
	return r.Context.Value(key)
}

// Handler wraps the handler of a unary method: its call's context carries a slot for Offer, and if the handler
// offered an encoding of the message it returns, that encoding is the reply gRPC sends (through Codec).
func Handler(h grpc.MethodHandler) grpc.MethodHandler {
	return func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
		r := &reply{Context: ctx}
		resp, err := h(srv, r, dec, interceptor)
		if err != nil || r.n == 0 || r.msg != resp {
			return resp, err
		}
		return r, nil
	}
}

// Offer says that msg, if the call whose server context is ctx returns it, is sent as the bytes of parts, in
// order: exactly what gRPC's proto codec makes of msg, never modified afterwards (they may be sent while another
// call offers them too). A part is a mem.SliceBuffer, boxed once by its owner, so that an offer allocates
// nothing. Without a slot in ctx (a method Handler does not wrap), it does nothing, and if msg is not what the
// call returns, the offer is not used. The last offer of a call counts; at most two parts.
func Offer(ctx context.Context, msg any, parts ...mem.Buffer) {
	r, ok := ctx.Value(slotKey{}).(*reply)
	if !ok || msg == nil || len(parts) > len(r.bufs) {
		return
	}
	r.msg, r.n = msg, copy(r.bufs[:], parts)
}

// Codec is gRPC's proto codec, except that it sends the reply of Handler as the bytes offered for it. It is the
// server's codec for every content subtype (grpc.ForceServerCodecV2), which with gRPC's default codecs is what the
// server did: it registers proto only, and answers an unregistered subtype with proto.
type Codec struct{ base encoding.CodecV2 }

// NewCodec returns the Codec over gRPC's registered proto codec.
func NewCodec() Codec { return Codec{base: encoding.GetCodecV2(proto.Name)} }

// Marshal encodes v, or returns the bytes offered for it.
func (c Codec) Marshal(v any) (mem.BufferSlice, error) {
	if r, ok := v.(*reply); ok {
		return mem.BufferSlice(r.bufs[:r.n]), nil
	}
	if f, ok := v.(*frame); ok {
		return mem.BufferSlice(f.bufs[:f.n]), nil
	}
	return c.base.Marshal(v)
}

// Unmarshal decodes data into v, as gRPC's proto codec does; a *Request keeps data as it is (Raw).
func (c Codec) Unmarshal(data mem.BufferSlice, v any) error {
	if r, ok := v.(*Request); ok {
		r.buf = data.MaterializeToBuffer(mem.DefaultBufferPool()) // a reference, not a copy, if data is one buffer
		return nil
	}
	return c.base.Unmarshal(data, v)
}

// Name is proto's name.
func (c Codec) Name() string { return c.base.Name() }

// A stream's messages can be offered too: a sender that holds parts of a message's encoding shared with other
// messages (a watch event fanned out to many watchers: the same header and events, only the watch id differs)
// offers the parts for the message it is about to send (Slot.Offer), and the stream sends them if the message that
// reaches the transport is that very one. StreamInterceptor must be the server's outermost stream interceptor, so
// that every other one sees (and may replace) the message.

// Slot is a stream's offer slot: what its one sender offers for the message it sends next.
type Slot struct {
	grpc.ServerStream
	ctx  context.Context
	msg  any
	next *frame
}

// frame is an offered message, as the codec sends it: one per message (gRPC may still hold the parts' list after
// SendMsg returns, until the transport has written them).
type frame struct {
	bufs [3]mem.Buffer
	n    int
}

// StreamInterceptor gives each stream of the named methods ("/service/method") a Slot, found from the stream's
// context (SlotOf).
func StreamInterceptor(methods map[string]bool) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if !methods[info.FullMethod] {
			return handler(srv, ss)
		}
		s := &Slot{ServerStream: ss}
		s.ctx = context.WithValue(ss.Context(), streamKey{}, s)
		return handler(srv, s)
	}
}

type streamKey struct{}

// SlotOf returns the Slot of the stream whose context is ctx, or nil (a method StreamInterceptor does not serve).
func SlotOf(ctx context.Context) *Slot {
	s, _ := ctx.Value(streamKey{}).(*Slot)
	return s
}

// Context carries the slot.
func (s *Slot) Context() context.Context { return s.ctx }

// Offer says that msg, if it is the next message sent on the stream, is sent as the bytes of parts, in order: what
// gRPC's proto codec makes of msg, never modified afterwards. At most three parts; a nil part is left out. Only
// the stream's sender may call it (gRPC allows one at a time), before its Send of msg.
func (s *Slot) Offer(msg any, parts ...mem.Buffer) {
	if s == nil || len(parts) > 3 {
		return
	}
	f := &frame{}
	for _, p := range parts {
		if p != nil {
			f.bufs[f.n] = p
			f.n++
		}
	}
	s.msg, s.next = msg, f
}

// SendMsg sends m as the parts offered for it, if any, else as gRPC encodes it; an offer counts for one SendMsg.
func (s *Slot) SendMsg(m any) error {
	f := s.next
	offered := f != nil && s.msg == m
	s.msg, s.next = nil, nil
	if offered {
		return s.ServerStream.SendMsg(f)
	}
	return s.ServerStream.SendMsg(m)
}
