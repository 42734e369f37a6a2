// Package proxy assembles etcdproxy's gRPC server: the generated passthrough for every etcd service, the
// overrides, the server limits, and a last line of defence that turns a panic into codes.Internal.
package proxy

import (
	"context"
	"fmt"
	"math"
	"net"
	"runtime/debug"
	"time"

	"github.com/etcdproxy/etcdproxy/gen"
	"github.com/etcdproxy/etcdproxy/overrides"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
)

// Config configures a Proxy.
type Config struct {
	// Upstream is the connection to etcd. The Proxy does not close it.
	Upstream *clientv3.Client
	// Logger is used for the proxy's own events; nil means no logging.
	Logger *zap.Logger
	// MaxRecvBytes bounds a request the proxy accepts from a client; 0 means math.MaxInt32, which leaves the
	// limit to etcd (its --max-request-bytes), so an oversized request gets etcd's own error.
	MaxRecvBytes int
	// MaxSendBytes bounds a response the proxy sends to a client; 0 means math.MaxInt32.
	MaxSendBytes int
	// MaxConcurrentStreams bounds the concurrent streams of one client connection; 0 means gRPC's default.
	MaxConcurrentStreams uint32
	// KeepaliveMinTime is the minimum interval a client must wait between pings.
	KeepaliveMinTime time.Duration
	// KeepaliveInterval is how often the server pings an idle client (0 disables).
	KeepaliveInterval time.Duration
	// KeepaliveTimeout is how long the server waits for a ping's answer before closing the connection.
	KeepaliveTimeout time.Duration
}

// Proxy is etcdproxy's gRPC server.
type Proxy struct {
	server *grpc.Server
	logger *zap.Logger
}

// New builds a Proxy for cfg.
func New(cfg Config) *Proxy {
	lg := cfg.Logger
	if lg == nil {
		lg = zap.NewNop()
	}
	opts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(orMax(cfg.MaxRecvBytes)),
		grpc.MaxSendMsgSize(orMax(cfg.MaxSendBytes)),
		grpc.ChainUnaryInterceptor(recoverUnary(lg)),
		grpc.ChainStreamInterceptor(recoverStream(lg)),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: cfg.KeepaliveMinTime}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: cfg.KeepaliveInterval, Timeout: cfg.KeepaliveTimeout}),
	}
	if cfg.MaxConcurrentStreams > 0 {
		opts = append(opts, grpc.MaxConcurrentStreams(cfg.MaxConcurrentStreams))
	}
	srv := grpc.NewServer(opts...)
	services := gen.NewServices(cfg.Upstream.ActiveConnection())
	overrides.Apply(services, overrides.Deps{Upstream: cfg.Upstream, Logger: lg})
	services.Register(srv)
	return &Proxy{server: srv, logger: lg}
}

// Serve serves gRPC on l until Shutdown.
func (p *Proxy) Serve(l net.Listener) error { return p.server.Serve(l) }

// Shutdown stops accepting connections and lets running calls finish until ctx is done; then it ends every call
// still open (watches and keepalive streams never finish by themselves) and returns.
func (p *Proxy) Shutdown(ctx context.Context) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		p.server.GracefulStop()
	}()
	select {
	case <-done:
	case <-ctx.Done():
		p.server.Stop()
		<-done
	}
}

func orMax(n int) int {
	if n <= 0 {
		return math.MaxInt32
	}
	return n
}

func recoverUnary(lg *zap.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
		defer func() {
			if r := recover(); r != nil {
				err = panicked(lg, info.FullMethod, r)
			}
		}()
		return handler(ctx, req)
	}
}

func recoverStream(lg *zap.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
		defer func() {
			if r := recover(); r != nil {
				err = panicked(lg, info.FullMethod, r)
			}
		}()
		return handler(srv, ss)
	}
}

// panicked logs a panic raised while serving method and returns the status the client gets.
func panicked(lg *zap.Logger, method string, r any) error {
	lg.Error("panic while serving a request", zap.String("method", method),
		zap.String("panic", fmt.Sprint(r)), zap.ByteString("stack", debug.Stack()))
	return status.Errorf(codes.Internal, "etcdproxy: internal error serving %s", method)
}
