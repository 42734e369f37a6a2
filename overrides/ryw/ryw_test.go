package ryw

import (
	"maps"
	"slices"
	"testing"

	"github.com/etcdproxy/etcdproxy/gen"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
)

// TestEveryMethodReviewed: every RPC the proxy serves has been reviewed for whether it writes keys, and KeyWriter
// says so for exactly the writers (which are unary: the interceptor sees them). A new etcd RPC fails this test
// until it is classified here and, if it writes keys, in KeyWriter.
func TestEveryMethodReviewed(t *testing.T) {
	const writes, none = true, false
	reviewed := map[string]bool{
		"/etcdserverpb.KV/Range": none, "/etcdserverpb.KV/RangeStream": none, "/etcdserverpb.KV/Put": writes,
		"/etcdserverpb.KV/DeleteRange": writes, "/etcdserverpb.KV/Txn": writes,
		"/etcdserverpb.KV/Compact":       none, // current-revision answers do not change
		"/etcdserverpb.Watch/Watch":      none,
		"/etcdserverpb.Lease/LeaseGrant": none, "/etcdserverpb.Lease/LeaseRevoke": writes, // deletes the lease's keys
		"/etcdserverpb.Lease/LeaseKeepAlive": none, "/etcdserverpb.Lease/LeaseTimeToLive": none,
		"/etcdserverpb.Lease/LeaseLeases": none,
		"/etcdserverpb.Cluster/MemberAdd": none, "/etcdserverpb.Cluster/MemberRemove": none,
		"/etcdserverpb.Cluster/MemberUpdate": none, "/etcdserverpb.Cluster/MemberList": none,
		"/etcdserverpb.Cluster/MemberPromote": none,
		"/etcdserverpb.Maintenance/Alarm":     none, "/etcdserverpb.Maintenance/Status": none,
		"/etcdserverpb.Maintenance/Defragment": none, "/etcdserverpb.Maintenance/Hash": none,
		"/etcdserverpb.Maintenance/HashKV": none, "/etcdserverpb.Maintenance/Snapshot": none,
		"/etcdserverpb.Maintenance/MoveLeader": none, "/etcdserverpb.Maintenance/Downgrade": none,
		// Auth RPCs write no keys; those that change rights flush the read cache (kvcache.Auth).
		"/etcdserverpb.Auth/AuthEnable": none, "/etcdserverpb.Auth/AuthDisable": none,
		"/etcdserverpb.Auth/AuthStatus": none, "/etcdserverpb.Auth/Authenticate": none,
		"/etcdserverpb.Auth/UserAdd": none, "/etcdserverpb.Auth/UserGet": none, "/etcdserverpb.Auth/UserList": none,
		"/etcdserverpb.Auth/UserDelete": none, "/etcdserverpb.Auth/UserChangePassword": none,
		"/etcdserverpb.Auth/UserGrantRole": none, "/etcdserverpb.Auth/UserRevokeRole": none,
		"/etcdserverpb.Auth/RoleAdd": none, "/etcdserverpb.Auth/RoleGet": none, "/etcdserverpb.Auth/RoleList": none,
		"/etcdserverpb.Auth/RoleDelete": none, "/etcdserverpb.Auth/RoleGrantPermission": none,
		"/etcdserverpb.Auth/RoleRevokePermission": none,
		"/v3electionpb.Election/Campaign":         writes, "/v3electionpb.Election/Proclaim": writes,
		"/v3electionpb.Election/Leader": none, "/v3electionpb.Election/Observe": none,
		"/v3electionpb.Election/Resign": writes,
		"/v3lockpb.Lock/Lock":           writes, "/v3lockpb.Lock/Unlock": writes,
	}
	srv := grpc.NewServer()
	gen.NewServices(nil).Register(srv)
	served := map[string]bool{}
	for name, info := range srv.GetServiceInfo() {
		for _, m := range info.Methods {
			method := "/" + name + "/" + m.Name
			served[method] = true
			w, ok := reviewed[method]
			if !ok {
				t.Errorf("%s is not reviewed: does it write keys? Classify it here and in KeyWriter", method)
				continue
			}
			if w && (m.IsClientStream || m.IsServerStream) {
				t.Errorf("%s writes keys and streams: the unary interceptor does not see it", method)
			}
			if got := KeyWriter(method, &pb.TxnRequest{Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestPut{
				RequestPut: &pb.PutRequest{Key: []byte("k")}}}}}); got != w {
				t.Errorf("KeyWriter(%s) = %v, reviewed: %v", method, got, w)
			}
		}
	}
	for _, m := range slices.Sorted(maps.Keys(reviewed)) {
		if !served[m] {
			t.Errorf("%s is reviewed but not served", m)
		}
	}
	if KeyWriter("/etcdserverpb.KV/Txn", &pb.TxnRequest{Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestRange{
		RequestRange: &pb.RangeRequest{Key: []byte("k")}}}}}) {
		t.Error("a read-only Txn counts as a write")
	}
}
