package forward_test

// These tests put the generated passthrough in front of a recording upstream server, to check what the runtime
// itself guarantees: metadata, headers, trailers, status, deadlines, half-close and cancellation. What etcd does
// with the forwarded calls is tested against real etcd in package proxy.

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/forward"
	"github.com/etcdproxy/etcdproxy/gen"
	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// TestMain fails the run if the tests leave goroutines behind, after waiting as long as a loaded machine may take
// to end them (proxytest.LeftOver), not the half second of goleak's own retries.
func TestMain(m *testing.M) { proxytest.VerifyTestMain(m) }

// recorder is an upstream KV and Watch server that records what reaches it.
type recorder struct {
	pb.UnimplementedKVServer
	pb.UnimplementedWatchServer
	md       chan metadata.MD
	deadline chan time.Time
	canceled chan struct{}
}

func newRecorder() *recorder {
	return &recorder{md: make(chan metadata.MD, 16), deadline: make(chan time.Time, 16), canceled: make(chan struct{}, 16)}
}

func (r *recorder) record(ctx context.Context) {
	md, _ := metadata.FromIncomingContext(ctx)
	r.md <- md
	d, _ := ctx.Deadline()
	r.deadline <- d
}

func (r *recorder) Range(ctx context.Context, req *pb.RangeRequest) (*pb.RangeResponse, error) {
	r.record(ctx)
	_ = grpc.SetHeader(ctx, metadata.Pairs("x-up-header", "h"))
	_ = grpc.SetTrailer(ctx, metadata.Pairs("x-up-trailer", "t"))
	if string(req.Key) == "err" {
		st, _ := status.New(codes.FailedPrecondition, "upstream says no").
			WithDetails(&errdetails.ErrorInfo{Reason: "NO", Domain: "test"})
		return nil, st.Err()
	}
	return &pb.RangeResponse{Count: 7, Kvs: nil, Header: &pb.ResponseHeader{Revision: 42}}, nil
}

func (r *recorder) RangeStream(req *pb.RangeRequest, ss grpc.ServerStreamingServer[pb.RangeStreamResponse]) error {
	r.record(ss.Context())
	_ = ss.SetHeader(metadata.Pairs("x-up-header", "h"))
	ss.SetTrailer(metadata.Pairs("x-up-trailer", "t"))
	for i := 0; i < 3; i++ {
		if err := ss.Send(&pb.RangeStreamResponse{}); err != nil {
			return err
		}
	}
	if string(req.Key) == "block" {
		<-ss.Context().Done()
		r.canceled <- struct{}{}
		return ss.Context().Err()
	}
	return status.Error(codes.ResourceExhausted, "stream ends with this")
}

// Watch answers each request with a response whose WatchId is the request's count, and once the client
// half-closes, one more response (WatchId -1) before it ends the stream cleanly.
func (r *recorder) Watch(ss grpc.BidiStreamingServer[pb.WatchRequest, pb.WatchResponse]) error {
	r.record(ss.Context())
	for n := int64(1); ; n++ {
		_, err := ss.Recv()
		if errors.Is(err, io.EOF) {
			return ss.Send(&pb.WatchResponse{WatchId: -1})
		}
		if err != nil {
			r.canceled <- struct{}{}
			return err
		}
		if err := ss.Send(&pb.WatchResponse{WatchId: n}); err != nil {
			return err
		}
	}
}

// upDesc is a client-streaming method (etcd has none) built by hand from etcd's message types.
var upDesc = grpc.StreamDesc{StreamName: "Up", ClientStreams: true}

const upMethod = "/test.Up/Up"

// up is the upstream side of upMethod: it counts the requests and answers once.
func up(_ any, ss grpc.ServerStream) error {
	var n int64
	for {
		var req pb.RangeRequest
		if err := ss.RecvMsg(&req); errors.Is(err, io.EOF) {
			return ss.SendMsg(&pb.RangeResponse{Count: n})
		} else if err != nil {
			return err
		}
		n++
	}
}

type env struct {
	rec   *recorder
	proxy *grpc.ClientConn
}

func serve(t *testing.T, register func(*grpc.Server)) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	register(s)
	go func() { _ = s.Serve(l) }()
	t.Cleanup(s.Stop)
	return l.Addr().String()
}

