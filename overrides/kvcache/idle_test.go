package kvcache_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/proxy"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
)

// etcdWatchStreams is the number of Watch streams open on etcd (gRPC's server metrics, which the in-process
// members register).
func etcdWatchStreams(t *testing.T) float64 {
	labels := []string{"grpc_service", "etcdserverpb.Watch", "grpc_method", "Watch"}
	return proxytest.Gauge(t, "grpc_server_started_total", labels...) - proxytest.Gauge(t, "grpc_server_handled_total", labels...)
}

// TestWatchRunsWhileRead: with the default --kv-cache-watch-idle, the invalidation watch runs only while the cache
// is read. A proxy that has served no cacheable read holds no keyspace watch (and is healthy); the first
// serializable read starts it, and the cache then serves and stays coherent with writes made elsewhere; once reads
// stop it stops, the proxy still healthy; a write made while it is stopped is never answered stale; the next read
// starts it again, as does a linearizable read.
func TestWatchRunsWhileRead(t *testing.T) {
	const idle = 400 * time.Millisecond
	e := proxytest.Start(t, proxytest.Options{Proxy: func(c *proxy.Config) { c.Overrides.KVCache.WatchIdle = idle }})
	ctx := proxytest.Timeout(t, 60*time.Second)
	kv := pb.NewKVClient(e.Direct)
	put := func(v string) {
		t.Helper()
		if _, err := kv.Put(ctx, &pb.PutRequest{Key: []byte("idle/k"), Value: []byte(v)}); err != nil {
			t.Fatal(err)
		}
	}
	req := &pb.RangeRequest{Key: []byte("idle/k"), Serializable: true}
	read := func() string { return value(get(t, ctx, e.Via, req)) }
	// served reports whether reads of idle/k come from the cache with value v: a few reads, one of them a hit.
	served := func(v string) bool {
		before := hits(t)
		for range 3 {
			if got := read(); got != v {
				t.Fatalf("read %q through the proxy, want %q", got, v)
			}
		}
		return hits(t) > before
	}
	put("v1")
	// Before any cacheable read: no keyspace watch. The watch streams open on etcd now are the leader probe's;
	// none may appear while nothing is read.
	base := etcdWatchStreams(t)
	time.Sleep(2 * idle) // an observation window, not a wait for a state
	if got := etcdWatchStreams(t); got != base {
		t.Fatalf("%v watch streams on etcd before any read, want %v: the invalidation watch started unread", got, base)
	}
	if !e.Proxy.Steady() {
		t.Fatal("a proxy whose cache has not been read yet is not healthy")
	}

	// startedBy: a read (of value v, at once: nothing older is cached) starts the watch; the cache then serves v,
	// and a write elsewhere (next) invalidates it.
	startedBy := func(when, v, next string) {
		t.Helper()
		if got := read(); got != v {
			t.Fatalf("read %s: %q, want %q", when, got, v)
		}
		proxytest.Eventually(t, 5*time.Second, func() bool { return etcdWatchStreams(t) == base+1 },
			"the read %s did not start the invalidation watch", when)
		proxytest.Eventually(t, 5*time.Second, func() bool { return served(v) }, "the cache never served %s", when)
		put(next)
		proxytest.Eventually(t, 5*time.Second, func() bool { return read() == next },
			"a write elsewhere was not seen while the watch ran, %s", when)
	}

	// The first read starts it; the cache serves, and a write elsewhere invalidates.
	startedBy("first", "v1", "v2")

	// No read: it stops, and the proxy stays healthy.
	proxytest.Eventually(t, 10*time.Second, func() bool { return etcdWatchStreams(t) == base },
		"the invalidation watch did not stop once reads stopped")
	if !e.Proxy.Steady() {
		t.Fatal("a proxy whose watch stopped for want of reads is not healthy")
	}

	// A write while stopped is read back at once (nothing cached from before is served), and the read starts the
	// watch again: the cache serves again, coherent.
	put("v3")
	startedBy("after a write made while the watch was stopped", "v3", "v4")

	// A linearizable read starts it too.
	proxytest.Eventually(t, 10*time.Second, func() bool { return etcdWatchStreams(t) == base },
		"the invalidation watch did not stop the second time")
	if got := value(get(t, ctx, e.Via, &pb.RangeRequest{Key: []byte("idle/k")})); got != "v4" {
		t.Fatalf("linearizable read: %q, want v4", got)
	}
	proxytest.Eventually(t, 5*time.Second, func() bool { return etcdWatchStreams(t) == base+1 },
		"a linearizable read did not start the stopped watch")
}

// TestWatchStopsAndStartsUnderWrites: a client that writes a counter through the proxy and reads it back
// (serializable, through the cache) with pauses longer and shorter than the idle time, so that the watch stops and
// starts again and again between its writes, always reads its own last write or newer, and never an older value.
func TestWatchStopsAndStartsUnderWrites(t *testing.T) {
	const idle = 100 * time.Millisecond
	e := proxytest.Start(t, proxytest.Options{Proxy: func(c *proxy.Config) { c.Overrides.KVCache.WatchIdle = idle }})
	ctx := proxytest.Timeout(t, 60*time.Second)
	kv := pb.NewKVClient(e.Via)
	base := etcdWatchStreams(t)
	req := &pb.RangeRequest{Key: []byte("idle/n"), Serializable: true}
	restarts := 0
	pauses := []time.Duration{0, 10 * time.Millisecond, 3 * idle, 0, 2 * idle, 20 * time.Millisecond}
	for i := 1; i <= 60; i++ {
		before := etcdWatchStreams(t) > base // after the pause: stopped if it was long enough
		if _, err := kv.Put(ctx, &pb.PutRequest{Key: req.Key, Value: []byte(fmt.Sprint(i))}); err != nil {
			t.Fatal(err)
		}
		for j := 0; j < 3; j++ { // the first may start the watch; the next are stored, then hit
			if got := value(get(t, ctx, e.Via, req)); got != fmt.Sprint(i) {
				t.Fatalf("write %d: read %s back through the proxy", i, got)
			}
		}
		if !before {
			restarts++
			proxytest.Eventually(t, 5*time.Second, func() bool { return etcdWatchStreams(t) > base },
				"a read did not start the stopped watch")
		}
		time.Sleep(pauses[i%len(pauses)])
	}
	if restarts < 5 {
		t.Errorf("the watch stopped and started again %d times in 60 writes with pauses of up to %v; want at least 5 "+
			"(idle %v)", restarts, 3*idle, idle)
	}
}
