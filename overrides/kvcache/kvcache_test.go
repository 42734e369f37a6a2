package kvcache_test

import (
	"bytes"
	"context"
	"fmt"
	"reflect"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/embedetcd"
	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/proxy"
	"go.etcd.io/etcd/api/v3/authpb"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	protoenc "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

func TestMain(m *testing.M) { proxytest.VerifyTestMain(m) }

func hits(t *testing.T) float64 { return proxytest.Gauge(t, "etcdproxy_kvcache_hits_total") }

func get(t *testing.T, ctx context.Context, cc *grpc.ClientConn, req *pb.RangeRequest) *pb.RangeResponse {
	t.Helper()
	r, err := pb.NewKVClient(cc).Range(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func value(r *pb.RangeResponse) string {
	if len(r.Kvs) == 0 {
		return "<none>"
	}
	return string(r.Kvs[0].Value)
}

// TestReviewedKVMethods lists every KV method this cache has reviewed for coherence. A KV method added by a new
// etcd (a new way to write) fails it until the cache handles it.
func TestReviewedKVMethods(t *testing.T) {
	reviewed := []string{"Compact", "DeleteRange", "Put", "Range", "RangeStream", "Txn"}
	var got []string
	kv := reflect.TypeOf((*pb.KVServer)(nil)).Elem()
	for i := 0; i < kv.NumMethod(); i++ {
		if m := kv.Method(i); m.IsExported() {
			got = append(got, m.Name)
		}
	}
	sort.Strings(got)
	if !slices.Equal(got, reviewed) {
		t.Errorf("etcdserverpb.KV has %v; the cache has reviewed %v: check that every new method that writes keeps the cache coherent", got, reviewed)
	}
}

// TestHitsMatchEtcd: a repeated serializable read is served from the cache and equals etcd's answer; linearizable
// reads (which have a path of their own: linearizable_test.go) and reads at a revision are never serializable hits.
func TestHitsMatchEtcd(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 30*time.Second)
	proxytest.Put(t, ctx, e.Direct, "k", "v1")
	req := &pb.RangeRequest{Key: []byte("k"), Serializable: true}
	first := get(t, ctx, e.Via, req) // a miss: nothing was read yet
	// The first miss is only remembered, the second's answer stored (admit.go). The put's own event may reach the
	// invalidation watch after a read filled the entry, and drop it: the next read fills it again. So: reads until
	// one is a hit.
	var hit *pb.RangeResponse
	proxytest.Eventually(t, 5*time.Second, func() bool {
		base := hits(t)
		hit = get(t, ctx, e.Via, req)
		return hits(t) == base+1
	}, "a repeated serializable read was never served from the cache")
	direct := get(t, ctx, e.Direct, req)
	if !proto.Equal(first, hit) || !proto.Equal(hit, direct) {
		t.Errorf("cached %v, first %v, etcd %v", hit, first, direct)
	}
	notCounted(t, ctx, e.Via, hits, "served from the cache", &pb.RangeRequest{Key: []byte("k")},
		&pb.RangeRequest{Key: []byte("k"), Serializable: true, Revision: 2})
}

// notCounted reads each of reqs twice through cc and fails if counter moved: what says what it counts.
func notCounted(t *testing.T, ctx context.Context, cc *grpc.ClientConn, counter func(*testing.T) float64, what string,
	reqs ...*pb.RangeRequest) {
	t.Helper()
	for _, r := range reqs {
		before := counter(t)
		get(t, ctx, cc, r)
		get(t, ctx, cc, r)
		if counter(t) != before {
			t.Errorf("%v was %s", r, what)
		}
	}
}

// TestWritesElsewhereInvalidate: writes made straight to etcd and through a second proxy, concurrently, reach
// serializable reads through this proxy within a bound; etcd's grpc-proxy stays stale indefinitely. Readers loop
// while the writers write; after each write is acknowledged, the time until this proxy shows it is measured.
func TestWritesElsewhereInvalidate(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 90*time.Second)
	other := e.AnotherProxy(t)
	readers, stop := make(chan struct{}), make(chan struct{})
	go func() { // readers keep the entries hot while the writers write
		defer close(readers)
		for {
			select {
			case <-stop:
				return
			default:
			}
			for _, k := range []string{"s/direct", "s/other"} {
				_, _ = pb.NewKVClient(e.Via).Range(ctx, &pb.RangeRequest{Key: []byte(k), Serializable: true})
			}
		}
	}()
	lags := make(chan time.Duration, 200)
	var wg sync.WaitGroup
	for _, w := range []struct {
		key string
		cc  *grpc.ClientConn
	}{{"s/direct", e.Direct}, {"s/other", other}} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := &pb.RangeRequest{Key: []byte(w.key), Serializable: true}
			for i := 0; i < 100; i++ {
				want := fmt.Sprint(i)
				if _, err := pb.NewKVClient(w.cc).Put(ctx, &pb.PutRequest{Key: []byte(w.key), Value: []byte(want)}); err != nil {
					t.Error(err)
					return
				}
				acked := time.Now()
				for {
					r, err := pb.NewKVClient(e.Via).Range(ctx, req)
					if err == nil && value(r) == want {
						break
					}
					if time.Since(acked) > 2*time.Second {
						t.Errorf("%s: write %d not visible through the proxy 2s after it was acknowledged", w.key, i)
						return
					}
				}
				lags <- time.Since(acked)
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-readers
	close(lags)
	var all []time.Duration
	for d := range lags {
		all = append(all, d)
	}
	if len(all) == 0 {
		t.Fatal("no write measured")
	}
	slices.Sort(all)
	t.Logf("staleness after %d writes elsewhere (direct and through a second proxy): p50 %v, p99 %v, max %v (bound asserted: 2s)",
		len(all), all[len(all)/2], all[len(all)*99/100], all[len(all)-1])
}

// TestWritesThroughProxy: a write through the proxy is visible to the next read through it, whatever it is:
// Put, DeleteRange, a nested Txn writing in its failure branch, LeaseRevoke of a lease with keys; and entries
// cached for a range ending in "\x00" are invalidated too (etcd's grpc-proxy misses all three of the last).
func TestWritesThroughProxy(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 30*time.Second)
	kv := pb.NewKVClient(e.Via)
	single := &pb.RangeRequest{Key: []byte("w/a"), Serializable: true}
	fromKey := &pb.RangeRequest{Key: []byte("w/"), RangeEnd: []byte{0}, Serializable: true}
	warm := func() { // twice: a key's second miss is stored (admit.go)
		for range 2 {
			get(t, ctx, e.Via, single)
			get(t, ctx, e.Via, fromKey)
		}
	}
	check := func(what, want string, wantCount int64) {
		t.Helper()
		if got := value(get(t, ctx, e.Via, single)); got != want {
			t.Errorf("after %s: w/a = %s, want %s", what, got, want)
		}
		if got := get(t, ctx, e.Via, fromKey).Count; got != wantCount {
			t.Errorf("after %s: %d keys from w/, want %d", what, got, wantCount)
		}
	}
	warm()
	proxytest.Put(t, ctx, e.Via, "w/a", "1")
	check("a Put", "1", 1)

	warm()
	nested := &pb.TxnRequest{
		Compare: []*pb.Compare{{Key: []byte("w/a"), Target: pb.Compare_VALUE, Result: pb.Compare_EQUAL,
			TargetUnion: &pb.Compare_Value{Value: []byte("no")}}},
		Failure: []*pb.RequestOp{{Request: &pb.RequestOp_RequestTxn{RequestTxn: &pb.TxnRequest{
			Success: []*pb.RequestOp{
				{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: []byte("w/a"), Value: []byte("2")}}},
				{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: []byte("w/b"), Value: []byte("2")}}},
			}}}}},
	}
	if _, err := kv.Txn(ctx, nested); err != nil {
		t.Fatal(err)
	}
	check("a nested Txn", "2", 2)

	lease, err := pb.NewLeaseClient(e.Via).LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, &pb.PutRequest{Key: []byte("w/c"), Value: []byte("3"), Lease: lease.ID}); err != nil {
		t.Fatal(err)
	}
	warm()
	check("a Put with a lease", "2", 3)
	if _, err := pb.NewLeaseClient(e.Via).LeaseRevoke(ctx, &pb.LeaseRevokeRequest{ID: lease.ID}); err != nil {
		t.Fatal(err)
	}
	check("LeaseRevoke", "2", 2)

	warm()
	if _, err := kv.DeleteRange(ctx, &pb.DeleteRangeRequest{Key: []byte("w/"), RangeEnd: []byte("w0")}); err != nil {
		t.Fatal(err)
	}
	check("a DeleteRange", "<none>", 0)
}