func dial(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

func start(t *testing.T) *env {
	rec := newRecorder()
	upAddr := serve(t, func(s *grpc.Server) {
		pb.RegisterKVServer(s, rec)
		pb.RegisterWatchServer(s, rec)
		s.RegisterService(&grpc.ServiceDesc{ServiceName: "test.Up", HandlerType: (*any)(nil),
			Streams: []grpc.StreamDesc{{StreamName: "Up", Handler: up, ClientStreams: true}}}, struct{}{})
	})
	upstream := dial(t, upAddr)
	proxyAddr := serve(t, func(s *grpc.Server) {
		pb.RegisterKVServer(s, gen.NewKV(upstream))
		pb.RegisterWatchServer(s, gen.NewWatch(upstream))
		s.RegisterService(&grpc.ServiceDesc{ServiceName: "test.Up", HandlerType: (*any)(nil),
			Streams: []grpc.StreamDesc{{StreamName: "Up", ClientStreams: true, Handler: func(_ any, ss grpc.ServerStream) error {
				return forward.ClientStream(&grpc.GenericServerStream[pb.RangeRequest, pb.RangeResponse]{ServerStream: ss},
					func(ctx context.Context, opts ...grpc.CallOption) (grpc.ClientStreamingClient[pb.RangeRequest, pb.RangeResponse], error) {
						cs, err := upstream.NewStream(ctx, &upDesc, upMethod, opts...)
						if err != nil {
							return nil, err
						}
						return &grpc.GenericClientStream[pb.RangeRequest, pb.RangeResponse]{ClientStream: cs}, nil
					})
			}}}}, struct{}{})
	})
	return &env{rec: rec, proxy: dial(t, proxyAddr)}
}

func ctxTimeout(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func recv[T any](t *testing.T, c chan T) T {
	t.Helper()
	select {
	case v := <-c:
		return v
	case <-time.After(10 * time.Second):
		t.Fatal("upstream saw nothing within 10s")
		panic("unreachable")
	}
}

var clientMD = metadata.Pairs(
	"token", "tok-123", "authorization", "Bearer x", "hasleader", "true",
	"client-api-version", "3.5", "x-custom", "a", "x-custom", "b", "x-bin", "\x00\x01")

func checkMD(t *testing.T, got metadata.MD) {
	t.Helper()
	for k, want := range clientMD {
		if g := got.Get(k); len(g) != len(want) || (len(g) > 0 && g[0] != want[0]) || (len(g) > 1 && g[1] != want[1]) {
			t.Errorf("upstream metadata %q = %q, want %q", k, g, want)
		}
	}
	if got.Get(":authority") != nil && len(got.Get(":authority")) > 1 {
		t.Errorf(":authority forwarded twice: %q", got.Get(":authority"))
	}
}

func TestUnary(t *testing.T) {
	e := start(t)
	ctx := metadata.NewOutgoingContext(ctxTimeout(t), clientMD)
	var header, trailer metadata.MD
	resp, err := pb.NewKVClient(e.proxy).Range(ctx, &pb.RangeRequest{Key: []byte("k")}, grpc.Header(&header), grpc.Trailer(&trailer))
	if err != nil || resp.Count != 7 || resp.Header.GetRevision() != 42 {
		t.Fatalf("Range = %v, %v", resp, err)
	}
	checkMD(t, recv(t, e.rec.md))
	if d := recv(t, e.rec.deadline); d.IsZero() {
		t.Error("upstream call has no deadline: the client's deadline must bound it")
	} else if cd, _ := ctx.Deadline(); d.After(cd.Add(2 * time.Second)) {
		// gRPC carries a deadline as a timeout, rounded up, that each hop's server adds to the time it reads it, so
		// the upstream deadline is later by the time both hops took to be read, which a busy machine can make
		// hundreds of milliseconds. 2 s is still short of the client's 10 s (ctxTimeout): a deadline the proxy set
		// of its own, 12 s or longer, in place of the client's is after it.
		t.Errorf("upstream deadline %v is %v after the client's %v", d, d.Sub(cd), cd)
	}
	if got := header.Get("x-up-header"); len(got) != 1 || got[0] != "h" {
		t.Errorf("header x-up-header = %q", got)
	}
	if got := trailer.Get("x-up-trailer"); len(got) != 1 || got[0] != "t" {
		t.Errorf("trailer x-up-trailer = %q", got)
	}
}

func TestUnaryStatusUnchanged(t *testing.T) {
	e := start(t)
	_, err := pb.NewKVClient(e.proxy).Range(ctxTimeout(t), &pb.RangeRequest{Key: []byte("err")})
	st := status.Convert(err)
	if st.Code() != codes.FailedPrecondition || st.Message() != "upstream says no" {
		t.Fatalf("status = %v", st)
	}
	if d := st.Details(); len(d) != 1 || d[0].(*errdetails.ErrorInfo).GetReason() != "NO" {
		t.Errorf("details = %v", d)
	}
}

func TestServerStream(t *testing.T) {
	e := start(t)
	ctx := metadata.NewOutgoingContext(ctxTimeout(t), clientMD)
	s, err := pb.NewKVClient(e.proxy).RangeStream(ctx, &pb.RangeRequest{Key: []byte("k")})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for ; ; n++ {
		if _, err = s.Recv(); err != nil {
			break
		}
	}
	if st := status.Convert(err); n != 3 || st.Code() != codes.ResourceExhausted || st.Message() != "stream ends with this" {
		t.Errorf("got %d messages then %v; want 3 then the upstream status", n, err)
	}
	checkMD(t, recv(t, e.rec.md))
	if h, _ := s.Header(); len(h.Get("x-up-header")) != 1 {
		t.Errorf("header = %v", h)
	}
	if tr := s.Trailer(); len(tr.Get("x-up-trailer")) != 1 {
		t.Errorf("trailer = %v", tr)
	}
}

func TestServerStreamCancelReachesUpstream(t *testing.T) {
	e := start(t)
	ctx, cancel := context.WithCancel(ctxTimeout(t))
	s, err := pb.NewKVClient(e.proxy).RangeStream(ctx, &pb.RangeRequest{Key: []byte("block")})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if _, err := s.Recv(); err != nil {
			t.Fatal(err)
		}
	}
	cancel()
	recv(t, e.rec.canceled)
}

func TestBidiHalfClose(t *testing.T) {
	e := start(t)
	ctx := metadata.NewOutgoingContext(ctxTimeout(t), clientMD)
	w, err := pb.NewWatchClient(e.proxy).Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		if err := w.Send(&pb.WatchRequest{}); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.CloseSend(); err != nil {
		t.Fatal(err)
	}
	var ids []int64
	for {
		r, err := w.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("after %v: %v", ids, err)
		}
		ids = append(ids, r.WatchId)
	}
	if len(ids) != 3 || ids[0] != 1 || ids[1] != 2 || ids[2] != -1 {
		t.Errorf("responses %v, want [1 2 -1]: the half-close must reach upstream and the stream keep delivering", ids)
	}
	checkMD(t, recv(t, e.rec.md))
}

