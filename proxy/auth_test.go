package proxy_test

import (
	"context"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// TestAuth: with auth enabled, the caller's token reaches etcd on unary calls and on every stream, and a user is
// refused exactly as etcd refuses it.
func TestAuth(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 30*time.Second)
	proxytest.EnableAuth(t, ctx, e.Direct, "rootpw", proxytest.User{Name: "alice", Password: "alicepw", ReadFrom: "a", ReadTo: "b"})
	must := func(_ any, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	as := func(cc *grpc.ClientConn, user, password string) context.Context {
		t.Helper()
		return proxytest.As(t, ctx, cc, user, password)
	}
	rootDirect := as(e.Direct, "root", "rootpw")
	aliceDirect, aliceVia := as(e.Direct, "alice", "alicepw"), as(e.Via, "alice", "alicepw")
	must(pb.NewKVClient(e.Direct).Put(rootDirect, &pb.PutRequest{Key: []byte("a1"), Value: []byte("v")}))
	must(pb.NewKVClient(e.Direct).Put(rootDirect, &pb.PutRequest{Key: []byte("b1"), Value: []byte("v")}))

	// Unary: allowed, refused, no token, a bad token.
	if r, err := pb.NewKVClient(e.Via).Range(aliceVia, &pb.RangeRequest{Key: []byte("a1")}); err != nil || len(r.Kvs) != 1 {
		t.Fatalf("alice reads a1 through the proxy: %v, %v", r, err)
	}
	rng := func(cctx context.Context, cc *grpc.ClientConn, key string) error {
		_, err := pb.NewKVClient(cc).Range(cctx, &pb.RangeRequest{Key: []byte(key)})
		return err
	}
	sameError(t, "alice reads b1", rng(aliceDirect, e.Direct, "b1"), rng(aliceVia, e.Via, "b1"))
	sameError(t, "no token", rng(ctx, e.Direct, "a1"), rng(ctx, e.Via, "a1"))
	bogus := metadata.AppendToOutgoingContext(ctx, "token", "bogus.token")
	sameError(t, "an invalid token", rng(bogus, e.Direct, "a1"), rng(bogus, e.Via, "a1"))
	put := func(cctx context.Context, cc *grpc.ClientConn) error {
		_, err := pb.NewKVClient(cc).Put(cctx, &pb.PutRequest{Key: []byte("a1"), Value: []byte("w")})
		return err
	}
	sameError(t, "alice writes a1", put(aliceDirect, e.Direct), put(aliceVia, e.Via))

	// Watch: the token travels with the stream; a watch alice may not make fails as etcd fails it.
	watchCreate := func(cctx context.Context, cc *grpc.ClientConn, key string) *pb.WatchResponse {
		t.Helper()
		w, err := pb.NewWatchClient(cc).Watch(cctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := w.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{Key: []byte(key)}}}); err != nil {
			t.Fatal(err)
		}
		r, err := w.Recv()
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	if r := watchCreate(aliceVia, e.Via, "a1"); !r.Created || r.Canceled {
		t.Errorf("alice's watch on a1 through the proxy: %v", r)
	}
	d, v := watchCreate(aliceDirect, e.Direct, "b1"), watchCreate(aliceVia, e.Via, "b1")
	if d.Canceled != v.Canceled || d.CancelReason != v.CancelReason || d.Created != v.Created || !d.Canceled {
		t.Errorf("alice's watch on b1:\n  direct: %v\n  proxy:  %v", d, v)
	}

	// LeaseKeepAlive carries the token too.
	lease, err := pb.NewLeaseClient(e.Via).LeaseGrant(aliceVia, &pb.LeaseGrantRequest{TTL: 30})
	if err != nil {
		t.Fatal(err)
	}
	ka, err := pb.NewLeaseClient(e.Via).LeaseKeepAlive(aliceVia)
	if err != nil {
		t.Fatal(err)
	}
	if err := ka.Send(&pb.LeaseKeepAliveRequest{ID: lease.ID}); err != nil {
		t.Fatal(err)
	}
	if r, err := ka.Recv(); err != nil || r.TTL != 30 {
		t.Errorf("keepalive with alice's token: %v, %v", r, err)
	}

	// Election.Observe carries the token (etcd's grpc-proxy drops it, and the observer is refused).
	rootLease, err := pb.NewLeaseClient(e.Direct).LeaseGrant(rootDirect, &pb.LeaseGrantRequest{TTL: 30})
	if err != nil {
		t.Fatal(err)
	}
	must(v3electionpb.NewElectionClient(e.Direct).Campaign(rootDirect,
		&v3electionpb.CampaignRequest{Name: []byte("a-election"), Lease: rootLease.ID, Value: []byte("leader-1")}))
	observe := func(cctx context.Context, cc *grpc.ClientConn) (*v3electionpb.LeaderResponse, error) {
		s, err := v3electionpb.NewElectionClient(cc).Observe(cctx, &v3electionpb.LeaderRequest{Name: []byte("a-election")})
		if err != nil {
			return nil, err
		}
		return s.Recv()
	}
	if r, err := observe(aliceVia, e.Via); err != nil || string(r.GetKv().GetValue()) != "leader-1" {
		t.Errorf("alice observes a-election through the proxy: %v, %v", r, err)
	}
	_, directErr := observe(ctx, e.Direct)
	_, viaErr := observe(ctx, e.Via)
	sameError(t, "observe without a token", directErr, viaErr)
}
