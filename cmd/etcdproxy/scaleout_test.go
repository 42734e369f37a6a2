package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/embedetcd"
	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/naming/endpoints"
	"go.etcd.io/etcd/client/v3/naming/resolver"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// TestScaleOut: three proxies on one three-member etcd, registered under one prefix, as a fleet runs them. Clients
// find them with etcd's gRPC resolver (etcd:///PREFIX) or by syncing their endpoints from MemberList. One proxy is
// killed (SIGKILL): it leaves the set within its TTL, unary calls through the resolver keep succeeding, a watcher
// that was on it resumes on another proxy from its last revision with etcd's history exactly (no gap, no
// duplicate), a lease kept alive through it stays alive through another, and the syncing client stays on proxies.
// Another is stopped (SIGTERM): it leaves the set at once.
func TestScaleOut(t *testing.T) {
	c, err := embedetcd.Start(embedetcd.Options{Members: 3, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	ctx := proxytest.Timeout(t, 120*time.Second)
	const prefix, ttl = "/fleet", 2
	var proxies []*running
	for range 3 {
		proxies = append(proxies, runProxy(t, t.TempDir(), c.Endpoints(), func(listen string) []string {
			return []string{"--advertise-client-url", listen, "--resolver-prefix", prefix,
				"--resolver-ttl", fmt.Sprint(ttl)}
		}))
	}
	var all []string
	for _, p := range proxies {
		all = append(all, p.listen)
	}
	slices.Sort(all)
	etcd := proxytest.Client(t, c.Members[0].ClientURL)
	em, err := endpoints.NewManager(etcd, prefix)
	if err != nil {
		t.Fatal(err)
	}
	registered := func() []string {
		eps, err := em.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var addrs []string
		for _, ep := range eps {
			addrs = append(addrs, ep.Addr)
		}
		slices.Sort(addrs)
		return addrs
	}
	proxytest.Eventually(t, 10*time.Second, func() bool { return slices.Equal(registered(), all) },
		"the three proxies are not registered under %s: %v", prefix, registered())

	// Clients. A connection through etcd's resolver, balanced over the live proxies; a clientv3 client that
	// knows only the first proxy and syncs its endpoints from MemberList.
	b, err := resolver.NewBuilder(etcd)
	if err != nil {
		t.Fatal(err)
	}
	fleet, err := grpc.NewClient("etcd:///"+prefix, grpc.WithResolvers(b),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(`{"loadBalancingPolicy":"round_robin"}`))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fleet.Close() })
	victim := proxies[0]
	// The syncing client's watch and lease keepalive streams open on the only endpoint it knows at first, the
	// victim, and stay there when it learns the others.
	syncing := proxytest.Client(t, victim.listen, func(cfg *clientv3.Config) { cfg.AutoSyncInterval = time.Second })
	start, err := etcd.Put(ctx, "fleet/w", "0")
	if err != nil {
		t.Fatal(err)
	}
	watched := watchAll(ctx, syncing, "fleet/w", start.Header.Revision+1)
	lease, err := syncing.Grant(ctx, 5)
	if err != nil {
		t.Fatal(err)
	}
	ka, err := syncing.KeepAlive(ctx, lease.ID)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for range ka { // drained, as clientv3 asks
		}
	}()
	if _, err := etcd.Put(ctx, "fleet/leased", "x", clientv3.WithLease(lease.ID)); err != nil {
		t.Fatal(err)
	}
	proxytest.Eventually(t, 10*time.Second, func() bool { return slices.Equal(sorted(syncing.Endpoints()), all) },
		"a client syncing from MemberList has endpoints %v, want the proxies %v", syncing.Endpoints(), all)
	for _, m := range []string{"etcdproxy_watch_client_watchers", "etcdproxy_lease_keepalive_client_streams"} {
		if got := gauge(t, victim.listen, m); got != 1 {
			t.Fatalf("%s on the proxy to be killed is %v, want 1: the test's streams are not on it", m, got)
		}
	}

	// Writes through the resolver, before, during and after the kill.
	w := startWriter(ctx, pb.NewKVClient(fleet), "fleet/w")
	time.Sleep(500 * time.Millisecond)
	killed := time.Now()
	victim.kill(t)
	proxytest.Eventually(t, 10*time.Second, func() bool { return !slices.Contains(registered(), victim.listen) },
		"the killed proxy was still registered 10s after the kill")
	left := time.Now()
	// etcd expires a lease within about half a second of its TTL; the rest is slack for a loaded machine.
	if took := left.Sub(killed); took > (ttl+3)*time.Second {
		t.Errorf("the killed proxy left the set %v after the kill, over its TTL of %ds", took, ttl)
	}
	time.Sleep(6 * time.Second) // past the client lease's TTL (5 s): only keepalives through another proxy keep it
	puts, failed := w.stop()
	if puts < 50 {
		t.Fatalf("only %d puts through the resolver in %v", puts, time.Since(killed))
	}
	if failed > 0 {
		t.Errorf("%d of %d puts through the resolver failed after retrying (the fleet kept two proxies)", failed, puts)
	}
	t.Logf("%d puts through the resolver, %d attempts failed (Unavailable, in flight on the killed proxy)", puts, w.unavailable.Load())

	// The lease kept alive through the killed proxy is alive, its key still there.
	if r, err := etcd.Get(ctx, "fleet/leased"); err != nil || len(r.Kvs) != 1 {
		t.Fatalf("the lease kept alive through the killed proxy ended: %v, %v", r, err)
	}
	// The watcher saw exactly etcd's history of the key.
	end, err := etcd.Get(ctx, "fleet/w")
	if err != nil {
		t.Fatal(err)
	}
	want := history(t, ctx, etcd, "fleet/w", start.Header.Revision+1, end.Header.Revision)
	// The put in flight when the writer stopped was cancelled on the client only: etcd may still apply it, after
	// the Get above, and the watcher then sees it too. Events past the Get's revision are not compared.
	got := slices.DeleteFunc(watched.until(t, end.Header.Revision), func(rev int64) bool { return rev > end.Header.Revision })
	if !slices.Equal(got, want) {
		t.Fatalf("the watcher moved off the killed proxy saw revisions %v..., want etcd's %v... (%d and %d events)",
			head(got), head(want), len(got), len(want))
	}
	var alive []string
	for _, p := range proxies[1:] {
		alive = append(alive, p.listen)
	}
	alive = sorted(alive)
	proxytest.Eventually(t, 10*time.Second, func() bool { return slices.Equal(sorted(syncing.Endpoints()), alive) },
		"after the kill, the syncing client has endpoints %v, want the live proxies %v", syncing.Endpoints(), alive)

	// SIGTERM: the proxy deregisters before it stops.
	stopped := proxies[1]
	stopped.stop(t)
	if got := registered(); slices.Contains(got, stopped.listen) {
		t.Fatalf("a proxy stopped with SIGTERM is still registered once it exited: %v", got)
	}
}

