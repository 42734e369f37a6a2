package members_test

import (
	"context"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/overrides"
	"github.com/etcdproxy/etcdproxy/overrides/members"
	"github.com/etcdproxy/etcdproxy/proxy"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/naming/endpoints"
	"go.uber.org/zap"
)

func TestMain(m *testing.M) { proxytest.VerifyTestMain(m) }

// startProxy serves a proxy in front of e's cluster with MemberList options o (o.Advertise "self" means the
// proxy's own address) and returns its address.
func startProxy(t *testing.T, e *proxytest.Env, o members.Options) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if o.Advertise == "self" {
		o.Advertise = l.Addr().String()
	}
	up, err := proxy.Dial(clientv3.Config{Endpoints: e.Cluster.Endpoints(), DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { up.Close() })
	p := proxytest.ServeOn(t, proxy.Config{Upstream: up, Overrides: overrides.Config{Members: o}}, l)
	proxytest.Eventually(t, 10*time.Second, p.HasLeader, "the proxy saw no leader")
	return l.Addr().String()
}

func urls(r *pb.MemberListResponse) []string {
	var us []string
	for _, m := range r.Members {
		us = append(us, m.ClientURLs...)
	}
	return us
}

func memberList(t *testing.T, ctx context.Context, addr string) *pb.MemberListResponse {
	t.Helper()
	r, err := pb.NewClusterClient(proxytest.Conn(t, addr)).MemberList(ctx, &pb.MemberListRequest{Linearizable: true})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestMemberListRules: etcd grpc-proxy's three rules. Without an advertised URL MemberList is etcd's; with one and
// no prefix, this proxy alone; with a prefix, every proxy registered there. The header is always etcd's.
func TestMemberListRules(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{Members: 3})
	ctx := proxytest.Timeout(t, 60*time.Second)
	direct, err := pb.NewClusterClient(e.Direct).MemberList(ctx, &pb.MemberListRequest{Linearizable: true})
	if err != nil {
		t.Fatal(err)
	}

	// Passed through: the zero options, and an advertised URL given empty.
	for _, o := range []members.Options{{}, {Prefix: "/proxies"}} {
		got := memberList(t, ctx, startProxy(t, e, o))
		if !slices.Equal(urls(got), urls(direct)) || len(got.Members) != 3 || got.Members[0].ID != direct.Members[0].ID {
			t.Fatalf("options %+v: MemberList %v, etcd's %v", o, got.Members, direct.Members)
		}
	}

	// This proxy alone.
	self := startProxy(t, e, members.Options{Advertise: "self"})
	got := memberList(t, ctx, self)
	if !slices.Equal(urls(got), []string{self}) || got.Members[0].Name == "" || got.Members[0].ID == 0 {
		t.Fatalf("MemberList through a proxy advertising %s: %v", self, got.Members)
	}
	if got.Header.GetClusterId() != direct.Header.ClusterId || got.Header.MemberId == 0 || got.Header.RaftTerm == 0 {
		t.Fatalf("header %v, etcd's %v", got.Header, direct.Header)
	}
}

// TestMemberListRegistered: with a prefix, the list follows the registrations as they come and go (a record
// added, one revoked, a value that is no record), each proxy once, sorted, with the same id on every proxy; and a clientv3 client that syncs its endpoints stays on proxies.
func TestMemberListRegistered(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{Members: 1})
	ctx := proxytest.Timeout(t, 60*time.Second)
	const prefix = "/proxies"
	em, err := endpoints.NewManager(e.Upstream, prefix)
	if err != nil {
		t.Fatal(err)
	}
	lease, err := e.Upstream.Grant(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	if err := em.AddEndpoint(ctx, prefix+"/10.0.0.9:2379", endpoints.Endpoint{Addr: "10.0.0.9:2379",
		Metadata: `{"name":"far"}`}, clientv3.WithLease(lease.ID)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Upstream.Put(ctx, prefix+"/junk", "not a record"); err != nil {
		t.Fatal(err)
	}
	a := startProxy(t, e, members.Options{Advertise: "self", Prefix: prefix})
	b := startProxy(t, e, members.Options{Advertise: "self", Prefix: prefix})
	for _, addr := range []string{a, b} { // as etcdproxy start --resolver-prefix registers each
		reg := proxy.Register(e.Upstream, prefix, addr, 5, zap.NewNop())
		t.Cleanup(reg.Close)
	}
	want := []string{"10.0.0.9:2379", a, b}
	slices.Sort(want)
	listed := func(addr string, want []string) func() bool {
		return func() bool { return slices.Equal(urls(memberList(t, ctx, addr)), want) }
	}
	proxytest.Eventually(t, 10*time.Second, listed(a, want), "proxy %s does not list %v", a, want)
	proxytest.Eventually(t, 10*time.Second, listed(b, want), "proxy %s does not list %v", b, want)
	ra, rb := memberList(t, ctx, a), memberList(t, ctx, b)
	for i := range ra.Members {
		if ra.Members[i].ID != rb.Members[i].ID || ra.Members[i].Name != rb.Members[i].Name {
			t.Fatalf("the proxies describe one proxy differently: %v and %v", ra.Members[i], rb.Members[i])
		}
	}
	if i := slices.Index(want, "10.0.0.9:2379"); ra.Members[i].Name != "far" {
		t.Fatalf("a registered proxy is named %q, want the name it registered", ra.Members[i].Name)
	}

	// A client of a proxy that syncs its endpoints from the member list stays on proxies.
	c := proxytest.Client(t, a)
	if err := c.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if got := c.Endpoints(); !slices.Equal(got, want) {
		t.Fatalf("a client of a proxy synced its endpoints to %v, want the proxies %v", got, want)
	}

	// The far proxy's lease ends: it leaves every list.
	if _, err := e.Upstream.Revoke(ctx, lease.ID); err != nil {
		t.Fatal(err)
	}
	want = slices.DeleteFunc(want, func(s string) bool { return s == "10.0.0.9:2379" })
	proxytest.Eventually(t, 10*time.Second, listed(a, want), "proxy %s still lists a revoked proxy", a)
}

// TestMemberListFollowsRegistrations: a proxy lists itself without a record of its own; a proxy registered after
// it started is listed, and leaves the list when it deregisters.
func TestMemberListFollowsRegistrations(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{Members: 1})
	ctx := proxytest.Timeout(t, 60*time.Second)
	const prefix = "/proxies"
	a := startProxy(t, e, members.Options{Advertise: "self", Prefix: prefix})
	proxytest.Eventually(t, 10*time.Second, func() bool { return len(memberList(t, ctx, a).Members) == 1 },
		"the proxy does not list itself")
	reg := proxy.Register(e.Upstream, prefix, "10.0.0.7:2379", 5, zap.NewNop())
	t.Cleanup(reg.Close)
	proxytest.Eventually(t, 10*time.Second, func() bool { return len(memberList(t, ctx, a).Members) == 2 },
		"the proxy does not list a new registration")
	reg.Close() // deregisters at once
	proxytest.Eventually(t, 10*time.Second, func() bool { return len(memberList(t, ctx, a).Members) == 1 },
		"the proxy still lists a deregistered proxy")
}
