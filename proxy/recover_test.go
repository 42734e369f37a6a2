package proxy

import (
	"context"
	"testing"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
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
}