// TestCompaction: after a compaction, current-revision reads are still cached (etcd's grpc-proxy stops caching
// them for good), and a read at a compacted revision gets etcd's compacted error.
func TestCompaction(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 30*time.Second)
	for i := 0; i < 5; i++ {
		proxytest.Put(t, ctx, e.Direct, "c", fmt.Sprint(i))
	}
	if _, err := pb.NewKVClient(e.Via).Compact(ctx, &pb.CompactionRequest{Revision: 4}); err != nil {
		t.Fatal(err)
	}
	req := &pb.RangeRequest{Key: []byte("c"), Serializable: true}
	proxytest.Eventually(t, 5*time.Second, func() bool {
		get(t, ctx, e.Via, req)
		get(t, ctx, e.Via, req) // the second miss is stored (admit.go)
		base := hits(t)
		get(t, ctx, e.Via, req)
		return hits(t) == base+1
	}, "a current-revision read was not cached after a compaction")
	old := &pb.RangeRequest{Key: []byte("c"), Serializable: true, Revision: 2}
	_, viaErr := pb.NewKVClient(e.Via).Range(ctx, old)
	_, directErr := pb.NewKVClient(e.Direct).Range(ctx, old)
	if directErr == nil || status.Convert(viaErr).Message() != status.Convert(directErr).Message() ||
		status.Code(viaErr) != status.Code(directErr) {
		t.Errorf("read at a compacted revision: direct %v, proxy %v", directErr, viaErr)
	}
}