// gauge reads an unlabelled gauge from the proxy's /metrics at addr.
func gauge(t *testing.T, addr, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(body)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	t.Fatalf("no %s in the metrics of %s", name, addr)
	return 0
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

func head(s []int64) []int64 { return s[:min(len(s), 5)] }

// writer puts increasing values to a key until stopped, retrying an attempt that fails with Unavailable (a call
// in flight on a proxy that died) up to 5 times.
type writer struct {
	cancel      context.CancelFunc
	done        chan struct{}
	puts        int
	failed      int
	unavailable atomic.Int64
}

func startWriter(ctx context.Context, kv pb.KVClient, key string) *writer {
	ctx, cancel := context.WithCancel(ctx)
	w := &writer{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for i := 1; ctx.Err() == nil; i++ {
			var err error
			for range 5 {
				cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
				_, err = kv.Put(cctx, &pb.PutRequest{Key: []byte(key), Value: fmt.Appendf(nil, "%d", i)}, grpc.WaitForReady(true))
				ccancel()
				if status.Code(err) != codes.Unavailable {
					break
				}
				w.unavailable.Add(1)
			}
			if ctx.Err() != nil {
				return
			}
			w.puts++
			if err != nil {
				w.failed++
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	return w
}

func (w *writer) stop() (puts, failed int) {
	w.cancel()
	<-w.done
	return w.puts, w.failed
}

// watched collects the mod revisions of the events of one clientv3 watch.
type watched struct {
	mu   sync.Mutex
	revs []int64
	err  error
}

func watchAll(ctx context.Context, c *clientv3.Client, key string, from int64) *watched {
	w := &watched{}
	wch := c.Watch(ctx, key, clientv3.WithRev(from))
	go func() {
		for wr := range wch {
			w.mu.Lock()
			if err := wr.Err(); err != nil {
				w.err = err
			}
			for _, ev := range wr.Events {
				w.revs = append(w.revs, ev.Kv.ModRevision)
			}
			w.mu.Unlock()
		}
	}()
	return w
}

// until waits up to 10 s for an event at rev or later, and returns the revisions seen.
func (w *watched) until(t *testing.T, rev int64) []int64 {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		w.mu.Lock()
		revs, err := slices.Clone(w.revs), w.err
		w.mu.Unlock()
		if err != nil {
			t.Fatalf("the watch failed: %v", err)
		}
		if len(revs) > 0 && revs[len(revs)-1] >= rev || time.Now().After(deadline) {
			return revs
		}
	}
}

// history is the mod revisions of key's events from etcd itself, from through to.
func history(t *testing.T, ctx context.Context, c *clientv3.Client, key string, from, to int64) []int64 {
	t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var revs []int64
	for wr := range c.Watch(ctx, key, clientv3.WithRev(from)) {
		if err := wr.Err(); err != nil {
			t.Fatal(err)
		}
		for _, ev := range wr.Events {
			if ev.Type != mvccpb.PUT {
				t.Fatalf("unexpected event %v", ev)
			}
			revs = append(revs, ev.Kv.ModRevision)
			if ev.Kv.ModRevision >= to {
				return revs
			}
		}
	}
	t.Fatal("etcd's watch ended")
	return nil
}
