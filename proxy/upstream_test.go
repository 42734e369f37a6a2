package proxy

import (
	"context"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/forward"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/api/v3/version"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// TestClientAPIVersion: etcd sees the client's own client-api-version (or none), not the one clientv3 stamps on
// the proxy's upstream calls; the proxy's own calls keep clientv3's.
func TestClientAPIVersion(t *testing.T) {
	key := rpctypes.MetadataClientAPIVersionKey
	stamped := func(in metadata.MD) context.Context {
		ctx := context.Background()
		if in != nil {
			ctx = metadata.NewIncomingContext(ctx, in)
		}
		return metadata.NewOutgoingContext(ctx, metadata.Pairs(key, version.APIVersion, "token", "t"))
	}
	for _, tc := range []struct {
		name string
		in   metadata.MD
		want []string
	}{
		{"an older client", metadata.Pairs(key, "3.5"), []string{"3.5"}},
		{"a client of the same version", metadata.Pairs(key, version.APIVersion), []string{version.APIVersion}},
		{"a client that sends none", metadata.Pairs("token", "t"), nil},
		{"the proxy's own call", nil, []string{version.APIVersion}},
	} {
		out, _ := metadata.FromOutgoingContext(clientAPIVersion(stamped(tc.in)))
		if got := out.Get(key); !slices.Equal(got, tc.want) {
			t.Errorf("%s: etcd would see %q, want %q", tc.name, got, tc.want)
		}
		if got := out.Get("token"); len(got) != 1 {
			t.Errorf("%s: other metadata lost: %v", tc.name, out)
		}
	}
}

// TestDialRecvLimitAlone: a receive limit without a send limit (etcdproxy start --max-recv-bytes=N, --max-send-bytes
// left at 0) is a valid configuration; clientv3 used to refuse it, the proxy's "no send limit" being above N.
func TestDialRecvLimitAlone(t *testing.T) {
	c, err := Dial(clientv3.Config{Endpoints: []string{"127.0.0.1:1"}, MaxCallRecvMsgSize: 3 << 20})
	if err != nil {
		t.Fatalf("Dial with only a receive limit: %v", err)
	}
	c.Close()
	if _, err := Dial(clientv3.Config{Endpoints: []string{"127.0.0.1:1"}, MaxCallSendMsgSize: 4 << 20,
		MaxCallRecvMsgSize: 3 << 20}); err == nil {
		t.Error("Dial with a send limit above the receive limit: no error (clientv3, and etcd grpc-proxy, refuse it)")
	}
}

// recordingKV is a KV server that records the client-api-version of each Range it gets and answers with err: it
// stands for etcd only in what the connection puts on the wire, which is the proxy's behaviour, not etcd's.
type recordingKV struct {
	pb.UnimplementedKVServer
	mu   sync.Mutex
	seen [][]string
	err  error
}

func (r *recordingKV) Range(ctx context.Context, _ *pb.RangeRequest) (*pb.RangeResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	r.mu.Lock()
	r.seen = append(r.seen, md.Get(rpctypes.MetadataClientAPIVersionKey))
	r.mu.Unlock()
	if r.err != nil {
		return nil, r.err
	}
	return &pb.RangeResponse{Header: &pb.ResponseHeader{}}, nil
}

// TestDialWire: on a connection without credentials of the proxy's own, what a call puts on the wire: a call made
// on behalf of a client carries the client's client-api-version (or none), the proxy's own call clientv3's, and a
// failed call is attempted once (clientv3's retrying interceptor is replaced there; with credentials it stays).
func TestDialWire(t *testing.T) {
	rec := &recordingKV{}
	srv := grpc.NewServer()
	pb.RegisterKVServer(srv, rec)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(l) }()
	defer srv.Stop()
	c, err := Dial(clientv3.Config{Endpoints: []string{l.Addr().String()}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kv := pb.NewKVClient(c.ActiveConnection())
	key := rpctypes.MetadataClientAPIVersionKey
	for _, tc := range []struct {
		name string
		in   metadata.MD // the client's metadata; nil: the proxy's own call
		want []string
	}{
		{"an older client", metadata.Pairs(key, "3.5"), []string{"3.5"}},
		{"a client that sends none", metadata.Pairs("token", "t"), nil},
		{"the proxy's own call", nil, []string{version.APIVersion}},
	} {
		cctx := ctx
		if tc.in != nil {
			cctx = forward.Outgoing(metadata.NewIncomingContext(ctx, tc.in))
		}
		rec.seen = nil
		if _, err := kv.Range(cctx, &pb.RangeRequest{Key: []byte("k")}); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if len(rec.seen) != 1 || !slices.Equal(rec.seen[0], tc.want) {
			t.Errorf("%s: the server saw client-api-version %q, want %q once", tc.name, rec.seen, tc.want)
		}
	}
	// clientv3's own API on the same connection (the proxy's own calls without --user) keeps its stamp too.
	rec.seen = nil
	if _, err := c.Get(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	if len(rec.seen) != 1 || !slices.Equal(rec.seen[0], []string{version.APIVersion}) {
		t.Errorf("clientv3's Get: the server saw %q", rec.seen)
	}
	rec.seen, rec.err = nil, status.Error(codes.Unavailable, "etcdserver: leader changed")
	_, err = kv.Range(forward.Outgoing(metadata.NewIncomingContext(ctx, metadata.Pairs("token", "t"))), &pb.RangeRequest{Key: []byte("k")})
	if status.Code(err) != codes.Unavailable || status.Convert(err).Message() != "etcdserver: leader changed" {
		t.Errorf("a failed call returned %v, want the server's own error", err)
	}
	if len(rec.seen) != 1 {
		t.Errorf("a failed call was attempted %d times, want once (the client retries as it would against etcd)", len(rec.seen))
	}
}
