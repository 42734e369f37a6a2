package proxy_test

import (
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/proxy"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/naming/endpoints"
	"go.etcd.io/etcd/client/v3/naming/resolver"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// TestRegistration: the proxy registers its address under the prefix with a lease, in etcd's naming/endpoints
// format, so a client that dials etcd:///PREFIX with etcd's resolver reaches it; a registration lease lost is
// registered again; Close deregisters at once.
func TestRegistration(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 60*time.Second)
	const prefix, ttl = "/proxies", 2
	key := prefix + "/" + e.ProxyAddr
	reg := proxy.Register(e.Upstream, prefix, e.ProxyAddr, ttl, zap.NewNop())
	defer reg.Close()

	direct := proxytest.Client(t, e.Cluster.Members[0].ClientURL)
	em, err := endpoints.NewManager(direct, prefix)
	if err != nil {
		t.Fatal(err)
	}
	leaseOf := func() int64 {
		r, err := direct.Get(ctx, key)
		if err != nil || len(r.Kvs) == 0 {
			return 0
		}
		return r.Kvs[0].Lease
	}
	proxytest.Eventually(t, 5*time.Second, func() bool { return leaseOf() != 0 }, "the proxy never registered")
	eps, err := em.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ep, ok := eps[key]; !ok || ep.Addr != e.ProxyAddr {
		t.Fatalf("registered endpoints %v; want %s at %s", eps, e.ProxyAddr, key)
	}
	ttlResp, err := direct.TimeToLive(ctx, clientv3.LeaseID(leaseOf()))
	if err != nil || ttlResp.GrantedTTL != ttl {
		t.Fatalf("the registration's lease: %v, %v; want a TTL of %d s", ttlResp, err, ttl)
	}

	// A client finds the proxy through etcd's resolver and works through it.
	rb, err := resolver.NewBuilder(direct)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := grpc.NewClient("etcd:///"+prefix, grpc.WithResolvers(rb), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	if _, err := pb.NewKVClient(cc).Put(ctx, &pb.PutRequest{Key: []byte("via-resolver"), Value: []byte("v")}); err != nil {
		t.Fatalf("a put through the resolved proxy: %v", err)
	}

	// The lease lost (revoked from elsewhere, as an etcd restart or partition would expire it): registered again.
	lost := leaseOf()
	if _, err := direct.Revoke(ctx, clientv3.LeaseID(lost)); err != nil {
		t.Fatal(err)
	}
	proxytest.Eventually(t, 10*time.Second, func() bool { l := leaseOf(); return l != 0 && l != lost },
		"the proxy did not register again after its lease was lost")

	reg.Close()
	if r, err := direct.Get(ctx, key); err != nil || len(r.Kvs) != 0 {
		t.Fatalf("right after Close the registration is still there: %v, %v", r, err)
	}
}
