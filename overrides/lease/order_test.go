package lease_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"go.etcd.io/etcd/api/v3/authpb"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// TestKeepAliveRepliesBeforeError (issue #10 item 11): a client sends five renewals etcd accepts, then one it
// refuses (PermissionDenied: the caller may not write the lease's key), then one more. etcd answers the five, then
// ends the stream with the error; the request after it is never answered. Through the proxy the client must see
// the same, every time (the proxy used to send the error first and lose replies most of the time), with or without
// a half-close after the last request.
func TestKeepAliveRepliesBeforeError(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 120*time.Second)
	must := func(_ any, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	lease := pb.NewLeaseClient(e.Direct)
	allowed, err := lease.LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 600})
	if err != nil {
		t.Fatal(err)
	}
	refused, err := lease.LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 600})
	if err != nil {
		t.Fatal(err)
	}
	kv := pb.NewKVClient(e.Direct)
	must(kv.Put(ctx, &pb.PutRequest{Key: []byte("mine"), Lease: allowed.ID}))
	must(kv.Put(ctx, &pb.PutRequest{Key: []byte("theirs"), Lease: refused.ID}))
	// bob may write "mine" (so renew the lease attached to it), not "theirs".
	auth := pb.NewAuthClient(e.Direct)
	must(auth.UserAdd(ctx, &pb.AuthUserAddRequest{Name: "bob", Password: "b"}))
	must(auth.RoleAdd(ctx, &pb.AuthRoleAddRequest{Name: "bob-writer"}))
	must(auth.RoleGrantPermission(ctx, &pb.AuthRoleGrantPermissionRequest{Name: "bob-writer",
		Perm: &authpb.Permission{PermType: authpb.WRITE, Key: []byte("mine")}}))
	must(auth.UserGrantRole(ctx, &pb.AuthUserGrantRoleRequest{User: "bob", Role: "bob-writer"}))
	proxytest.EnableAuth(t, ctx, e.Direct, "r")

	// run sends the sequence on a new stream of cc and returns what the client sees: one line per reply, then the
	// error.
	bob := map[*grpc.ClientConn]context.Context{e.Direct: proxytest.As(t, ctx, e.Direct, "bob", "b"),
		e.Via: proxytest.As(t, ctx, e.Via, "bob", "b")}
	run := func(cc *grpc.ClientConn, halfClose bool) string {
		sctx, cancel := context.WithTimeout(bob[cc], 10*time.Second)
		defer cancel()
		s, err := pb.NewLeaseClient(cc).LeaseKeepAlive(sctx)
		if err != nil {
			t.Fatal(err)
		}
		ids := []int64{allowed.ID, allowed.ID, allowed.ID, allowed.ID, allowed.ID, refused.ID, allowed.ID}
		for _, id := range ids {
			if err := s.Send(&pb.LeaseKeepAliveRequest{ID: id}); err != nil {
				break // the stream ended already; Recv says how
			}
		}
		if halfClose {
			_ = s.CloseSend()
		}
		var seen string
		for i := 0; i <= len(ids); i++ {
			r, err := s.Recv()
			if err != nil {
				st := status.Convert(err)
				return seen + fmt.Sprintf("error %v %q", st.Code(), st.Message())
			}
			seen += fmt.Sprintf("reply for %s (TTL > 0: %v); ", name(r.ID, allowed.ID, refused.ID), r.TTL > 0)
		}
		return seen + "no end"
	}
	const rounds = 50
	bad := 0
	for i := 0; i < rounds; i++ {
		halfClose := i%2 == 1
		direct, via := run(e.Direct, halfClose), run(e.Via, halfClose)
		if direct != via {
			bad++
			if bad <= 3 {
				t.Errorf("round %d (half-close %v):\n  direct: %s\n  proxy:  %s", i, halfClose, direct, via)
			}
		}
	}
	if bad > 0 {
		t.Errorf("%d of %d rounds differ from etcd", bad, rounds)
	}
}

func name(id, allowed, refused int64) string {
	switch id {
	case allowed:
		return "the allowed lease"
	case refused:
		return "the refused lease"
	}
	return fmt.Sprint("lease ", id)
}
