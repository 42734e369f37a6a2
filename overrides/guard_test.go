package overrides_test

import (
	"reflect"
	"testing"

	"github.com/etcdproxy/etcdproxy/overrides/crashguard"
	"github.com/etcdproxy/etcdproxy/overrides/kvcache"
	"github.com/etcdproxy/etcdproxy/overrides/leader"
	"github.com/etcdproxy/etcdproxy/overrides/lease"
	"github.com/etcdproxy/etcdproxy/overrides/members"
	"github.com/etcdproxy/etcdproxy/overrides/namespace"
	"github.com/etcdproxy/etcdproxy/overrides/ryw"
	"github.com/etcdproxy/etcdproxy/overrides/watch"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	v3electionpb "go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	v3lockpb "go.etcd.io/etcd/server/v3/etcdserver/api/v3lock/v3lockpb"
)

// TestOverridesShadowOnlyServiceMethods: an override's exported methods are its service's methods (plus the few
// lifecycle methods listed). A misspelt method ("Rnage") would compile, never be called, and let the call fall
// through to the passthrough silently.
func TestOverridesShadowOnlyServiceMethods(t *testing.T) {
	for _, tc := range []struct {
		override any
		service  any
		extra    []string
	}{
		{(*leader.KV)(nil), (*pb.KVServer)(nil), nil},
		{(*leader.Lease)(nil), (*pb.LeaseServer)(nil), nil},
		{(*lease.Lease)(nil), (*pb.LeaseServer)(nil), []string{"Close"}},
		{(*watch.Watch)(nil), (*pb.WatchServer)(nil), []string{"Close"}},
		{(*kvcache.KV)(nil), (*pb.KVServer)(nil), []string{"Close", "Live", "BeginWrite", "EndWrite", "Await", "RawHit"}},
		{(*ryw.KV)(nil), (*pb.KVServer)(nil), nil},
		{(*kvcache.Auth)(nil), (*pb.AuthServer)(nil), nil},
		{(*members.Cluster)(nil), (*pb.ClusterServer)(nil), []string{"Close"}},
		{(*crashguard.Maintenance)(nil), (*pb.MaintenanceServer)(nil), nil},
		{(*namespace.KV)(nil), (*pb.KVServer)(nil), nil},
		{(*namespace.Watch)(nil), (*pb.WatchServer)(nil), nil},
		{(*namespace.Lease)(nil), (*pb.LeaseServer)(nil), nil},
		{(*namespace.Election)(nil), (*v3electionpb.ElectionServer)(nil), nil},
		{(*namespace.Lock)(nil), (*v3lockpb.LockServer)(nil), nil},
	} {
		o, s := reflect.TypeOf(tc.override), reflect.TypeOf(tc.service).Elem()
		allowed := map[string]bool{}
		for i := 0; i < s.NumMethod(); i++ {
			allowed[s.Method(i).Name] = true
		}
		for _, name := range tc.extra {
			allowed[name] = true
		}
		for i := 0; i < o.NumMethod(); i++ {
			if name := o.Method(i).Name; !allowed[name] {
				t.Errorf("%v has method %s, which %v does not declare", o, name, s)
			}
		}
		if !o.Implements(s) {
			t.Errorf("%v does not implement %v", o, s)
		}
	}
}
