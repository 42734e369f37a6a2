// Package proxy assembles etcdproxy's gRPC server: the generated passthrough for every etcd service, the
// overrides, the server limits, and a last line of defence that turns a panic into codes.Internal.
//
// It owns the server (its options, interceptor order and shutdown), the upstream connection (Dial), registration
// (Register), the HTTP endpoints and etcd's HTTP/JSON gateway; it must not hold what an override does (overrides) nor
// how a call is forwarded (forward, gen).
package proxy

import (
	"context"
	"fmt"
	"math"
	"net"
	"net/http"
	"runtime"
	"runtime/debug"
	"sync"
	"time"

	"github.com/etcdproxy/etcdproxy/gen"
	"github.com/etcdproxy/etcdproxy/internal/encoded"
	"github.com/etcdproxy/etcdproxy/internal/stream"
	"github.com/etcdproxy/etcdproxy/overrides"
	"github.com/soheilhy/cmux"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
)

// Config configures a Proxy.
type Config struct {
	// Upstream is the connection to etcd that client calls are forwarded on. The Proxy does not close it.
	Upstream *clientv3.Client
	// Internal, if set, is the connection for the proxy's own calls (the leader probe, the read cache's
	// invalidation watch), made with credentials of the proxy's own (--user); nil means Upstream. It must be a
	// separate client: clientv3 attaches its credentials to every call on its connection, and client calls must
	// reach etcd with their own.
	Internal *clientv3.Client
	// Logger is used for the proxy's own events; nil means no logging.
	Logger *zap.Logger
	// MaxRecvBytes bounds a request the proxy accepts from a client; 0 means math.MaxInt32, which leaves the
	// limit to etcd (its --max-request-bytes), so an oversized request gets etcd's own error.
	MaxRecvBytes int
	// MaxSendBytes bounds a response the proxy sends to a client; 0 means math.MaxInt32.
	MaxSendBytes int
	// MaxConcurrentStreams bounds the concurrent streams of one client connection; 0 means gRPC's default.
	MaxConcurrentStreams uint32
	// DynamicWindows gives client connections gRPC-Go's default flow control (64 KiB windows grown by
	// bandwidth-delay estimation, which sends a PING whenever data arrives and none is out) instead of the static
	// windows of clientStreamWindow (--grpc-dynamic-window).
	DynamicWindows bool
	// KeepaliveMinTime is the minimum interval a client must wait between pings; 0 or less means gRPC's default
	// (5 minutes), as etcd grpc-proxy applies only positive values.
	KeepaliveMinTime time.Duration
	// KeepaliveInterval is how often the server pings an idle client; 0 or less means gRPC's default (2 hours).
	KeepaliveInterval time.Duration
	// KeepaliveTimeout is how long the server waits for a ping's answer before closing the connection; 0 or less
	// means gRPC's default (20 seconds).
	KeepaliveTimeout time.Duration
	// Overrides is what the overrides do (the leader tracker, the watch coalescer, the read cache,
	// read-your-writes, the namespace, MemberList): see overrides.Config. The zero value has the cache off.
	Overrides overrides.Config
	// EnablePprof serves /debug/pprof/ on the HTTP endpoints.
	EnablePprof bool
	// LogCalls logs every request and response, secrets redacted (--experimental-enable-grpc-logging; calllog.go).
	LogCalls bool
}

// Proxy is etcdproxy's gRPC server.
type Proxy struct {
	server    *grpc.Server
	http      *http.Server
	logger    *zap.Logger
	overrides *overrides.Set
	health    *health.Server
	healthed  chan struct{} // closed when serveHealth returns
	gateway   *gateway

	// mu protects muxes and shut.
	mu    sync.Mutex
	muxes []cmux.CMux // of every Serve running, each fully built before it is added
	shut  bool        // Shutdown has started: a Serve from then on serves nothing
	// closing is cancelled when Shutdown starts: it ends the streams that never end by themselves.
	closing    context.Context
	endStreams context.CancelFunc
}

// endless names the server-streaming RPCs that, like every bidi stream, never end by themselves: Shutdown ends
// them at once instead of waiting out its timeout for them. (Finite streams, RangeStream and Snapshot, drain.)
var endless = map[string]bool{
	"/v3electionpb.Election/Observe": true,
}

// errShuttingDown is what a client's long-lived stream ends with when the proxy shuts down.
var errShuttingDown = stream.ErrShuttingDown