// enableAuth creates root (password r), alice (who may read [a, b)) and bob (who may read nothing), enables auth
// on cc's cluster, after putting a1.
func enableAuth(t *testing.T, ctx context.Context, cc *grpc.ClientConn) {
	t.Helper()
	proxytest.Put(t, ctx, cc, "a1", "secret")
	proxytest.EnableAuth(t, ctx, cc, "r",
		proxytest.User{Name: "alice", Password: "alice", ReadFrom: "a", ReadTo: "b"},
		proxytest.User{Name: "bob", Password: "bob"})
}

func as(t *testing.T, ctx context.Context, cc *grpc.ClientConn, user string) context.Context {
	t.Helper()
	return proxytest.As(t, ctx, cc, user, user)
}

// TestCredentials: the cache never hands one user's answer to another (etcd's grpc-proxy's cache key ignores the
// token): alice's read is cached for alice (answered from its bytes: raw.go), and bob, who may not read the key, gets etcd's refusal every time.
func TestCredentials(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 30*time.Second)
	enableAuth(t, ctx, e.Direct)
	req := &pb.RangeRequest{Key: []byte("a1"), Serializable: true}
	alice, bob := as(t, ctx, e.Via, "alice"), as(t, ctx, e.Via, "bob")
	directBob := as(t, ctx, e.Direct, "bob") // once: authenticating takes long enough to outlive TokenCheck
	// Until three rounds in a row give at least 2 of alice's 3 reads as hits: the auth poll flushes the cache once
	// it sees the auth changes above, which may fall between two rounds, and her key's first miss is only
	// remembered (admit.go). Bob is refused in every round.
	proxytest.Eventually(t, 10*time.Second, func() bool {
		base, raw := hits(t), rawHits(t)
		for i := 0; i < 3; i++ {
			r, err := pb.NewKVClient(e.Via).Range(alice, req)
			if err != nil || value(r) != "secret" {
				t.Fatalf("alice: %v, %v", r, err)
			}
			_, viaErr := pb.NewKVClient(e.Via).Range(bob, req)
			_, directErr := pb.NewKVClient(e.Direct).Range(directBob, req)
			if directErr == nil || status.Convert(viaErr).Message() != status.Convert(directErr).Message() {
				t.Fatalf("bob through the proxy: %v; directly: %v", viaErr, directErr)
			}
		}
		return hits(t) >= base+2 && rawHits(t) >= raw+2 // her token is in the key of the bytes too (raw.go)
	}, "alice's repeated reads were not served from the cache (2 hits in 3 reads)")
}

