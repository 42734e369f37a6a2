package leader

import (
	"context"

	"github.com/etcdproxy/etcdproxy/internal/stream"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// Require-leader for clients. A call whose incoming metadata carries hasleader=true (clientv3.WithRequireLeader)
// is refused with etcd's no-leader error while the leader is lost, and a stream opened that way is ended with it
// when the leader is lost. etcd applies the same rule to the calls the proxy forwards, but streams the proxy serves
// from a shared upstream (coalesced watches and keepalives) depend on this one. The metadata is read from the
// incoming context, where gRPC puts what the client sent over the network.

func requiresLeader(ctx context.Context) bool {
	md, ok := metadata.FromIncomingContext(ctx)
	if !ok {
		return false
	}
	v := md.Get(rpctypes.MetadataRequireLeaderKey)
	return len(v) > 0 && v[0] == rpctypes.MetadataHasLeader
}

// UnaryInterceptor refuses require-leader unary calls while the leader is lost.
func (t *Tracker) UnaryInterceptor(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if !t.HasLeader() && requiresLeader(ctx) {
		requireLeaderRefused.WithLabelValues("unary").Inc()
		return nil, rpctypes.ErrGRPCNoLeader
	}
	return handler(ctx, req)
}

// StreamInterceptor refuses require-leader streams while the leader is lost, and ends them when it is lost.
func (t *Tracker) StreamInterceptor(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if !requiresLeader(ss.Context()) {
		return handler(srv, ss)
	}
	loss := t.Loss()
	if loss.Err() != nil {
		requireLeaderRefused.WithLabelValues("stream").Inc()
		return rpctypes.ErrGRPCNoLeader
	}
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	stop := context.AfterFunc(loss, cancel)
	defer stop()
	err := handler(srv, stream.WithContext(ss, ctx))
	if loss.Err() != nil {
		requireLeaderRefused.WithLabelValues("stream").Inc()
		return rpctypes.ErrGRPCNoLeader
	}
	return err
}
