package proxy

import (
	"context"
	"testing"

	"github.com/etcdproxy/etcdproxy/internal/encoded"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
)

// A panic while serving a request becomes codes.Internal for that request; the process lives on.
func TestRecover(t *testing.T) {
	boom := func() { var m map[string]int; m["x"]++ }
	_, err := recoverUnary(zap.NewNop())(context.Background(), nil, &grpc.UnaryServerInfo{FullMethod: "/etcdserverpb.KV/Txn"},
		func(context.Context, any) (any, error) { boom(); return nil, nil })
	if st := status.Convert(err); st.Code() != codes.Internal || st.Message() != "etcdproxy: internal error serving /etcdserverpb.KV/Txn" {
		t.Errorf("unary panic gave %v", err)
	}
	err = recoverStream(zap.NewNop())(nil, nil, &grpc.StreamServerInfo{FullMethod: "/etcdserverpb.Watch/Watch"},
		func(any, grpc.ServerStream) error { boom(); return nil })
	if status.Code(err) != codes.Internal {
		t.Errorf("stream panic gave %v", err)
	}
	// A panic in a call answered from its request's bytes (encoded.Raw), which no interceptor reaches.
	h := handlers{lg: zap.NewNop(), raw: map[string]encoded.Answer{"/etcdserverpb.KV/Range": func(context.Context, []byte) (
		parts [2]mem.Buffer, n int, ok bool) {
		boom()
		return parts, 0, false
	}}}
	var got grpc.MethodHandler
	h.ServiceRegistrar = registrar(func(d *grpc.ServiceDesc) { got = d.Methods[0].Handler })
	h.RegisterService(&grpc.ServiceDesc{ServiceName: "etcdserverpb.KV", Methods: []grpc.MethodDesc{{MethodName: "Range",
		Handler: func(any, context.Context, func(any) error, grpc.UnaryServerInterceptor) (any, error) {
			t.Error("the method's handler ran")
			return nil, nil
		}}}}, nil)
	dec := func(v any) error { return encoded.NewCodec().Unmarshal(mem.BufferSlice{mem.SliceBuffer([]byte{})}, v) }
	_, err = got(nil, context.Background(), dec, nil)
	if st := status.Convert(err); st.Code() != codes.Internal || st.Message() != "etcdproxy: internal error serving /etcdserverpb.KV/Range" {
		t.Errorf("a panic answering from the request's bytes gave %v", err)
	}
}

// registrar is a grpc.ServiceRegistrar that hands over what is registered.
type registrar func(*grpc.ServiceDesc)

func (r registrar) RegisterService(d *grpc.ServiceDesc, _ any) { r(d) }