// TestNoWatchNoCache: with auth on and no credentials of its own, the proxy cannot watch the keyspace; the cache
// then serves nothing rather than answers it cannot vouch for.
func TestNoWatchNoCache(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{BeforeProxy: func(c *embedetcd.Cluster) {
		cc := proxytest.Conn(t, c.Members[0].ClientURL)
		enableAuth(t, proxytest.Timeout(t, 30*time.Second), cc)
	}})
	ctx := proxytest.Timeout(t, 30*time.Second)
	alice := as(t, ctx, e.Via, "alice")
	base := hits(t)
	for i := 0; i < 3; i++ {
		r, err := pb.NewKVClient(e.Via).Range(alice, &pb.RangeRequest{Key: []byte("a1"), Serializable: true})
		if err != nil || value(r) != "secret" {
			t.Fatalf("alice: %v, %v", r, err)
		}
	}
	if hits(t) != base {
		t.Errorf("the cache served %v hits while it could not watch the keyspace", hits(t)-base)
	}
}

// TestProxyCredentials: with auth on, the proxy's own user (etcdproxy --user) runs the keyspace watch, and the
// cache serves again, still per caller: alice's reads are cached for alice, bob is refused by etcd every time.
func TestProxyCredentials(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{User: "root", Password: "r", BeforeProxy: func(c *embedetcd.Cluster) {
		enableAuth(t, proxytest.Timeout(t, 30*time.Second), proxytest.Conn(t, c.Members[0].ClientURL))
	}})
	ctx := proxytest.Timeout(t, 30*time.Second)
	req := &pb.RangeRequest{Key: []byte("a1"), Serializable: true}
	alice, bob := as(t, ctx, e.Via, "alice"), as(t, ctx, e.Via, "bob")
	proxytest.Eventually(t, 10*time.Second, func() bool { return proxytest.Gauge(t, "etcdproxy_kvcache_live") == 1 },
		"the invalidation watch never went live with the proxy's credentials")
	proxytest.Eventually(t, 10*time.Second, func() bool { // as in TestCredentials
		base, raw := hits(t), rawHits(t)
		for i := 0; i < 3; i++ {
			if r, err := pb.NewKVClient(e.Via).Range(alice, req); err != nil || value(r) != "secret" {
				t.Fatalf("alice: %v, %v", r, err)
			}
			if _, err := pb.NewKVClient(e.Via).Range(bob, req); err == nil {
				t.Fatal("bob read a1 through the proxy")
			}
		}
		return hits(t) >= base+2 && rawHits(t) >= raw+2 // her token is in the key of the bytes too (raw.go)
	}, "alice's repeated reads were not served from the cache (2 hits in 3 reads)")
	// A write made elsewhere still reaches alice.
	proxytest.Put(t, proxytest.As(t, ctx, e.Direct, "root", "r"), e.Direct, "a1", "new")
	proxytest.Eventually(t, 2*time.Second, func() bool {
		r, err := pb.NewKVClient(e.Via).Range(alice, req)
		return err == nil && value(r) == "new"
	}, "a write made elsewhere did not reach the cache")
}

