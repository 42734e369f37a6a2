package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/proxy"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// TestServeShutdownRace: Shutdown right after Serve started, in either order, is race-free (issue #10 item 18: Serve
// published its multiplexer before registering the matchers Shutdown reads), Serve returns, and the listener is
// closed (a Shutdown that ran before Serve published anything left Serve accepting forever).
func TestServeShutdownRace(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	for i := 0; i < 20; i++ {
		p := proxy.New(proxy.Config{Upstream: e.Upstream})
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		served := make(chan error, 1)
		go func() { served <- p.Serve(l) }()
		if i%2 == 1 {
			// Let Serve publish first on every other round (it may or may not have already: both orders count).
			time.Sleep(time.Millisecond)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		p.Shutdown(ctx)
		cancel()
		select {
		case err := <-served:
			if err != nil {
				t.Fatalf("round %d: Serve after Shutdown: %v", i, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("round %d: Serve still running 10s after Shutdown", i)
		}
		// The listener itself is asked, not its port: once it is closed, the port is free for any process on the
		// machine to take (make test runs packages side by side), and a dial could reach that one.
		tl := l.(*net.TCPListener)
		err = tl.SetDeadline(time.Now().Add(100 * time.Millisecond))
		if err == nil {
			_, err = tl.Accept()
		}
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("round %d: the listener is still open after Shutdown and Serve returned (%v)", i, err)
		}
	}
}

// TestWatchNegativeRevisionBadToken checks a suspicion from issue #10: for a watch create with a negative
// start_revision sent with an invalid token, etcd checks the revision first (the watcher is refused as compacted)
// while the coalescer checked the caller's credentials first (refused for the token). Confirmed, and fixed: the
// coalescer checks the revision first. The same create with a valid token, and a valid revision with the bad
// token, are checked alongside.
func TestWatchNegativeRevisionBadToken(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 30*time.Second)
	proxytest.EnableAuth(t, ctx, e.Direct, "r", proxytest.User{Name: "bob", Password: "b", ReadFrom: "w"})
	create := func(cc *grpc.ClientConn, tokenCtx context.Context, rev int64) string {
		wctx, cancel := context.WithTimeout(tokenCtx, 10*time.Second)
		defer cancel()
		w, err := pb.NewWatchClient(cc).Watch(wctx)
		if err != nil {
			return "open: " + status.Convert(err).Message()
		}
		if err := w.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{
			Key: []byte("w"), StartRevision: rev}}}); err != nil {
			return "send: " + err.Error()
		}
		r, err := w.Recv()
		if err != nil {
			st := status.Convert(err)
			return fmt.Sprintf("error %v %q", st.Code(), st.Message())
		}
		return fmt.Sprintf("created %v canceled %v id %d reason %q", r.Created, r.Canceled, r.WatchId, r.CancelReason)
	}
	bogus := metadata.AppendToOutgoingContext(ctx, "token", "not-a-token")
	for _, c := range []struct {
		name   string
		direct context.Context
		via    context.Context
		rev    int64
	}{
		{"negative start_revision, invalid token", bogus, bogus, -1},
		{"negative start_revision, valid token", proxytest.As(t, ctx, e.Direct, "bob", "b"), proxytest.As(t, ctx, e.Via, "bob", "b"), -1},
		{"start_revision 0, invalid token", bogus, bogus, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			if direct, via := create(e.Direct, c.direct, c.rev), create(e.Via, c.via, c.rev); direct != via {
				t.Errorf("direct: %s\n  proxy:  %s", direct, via)
			}
		})
	}
}
