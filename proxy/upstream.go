package proxy

import (
	"context"
	"math"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/api/v3/version"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/metadata"
)

// Dial opens the upstream connection with the settings a transparent proxy needs, on top of cfg:
//
//   - A unary call is attempted once: the client behind the proxy retries as it would against etcd, so a failure
//     is not retried twice over and an error such as an invalid auth token reaches the client at once instead of
//     after up to 100 hidden retries. With the proxy's own credentials (cfg.Username), clientv3's interceptor
//     stays (its token refresh) with MaxUnaryRetries 1; without, it is replaced by onceUnary (below).
//   - Message size limits default to math.MaxInt32 on both directions, so etcd's own limits decide and an
//     oversized request gets etcd's own error. They are the connection's default call options, so that every
//     stub on it keeps them, not only clientv3's own wrappers.
//   - Every upstream call waits for a ready connection until the client's deadline (gRPC wait-for-ready) instead of
//     failing at once with Unavailable while no etcd member is reachable: fail slow. A client that retries on
//     Unavailable (clientv3 re-sending LeaseGrant, say) would otherwise spin against the proxy and burn both; with
//     it, each attempt ends at the client's own deadline, which is what a clientv3 client sees talking to etcd
//     directly (clientv3 waits for ready by default too). Applied to every RPC, not only leases, because the
//     storm is the same for any RPC a client retries (proxy/README.md).
//   - A member that comes back is reconnected to within reconnectMaxDelay (and its jitter): gRPC's default backoff
//     between connection attempts grows to 120 s, so after an outage of a minute the proxy (every client call,
//     watch and keepalive through it) could wait two more before it saw etcd again.
//   - The client's own client-api-version reaches etcd (see clientAPIVersion).
//   - Without a Logger, the client logs nothing: an etcd error on a client's request is the client's to see, not
//     a line in the proxy's log for every failed call.
func Dial(cfg clientv3.Config) (*clientv3.Client, error) {
	cfg.MaxUnaryRetries = 1
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.MaxCallRecvMsgSize <= 0 {
		cfg.MaxCallRecvMsgSize = math.MaxInt32
	}
	send := cfg.MaxCallSendMsgSize
	if send <= 0 {
		// No limit of our own. clientv3 refuses a send limit above the receive limit, which an operator gives only
		// with both set; its own wrappers (the proxy's own calls) then get the receive limit for both.
		send = math.MaxInt32
		cfg.MaxCallSendMsgSize = cfg.MaxCallRecvMsgSize
	}
	// clientv3 applies its size limits as call options of its own API wrappers only; the typed stubs the proxy
	// makes on ActiveConnection (gen/, the overrides' upstream streams) would keep gRPC-Go's 4 MiB receive limit.
	// As default call options of the connection they bound every call on it.
	cfg.DialOptions = append(cfg.DialOptions,
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true),
			grpc.MaxCallSendMsgSize(send), grpc.MaxCallRecvMsgSize(cfg.MaxCallRecvMsgSize)),
		grpc.WithChainStreamInterceptor(keepClientAPIVersionStream),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: reconnectBackoff, MinConnectTimeout: 20 * time.Second}))
	if cfg.Username == "" && cfg.Token == "" {
		// No credentials of the proxy's own on this connection: clientv3's unary interceptor has nothing to do here
		// (one attempt, no token to refresh) but costs every call a debug log check, a peer record and two metadata
		// copies (its version stamp, then keepClientAPIVersionUnary's undoing of it): about a tenth of the proxy's
		// CPU on a forwarded read. clientv3 installs it with WithUnaryInterceptor before the configured dial
		// options, so this one replaces it.
		cfg.DialOptions = append(cfg.DialOptions, grpc.WithUnaryInterceptor(onceUnary))
	} else {
		cfg.DialOptions = append(cfg.DialOptions, grpc.WithChainUnaryInterceptor(keepClientAPIVersionUnary))
	}
	return clientv3.New(cfg)
}

// reconnectBackoff is gRPC's default backoff between connection attempts (1 s, times 1.6 each attempt, ±20%),
// capped at reconnectMaxDelay instead of 120 s: one connection attempt every 2 s or so per endpoint while etcd is
// down costs etcd nothing, and an upstream back is seen within that time (TestReconnectsPromptly).
var reconnectBackoff = backoff.Config{BaseDelay: time.Second, Multiplier: 1.6, Jitter: 0.2, MaxDelay: reconnectMaxDelay}

const reconnectMaxDelay = 2 * time.Second

// onceUnary replaces clientv3's unary interceptor on a connection without credentials of the proxy's own: one
// attempt, with the client's own metadata for a call made on behalf of a client (client-api-version included, or
// none if it sent none) and clientv3's version stamp for the proxy's own calls, as clientv3 would send them.
func onceUnary(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn,
	invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	if _, client := metadata.FromIncomingContext(ctx); !client {
		ctx = metadata.AppendToOutgoingContext(ctx, rpctypes.MetadataClientAPIVersionKey, version.APIVersion)
	}
	return invoker(ctx, method, req, reply, cc, opts...)
}

// clientv3's interceptors stamp every call with the proxy's own client-api-version. etcd validates that value and
// counts requests by it, so for a call made on behalf of a client (one whose context carries the client's incoming
// metadata) these interceptors, which run after clientv3's, put back what the client sent, or nothing if it sent
// none. Calls the proxy makes for itself keep clientv3's value.

func keepClientAPIVersionUnary(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn,
	invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	return invoker(clientAPIVersion(ctx), method, req, reply, cc, opts...)
}

func keepClientAPIVersionStream(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string,
	streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	return streamer(clientAPIVersion(ctx), desc, cc, method, opts...)
}

func clientAPIVersion(ctx context.Context) context.Context {
	// The common case, a clientv3 of the same API version, costs no metadata copy.
	v := metadata.ValueFromIncomingContext(ctx, rpctypes.MetadataClientAPIVersionKey)
	if len(v) == 1 && v[0] == version.APIVersion {
		return ctx // what clientv3 stamped already
	}
	if _, ok := metadata.FromIncomingContext(ctx); !ok {
		return ctx // the proxy's own call
	}
	out, _ := metadata.FromOutgoingContext(ctx) // a copy
	if len(v) > 0 {
		out.Set(rpctypes.MetadataClientAPIVersionKey, v...)
	} else {
		out.Delete(rpctypes.MetadataClientAPIVersionKey)
	}
	return metadata.NewOutgoingContext(ctx, out)
}