// TestPermissionRevoked: a cached answer does not outlive the caller's right to read it. Revoked through this
// proxy, the next read is refused; revoked elsewhere, reads are refused within about a second (the auth revision
// poll).
func TestPermissionRevoked(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{User: "root", Password: "r", BeforeProxy: func(c *embedetcd.Cluster) {
		enableAuth(t, proxytest.Timeout(t, 30*time.Second), proxytest.Conn(t, c.Members[0].ClientURL))
	}})
	ctx := proxytest.Timeout(t, 30*time.Second)
	req := &pb.RangeRequest{Key: []byte("a1"), Serializable: true}
	alice := as(t, ctx, e.Via, "alice")
	read := func() error {
		_, err := pb.NewKVClient(e.Via).Range(alice, req)
		return err
	}
	revoke := func(cc *grpc.ClientConn) {
		t.Helper()
		root := proxytest.As(t, ctx, cc, "root", "r")
		if _, err := pb.NewAuthClient(cc).RoleRevokePermission(root, &pb.AuthRoleRevokePermissionRequest{
			Role: "alice-reader", Key: []byte("a"), RangeEnd: []byte("b")}); err != nil {
			t.Fatal(err)
		}
	}
	grant := func() {
		t.Helper()
		root := proxytest.As(t, ctx, e.Direct, "root", "r")
		if _, err := pb.NewAuthClient(e.Direct).RoleGrantPermission(root, &pb.AuthRoleGrantPermissionRequest{Name: "alice-reader",
			Perm: &authpb.Permission{PermType: authpb.READ, Key: []byte("a"), RangeEnd: []byte("b")}}); err != nil {
			t.Fatal(err)
		}
	}
	warm := func() {
		t.Helper()
		proxytest.Eventually(t, 5*time.Second, func() bool {
			before := hits(t)
			return read() == nil && read() == nil && hits(t) > before
		}, "alice's read was never served from the cache")
	}

	warm()
	revoke(e.Via)
	if err := read(); err == nil {
		t.Error("alice still read a1 through the cache right after her permission was revoked through the proxy")
	}

	grant()
	warm()
	revoke(e.Direct)
	revoked := time.Now()
	proxytest.Eventually(t, 5*time.Second, func() bool { return read() != nil },
		"alice still read a1 through the cache 5s after her permission was revoked elsewhere")
	t.Logf("a permission revoked elsewhere stopped being served after %v", time.Since(revoked).Round(time.Millisecond))
}