// New builds a Proxy for cfg.
func New(cfg Config) *Proxy {
	lg := cfg.Logger
	if lg == nil {
		lg = zap.NewNop()
	}
	p := &Proxy{logger: lg}
	p.closing, p.endStreams = context.WithCancel(context.Background())
	services := gen.NewServices(cfg.Upstream.ActiveConnection())
	p.overrides = overrides.Apply(services, overrides.Deps{Upstream: cfg.Upstream, Internal: cfg.Internal, Logger: lg},
		cfg.Overrides)
	opts := []grpc.ServerOption{
		grpc.NumStreamWorkers(streamWorkers()),
		grpc.MaxRecvMsgSize(orMax(cfg.MaxRecvBytes)),
		grpc.MaxSendMsgSize(orMax(cfg.MaxSendBytes)),
		grpc.ForceServerCodecV2(encoded.NewCodec()), // what handlers offer is sent as it is
		grpc.ChainUnaryInterceptor(recoverUnary(lg)),
		grpc.ChainStreamInterceptor(recoverStream(lg), p.endOnShutdown),
		grpc.ChainUnaryInterceptor(p.overrides.Unary...),
		grpc.ChainStreamInterceptor(p.overrides.Stream...),
		// gRPC takes 0 as its default; a negative value would reach it as given.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: max(0, cfg.KeepaliveMinTime)}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: max(0, cfg.KeepaliveInterval),
			Timeout: max(0, cfg.KeepaliveTimeout)}),
	}
	if !cfg.DynamicWindows {
		// Static windows toward clients: no bandwidth-estimation PINGs (see clientStreamWindow).
		opts = append(opts, grpc.StaticStreamWindowSize(clientStreamWindow), grpc.StaticConnWindowSize(clientConnWindow))
	}
	if cfg.MaxConcurrentStreams > 0 {
		opts = append(opts, grpc.MaxConcurrentStreams(cfg.MaxConcurrentStreams))
	}

	if cfg.LogCalls {
		// Outermost: what the client sent and what it got, refusals by the interceptors included.
		calls := callLog{lg: lg.Named("grpc-calls")}
		opts = append([]grpc.ServerOption{grpc.ChainUnaryInterceptor(calls.unary),
			grpc.ChainStreamInterceptor(calls.stream)}, opts...)
	}
	// Outermost of all, under every interceptor's view: the offer slot of the streams whose sender may offer the
	// encodings it shares between messages (internal/encoded; Watch's fan-out, overrides/watch/encoding.go).
	opts = append([]grpc.ServerOption{grpc.ChainStreamInterceptor(encoded.StreamInterceptor(offeringStreams))}, opts...)
	srv := grpc.NewServer(opts...)
	h := handlers{ServiceRegistrar: srv, lg: lg}
	// A hit answered from its request's bytes goes around the server's unary interceptors: recoverUnary (recovered
	// stands in for it), the overrides' (reviewed by Apply), and the call log, which logs decoded requests. A unary
	// interceptor added to opts above must be reviewed here.
	if p.overrides.RawRange != nil && !cfg.LogCalls {
		h.raw = map[string]encoded.Answer{"/etcdserverpb.KV/Range": p.overrides.RawRange}
	}
	services.Register(h)
	p.health = health.NewServer()
	healthpb.RegisterHealthServer(srv, p.health)
	p.healthed = make(chan struct{})
	go func() {
		defer close(p.healthed)
		p.serveHealth(p.closing, p.health)
	}()
	p.server = srv
	// Last: the gateway starts serving srv in memory, after which no service can be registered.
	p.gateway = newGateway(srv, lg.Named("grpc-gateway"))
	p.http = &http.Server{Handler: p.portHandler(cfg.EnablePprof), ReadHeaderTimeout: 10 * time.Second}
	// HTTP/2 as well as HTTP/1: on a TLS listener, HTTP clients negotiate h2 (the only protocol etcd's TLS
	// configuration offers), and the connections cmux hands over are not *tls.Conn, so the server cannot see
	// that; it takes HTTP/2 by its preface instead. (Plaintext HTTP/2 is served the same way.)
	p.http.Protocols = new(http.Protocols)
	p.http.Protocols.SetHTTP1(true)
	p.http.Protocols.SetUnencryptedHTTP2(true)
	return p
}

// HasLeader reports whether the etcd cluster has a leader, as far as the proxy knows.
func (p *Proxy) HasLeader() bool { return p.overrides.Leader.HasLeader() }

// Steady reports whether the proxy has seen the leader and, if the read cache is on, its invalidation watch is live.
func (p *Proxy) Steady() bool {
	return p.HasLeader() && (p.overrides.KVCache == nil || p.overrides.KVCache.Live())
}

