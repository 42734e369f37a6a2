package kvcache_test

import (
	"context"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/gen"
	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/overrides/kvcache"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.uber.org/zap"
	"google.golang.org/grpc/metadata"
)

// BenchmarkHit: the cache's Range for a serializable read it holds, called as the gRPC server calls it (with the
// incoming metadata a clientv3 client sends), without the network and the server around it; serially, and from 16
// goroutines (the benchmark's C=16):
//
//	go test ./overrides/kvcache -run '^$' -bench Hit -benchmem
func BenchmarkHit(b *testing.B) {
	e := proxytest.Start(b, proxytest.Options{})
	ctx := proxytest.Timeout(b, 30*time.Second)
	proxytest.Put(b, ctx, e.Direct, "bench/hit", "v")
	cc := e.Upstream.ActiveConnection()
	k := kvcache.New(gen.NewServices(cc).KV, cc, zap.NewNop(), kvcache.Options{MaxBytes: 1 << 20})
	defer k.Close()
	proxytest.Eventually(b, 10*time.Second, k.Live, "the cache never went live")
	in := metadata.NewIncomingContext(ctx, metadata.Pairs(":authority", "127.0.0.1:2379",
		"content-type", "application/grpc", "user-agent", "etcd-client/v3.7.3 grpc-go/1.83.2"))
	req := &pb.RangeRequest{Key: []byte("bench/hit"), Serializable: true}
	var first *pb.RangeResponse
	proxytest.Eventually(b, 10*time.Second, func() bool { // the key's second miss is stored, then hits return it
		resp, err := k.Range(in, req)
		if err != nil {
			b.Fatal(err)
		}
		hit := resp == first
		first = resp
		return hit
	}, "the read was never served from the cache")
	hit := func(ctx context.Context) bool {
		resp, err := k.Range(ctx, req)
		if err != nil || resp != first {
			b.Errorf("not a hit: %v, %v", resp, err)
			return false
		}
		return true
	}
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		report := proxytest.CPUPerOp(b)
		for b.Loop() {
			if !hit(in) {
				return
			}
		}
		report()
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.SetParallelism(max(1, 16/runtime.GOMAXPROCS(0)))
		report := proxytest.CPUPerOp(b)
		b.RunParallel(func(p *testing.PB) {
			for p.Next() {
				if !hit(in) {
					return
				}
			}
		})
		report()
	})
}

// BenchmarkColdMiss: the cache's Range for serializable reads that are never read again (the benchmark's "cold
// serializable get"): every read is a distinct request (of one key, with a distinct limit, so that etcd's work is
// the same for each), called as in BenchmarkHit; "relay" sends the same reads straight to the passthrough (the
// cache off). The time and allocations include etcd's (embedded, in this process) and the gRPC call to it:
//
//	go test ./overrides/kvcache -run '^$' -bench ColdMiss -benchmem
func BenchmarkColdMiss(b *testing.B) {
	e := proxytest.Start(b, proxytest.Options{})
	ctx := proxytest.Timeout(b, 120*time.Second)
	proxytest.Put(b, ctx, e.Direct, "bench/cold", strings.Repeat("v", 100))
	cc := e.Upstream.ActiveConnection()
	base := gen.NewServices(cc).KV
	k := kvcache.New(base, cc, zap.NewNop(), kvcache.Options{MaxBytes: 64 << 20})
	defer k.Close()
	proxytest.Eventually(b, 10*time.Second, k.Live, "the cache never went live")
	in := metadata.NewIncomingContext(ctx, metadata.Pairs(":authority", "127.0.0.1:2379",
		"content-type", "application/grpc", "user-agent", "etcd-client/v3.7.3 grpc-go/1.83.2"))
	var limit int64
	for _, s := range []struct {
		name string
		kv   pb.KVServer
	}{{"cache", k}, {"relay", base}} {
		b.Run(s.name, func(b *testing.B) {
			b.ReportAllocs()
			report := proxytest.CPUPerOp(b)
			for b.Loop() {
				limit++
				req := &pb.RangeRequest{Key: []byte("bench/cold"), Serializable: true, Limit: limit}
				if _, err := s.kv.Range(in, req); err != nil {
					b.Fatal(err)
				}
			}
			report()
		})
	}
}