// TestInvalidationSources: an entry dropped because of a write through this proxy counts as a local
// invalidation, one dropped because of a write made elsewhere as remote, whichever of the write's response and the
// watch's event reaches the proxy first.
func TestInvalidationSources(t *testing.T) {
	// A write through the proxy whose event the invalidation watch has not applied within WriteWait (the default
	// 1 s, which a loaded machine can exceed) flushes the cache instead, which counts as no local invalidation.
	// The attribution is tested here, not that wait.
	e := proxytest.Start(t, proxytest.Options{Proxy: func(c *proxy.Config) { c.Overrides.KVCache.WriteWait = 30 * time.Second }})
	ctx := proxytest.Timeout(t, 30*time.Second)
	source := func(s string) float64 {
		return proxytest.Gauge(t, "etcdproxy_kvcache_invalidations_total", "source", s)
	}
	req := &pb.RangeRequest{Key: []byte("src/a"), Serializable: true}
	cache := func() {
		t.Helper()
		proxytest.Eventually(t, 5*time.Second, func() bool {
			before := hits(t)
			get(t, ctx, e.Via, req)
			return hits(t) == before+1
		}, "src/a is not served from the cache")
	}
	kv := pb.NewKVClient(e.Via)
	proxytest.Put(t, ctx, e.Direct, "src/a", "v0")
	for i, w := range []func() error{
		func() error {
			_, err := kv.Put(ctx, &pb.PutRequest{Key: []byte("src/a"), Value: []byte("v1")})
			return err
		},
		func() error { _, err := kv.DeleteRange(ctx, &pb.DeleteRangeRequest{Key: []byte("src/a")}); return err },
		func() error { // the write inside a nested Txn, in the branch that runs
			inner := &pb.TxnRequest{Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestPut{
				RequestPut: &pb.PutRequest{Key: []byte("src/a"), Value: []byte("v3")}}}}}
			_, err := kv.Txn(ctx, &pb.TxnRequest{Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestTxn{RequestTxn: inner}}}})
			return err
		},
	} {
		cache()
		local0, remote0 := source("local"), source("remote")
		if err := w(); err != nil {
			t.Fatal(err)
		}
		if got := source("local") - local0; got != 1 {
			t.Errorf("write %d through the proxy: %v local invalidations, want 1", i, got)
		}
		if got := source("remote") - remote0; got != 0 {
			t.Errorf("write %d through the proxy: %v remote invalidations, want 0", i, got)
		}
	}

	cache()
	local0, remote0 := source("local"), source("remote")
	proxytest.Put(t, ctx, e.Direct, "src/a", "v4")
	proxytest.Eventually(t, 5*time.Second, func() bool { return source("remote")-remote0 == 1 },
		"a write straight to etcd: %v remote invalidations, want 1", source("remote")-remote0)
	if got := source("local") - local0; got != 0 {
		t.Errorf("a write straight to etcd: %v local invalidations, want 0", got)
	}
}

// TestEvictions: a cache over its size evicts entries, counts them, and its index keeps in step.
func TestEvictions(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{Proxy: func(c *proxy.Config) { c.Overrides.KVCache.MaxBytes = 4 << 10 }})
	ctx := proxytest.Timeout(t, 30*time.Second)
	const n = 200
	for i := range n {
		proxytest.Put(t, ctx, e.Direct, fmt.Sprintf("ev/%03d", i), "v")
	}
	before := proxytest.Gauge(t, "etcdproxy_kvcache_evictions_total")
	for i := range n {
		for range 2 { // a key's second miss is stored (admit.go)
			get(t, ctx, e.Via, &pb.RangeRequest{Key: []byte(fmt.Sprintf("ev/%03d", i)), Serializable: true})
		}
	}
	proxytest.Eventually(t, 5*time.Second, func() bool {
		return proxytest.Gauge(t, "etcdproxy_kvcache_evictions_total") > before
	}, "no eviction counted after %d distinct keys read twice into a 4 KiB cache", n)
	if got := proxytest.Gauge(t, "etcdproxy_kvcache_entries"); got >= n {
		t.Errorf("%v entries after %d keys read twice into a 4 KiB cache", got, n)
	}
	// Evicted keys are read again from etcd, with the right value.
	proxytest.Put(t, ctx, e.Direct, "ev/000", "new")
	proxytest.Eventually(t, 5*time.Second, func() bool {
		return value(get(t, ctx, e.Via, &pb.RangeRequest{Key: []byte("ev/000"), Serializable: true})) == "new"
	}, "ev/000 still reads its old value")
}