// Serve serves on l until Shutdown: gRPC (HTTP/2 with content-type application/grpc) and, on the same port, etcd's
// HTTP/JSON gateway under /v3/ (gateway.go) and the HTTP endpoints of HTTPHandler.
// Serve called after Shutdown closes l and returns nil.
func (p *Proxy) Serve(l net.Listener) error {
	// The multiplexer is built (its matchers registered) before Shutdown can see it: Shutdown reads what the
	// matchers add.
	m := cmux.New(l)
	grpcL := m.MatchWithWriters(cmux.HTTP2MatchHeaderFieldPrefixSendSettings("content-type", "application/grpc"))
	httpL := m.Match(cmux.Any())
	p.mu.Lock()
	if p.shut {
		p.mu.Unlock()
		_ = l.Close()
		return nil
	}
	p.muxes = append(p.muxes, m)
	p.mu.Unlock()
	errc := make(chan error, 3)
	go func() { errc <- p.server.Serve(grpcL) }()
	go func() { errc <- p.http.Serve(h2Listener{httpL}) }()
	go func() { errc <- m.Serve() }()
	err := <-errc
	p.mu.Lock()
	shut := p.shut
	p.mu.Unlock()
	if shut {
		// Shutdown, whichever of the three saw it first. It closed the multiplexer, so the other two end too
		// (their listeners are the multiplexer's): Serve returns once nothing it started runs.
		<-errc
		<-errc
		return nil
	}
	return err
}

// Shutdown stops accepting connections, ends at once the streams that never end by themselves (watches, lease
// keepalives, election observers, over gRPC or the gateway) with Unavailable, and lets other running calls and HTTP
// requests finish until ctx is done; then it ends every call still open and returns.
func (p *Proxy) Shutdown(ctx context.Context) {
	p.mu.Lock()
	p.shut = true
	for _, m := range p.muxes {
		m.Close()
	}
	p.mu.Unlock()
	p.endStreams()
	<-p.healthed
	p.health.Shutdown()
	// HTTP drains alongside gRPC: a gateway request in flight is an HTTP request waiting on a gRPC call of this
	// server, so closing HTTP first would cut a gateway Put that gRPC would have let finish.
	httpDone := make(chan struct{})
	go func() {
		defer close(httpDone)
		if p.http.Shutdown(ctx) != nil {
			_ = p.http.Close()
		}
	}()
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
	<-httpDone
	// After the server: the connection's last calls have ended (or been ended by Stop). The websockets, which
	// neither HTTP Shutdown nor Close reaches (the connections are hijacked), are given a moment to deliver their
	// calls' last messages, then closed.
	p.gateway.close(ctx)
	p.overrides.Close()
}

// endOnShutdown gives a long-lived stream a context that Shutdown cancels; the stream then ends with
// errShuttingDown.
func (p *Proxy) endOnShutdown(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if !(info.IsClientStream && info.IsServerStream) && !endless[info.FullMethod] {
		return handler(srv, ss)
	}
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	stop := context.AfterFunc(p.closing, cancel)
	defer stop()
	err := handler(srv, stream.WithContext(ss, ctx))
	if err != nil && p.closing.Err() != nil {
		return errShuttingDown
	}
	return err
}

// streamWorkers is how many goroutines gRPC keeps to serve calls on (grpc.NumStreamWorkers): a call that finds one
// waiting runs on it, one that finds none on a goroutine of its own, as without workers. A worker's stack stays grown
// from call to call (until a collection finds it idle and halves it), so a call no longer starts a goroutine or grows
// a fresh stack twice on its way in (grown in handlers.go is then a check). A bidi stream holds its worker for as
// long as it lives. Measured on cache hits, proxy/README.md: 8 per core were as good as any count tried, more were
// worse (likely because gRPC hands a call to the longest-waiting worker, whose stack and cache lines are coldest).
func streamWorkers() uint32 { return uint32(8 * runtime.GOMAXPROCS(0)) }

// clientStreamWindow and clientConnWindow are the HTTP/2 flow-control windows of what clients send to the proxy, set
// static: gRPC-Go's default (a 64 KiB window grown by bandwidth-delay estimation) answers a client's data with a PING
// whenever none is out, so a client that sends one small message at a time (a keepalive, a get) costs the proxy a
// write and a read, and the client a read and a write, more per message. The stream window is the estimator's
// starting one, which it keeps for a stream the proxy stops reading (a keepalive stream past its outstanding bound,
// a watch stream whose client reads nothing): what the proxy holds of such a stream stays what etcd holds. The
// connection window bounds no memory (gRPC returns it as data arrives) and is the estimator's ceiling. The cost is
// a large request from far away: one stream sends 64 KiB per round trip, where the estimator grows the window with
// the link (--grpc-dynamic-window restores it). Measured: proxy/README.md.
const (
	clientStreamWindow = 64 << 10
	clientConnWindow   = 16 << 20
)

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