func TestBidiClientGoneCancelsUpstream(t *testing.T) {
	e := start(t)
	ctx, cancel := context.WithCancel(ctxTimeout(t))
	w, err := pb.NewWatchClient(e.proxy).Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Send(&pb.WatchRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Recv(); err != nil {
		t.Fatal(err)
	}
	cancel()
	recv(t, e.rec.canceled)
}

func TestClientStream(t *testing.T) {
	e := start(t)
	cs, err := e.proxy.NewStream(ctxTimeout(t), &upDesc, upMethod)
	if err != nil {
		t.Fatal(err)
	}
	s := &grpc.GenericClientStream[pb.RangeRequest, pb.RangeResponse]{ClientStream: cs}
	for i := 0; i < 4; i++ {
		if err := s.Send(&pb.RangeRequest{}); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := s.CloseAndRecv()
	if err != nil || resp.Count != 4 {
		t.Fatalf("CloseAndRecv = %v, %v; want Count 4", resp, err)
	}
}

// TestOutgoingLeavesIncoming: Outgoing drops the pseudo-headers from what it sends upstream, and leaves the call's
// incoming metadata as it was (it edits a copy), so a second upstream call made for the same call, or an override
// that reads the incoming metadata afterwards, sees it whole.
func TestOutgoingLeavesIncoming(t *testing.T) {
	in := metadata.Pairs(":authority", "proxy:2379", "token", "tok", "x-custom", "a", "x-custom", "b")
	ctx := metadata.NewIncomingContext(context.Background(), in)
	for range 2 {
		out, _ := metadata.FromOutgoingContext(forward.Outgoing(ctx))
		if len(out.Get(":authority")) != 0 || len(out.Get("token")) != 1 || len(out.Get("x-custom")) != 2 {
			t.Errorf("sent upstream: %v, want every key of %v but :authority", out, in)
		}
		out.Set("token", "changed")
	}
	got, _ := metadata.FromIncomingContext(ctx)
	if len(got) != len(in) || got.Get(":authority")[0] != "proxy:2379" || got.Get("token")[0] != "tok" {
		t.Errorf("the incoming metadata became %v, want %v", got, in)
	}
}