// TestIdleStopsAuthPoll: a proxy that serves no cacheable read stops reading etcd's auth revision (each read is a
// raft entry in etcd: a fleet of idle proxies would write them forever), and a permission revoked while it was
// idle is never served from the cache; reads start the poll again, and the cache serves again.
func TestIdleStopsAuthPoll(t *testing.T) {
	const poll = 50 * time.Millisecond
	e := proxytest.Start(t, proxytest.Options{User: "root", Password: "r",
		Proxy: func(c *proxy.Config) { c.Overrides.KVCache.AuthPoll = poll },
		BeforeProxy: func(c *embedetcd.Cluster) {
			enableAuth(t, proxytest.Timeout(t, 30*time.Second), proxytest.Conn(t, c.Members[0].ClientURL))
		}})
	ctx := proxytest.Timeout(t, 30*time.Second)
	polls := func() float64 { return proxytest.Gauge(t, "etcdproxy_kvcache_auth_polls_total") }
	req := &pb.RangeRequest{Key: []byte("a1"), Serializable: true}
	alice := as(t, ctx, e.Via, "alice")
	read := func() error {
		_, err := pb.NewKVClient(e.Via).Range(alice, req)
		return err
	}
	proxytest.Eventually(t, 5*time.Second, func() bool {
		before := hits(t)
		return read() == nil && read() == nil && hits(t) > before
	}, "alice's read was never served from the cache")

	// Idle: the polls stop (after 10 polls without a read), and stay stopped.
	proxytest.Eventually(t, 5*time.Second, func() bool {
		before := polls()
		time.Sleep(5 * poll) // an observation window of 5 poll periods, not a wait for a state
		return polls() == before
	}, "the auth poll never stopped while no read came")
	idleSince, idlePolls := time.Now(), polls()

	// A permission revoked elsewhere while idle: not served from the cache.
	root := proxytest.As(t, ctx, e.Direct, "root", "r")
	if _, err := pb.NewAuthClient(e.Direct).RoleRevokePermission(root, &pb.AuthRoleRevokePermissionRequest{
		Role: "alice-reader", Key: []byte("a"), RangeEnd: []byte("b")}); err != nil {
		t.Fatal(err)
	}
	if err := read(); err == nil {
		t.Fatal("alice read a1 through the cache after her permission was revoked while the proxy was idle")
	}
	t.Logf("idle for %v: %v auth polls", time.Since(idleSince).Round(time.Millisecond), polls()-idlePolls)

	// Reads start the poll again and the cache serves again.
	if _, err := pb.NewAuthClient(e.Direct).RoleGrantPermission(root, &pb.AuthRoleGrantPermissionRequest{Name: "alice-reader",
		Perm: &authpb.Permission{PermType: authpb.READ, Key: []byte("a"), RangeEnd: []byte("b")}}); err != nil {
		t.Fatal(err)
	}
	proxytest.Eventually(t, 5*time.Second, func() bool {
		before := hits(t)
		return read() == nil && read() == nil && hits(t) > before
	}, "the cache never served again after the proxy came back from idle")
	if polls() == idlePolls {
		t.Error("the cache served again without reading the auth revision")
	}
}

// TestHerdSharesOneRead: identical serializable reads that miss together (a herd on a key nobody has read, or
// after an invalidation) cost etcd about one read, not one each, and every one of them gets etcd's answer.
func TestHerdSharesOneRead(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 30*time.Second)
	etcdRanges := func() float64 { return proxytest.Gauge(t, "grpc_server_started_total", "grpc_method", "Range") }
	const n, rounds = 32, 3
	for round := range rounds {
		// A range of 500 keys of 1 KiB: its read takes long enough for the herd to gather while it is in flight.
		prefix := fmt.Sprintf("herd/%d/", round)
		for b := 0; b < 500; b += 125 {
			var ops []*pb.RequestOp
			for i := b; i < b+125; i++ {
				ops = append(ops, &pb.RequestOp{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{
					Key: fmt.Appendf(nil, "%s%03d", prefix, i), Value: bytes.Repeat([]byte("v"), 1024)}}})
			}
			if _, err := pb.NewKVClient(e.Direct).Txn(ctx, &pb.TxnRequest{Success: ops}); err != nil {
				t.Fatal(err)
			}
		}
		req := &pb.RangeRequest{Key: []byte(prefix), RangeEnd: []byte(fmt.Sprintf("herd/%d0", round)), Serializable: true}
		want := get(t, ctx, e.Direct, req)
		before := etcdRanges()
		start := make(chan struct{})
		answers := make([]*pb.RangeResponse, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				r, err := pb.NewKVClient(e.Via).Range(ctx, req)
				if err != nil {
					t.Error(err)
				}
				answers[i] = r
			}()
		}
		close(start)
		wg.Wait()
		reads := etcdRanges() - before
		for _, r := range answers {
			if !proto.Equal(r, want) {
				t.Fatalf("a read of the herd got %d keys, etcd's answer has %d", len(r.GetKvs()), len(want.Kvs))
			}
		}
		t.Logf("round %d: %d identical reads, %v reached etcd", round, n, reads)
		if reads > n/4 {
			t.Errorf("%d identical reads that missed together cost etcd %v reads", n, reads)
		}
	}
}

// rawCodec encodes requests as gRPC's proto codec does and hands replies over as their bytes (*[]byte).
type rawCodec struct{ encoding.CodecV2 }

func (c rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	if b, ok := v.(*[]byte); ok {
		*b = data.Materialize()
		return nil
	}
	return c.CodecV2.Unmarshal(data, v)
}

// rawRange reads req through cc and returns the bytes of the reply and the reply they decode to.
func rawRange(t *testing.T, ctx context.Context, cc *grpc.ClientConn, req *pb.RangeRequest) (
	[]byte, *pb.RangeResponse) {
	t.Helper()
	var b []byte
	if err := cc.Invoke(ctx, "/etcdserverpb.KV/Range", req, &b,
		grpc.ForceCodecV2(rawCodec{encoding.GetCodecV2(protoenc.Name)})); err != nil {
		t.Fatal(err)
	}
	r := &pb.RangeResponse{}
	if err := proto.Unmarshal(b, r); err != nil {
		t.Fatal(err)
	}
	return b, r
}

// TestHitBytes: a hit is sent as etcd's bytes: those of etcd's own answer while etcd has had no write since the
// entry was filled, then (answered at a newer revision) the encoding of etcd's answer with that revision.
func TestHitBytes(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 30*time.Second)
	for _, k := range []string{"hb/a", "hb/b", "hb/c"} {
		proxytest.Put(t, ctx, e.Direct, k, "v-"+k)
	}
	for _, req := range []*pb.RangeRequest{
		{Key: []byte("hb/a"), Serializable: true},
		{Key: []byte("hb/"), RangeEnd: []byte("hb0"), Serializable: true, Limit: 2},
		{Key: []byte("hb/"), RangeEnd: []byte("hb0"), Serializable: true, CountOnly: true},
	} {
		// The first read, a miss only remembered (admit.go), sends what gRPC makes of etcd's answer; the second, a
		// miss that fills the entry, the bytes of the encoding the entry keeps: etcd's, both.
		for _, what := range []string{"a first miss", "a miss that fills the entry"} {
			miss, _ := rawRange(t, ctx, e.Via, req)
			if direct, _ := rawRange(t, ctx, e.Direct, req); !bytes.Equal(miss, direct) {
				t.Errorf("%v: %s sent %x, etcd %x", req, what, miss, direct)
			}
		}
		cached(t, ctx, e.Via, req)
		before := hits(t)
		hit, _ := rawRange(t, ctx, e.Via, req)
		direct, _ := rawRange(t, ctx, e.Direct, req)
		if hits(t) != before+1 || !bytes.Equal(hit, direct) {
			t.Errorf("%v: a hit sent %x, etcd %x", req, hit, direct)
		}
		w := proxytest.Put(t, ctx, e.Via, "hb-other", "x") // not in the range: the entry stays
		before = hits(t)
		hit, r := rawRange(t, ctx, e.Via, req)
		_, d := rawRange(t, ctx, e.Direct, req)
		want, _ := proto.Marshal(r)
		if hits(t) != before+1 || r.Header.Revision < w || !bytes.Equal(hit, want) {
			t.Errorf("%v: after a write at %d elsewhere in the keyspace, a hit sent %x (%v): "+
				"want a hit at %d or later, encoded %x", req, w, hit, r, w, want)
		}
		d.Header.Revision = r.Header.Revision
		if !proto.Equal(r, d) {
			t.Errorf("%v: after a write elsewhere, a hit answered %v, etcd %v", req, r, d)
		}
	}
}
