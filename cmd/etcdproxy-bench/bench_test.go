package main

// Go benchmarks of etcdproxy's hot paths, each run directly against etcd and through the proxy, in one process:
//
//	go test ./cmd/etcdproxy-bench -run '^$' -bench . -benchmem
//
// etcd (embedded), the proxy and the client all run in the test process, so ns/op, B/op and allocs/op count all
// three; the difference between the etcdproxy and the direct sub-benchmark is what the proxy adds.

import (
	"context"
	"fmt"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/cmd/etcdproxy-bench/internal/floor"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/overrides/kvcache"
	"github.com/etcdproxy/etcdproxy/proxy"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

type via struct {
	name string
	cc   *grpc.ClientConn
}

func targetsOf(env *proxytest.Env) []via {
	return []via{{direct, env.Direct}, {etcdproxy, env.Via}}
}

// withFloor is targetsOf with floorrelay (the thinnest gRPC-Go relay, internal/floor) in the same process, in front
// of the same member, for the forwarded calls: what etcdproxy adds to a call is its sub-benchmark's ns/op,
// allocs/op and cpu-µs/op less floorrelay's, on the same machine in the same run.
func withFloor(b *testing.B, env *proxytest.Env) []via {
	b.Helper()
	up, err := floor.Dial(strings.TrimPrefix(env.Cluster.Endpoints()[0], "http://"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = up.Close() })
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := floor.NewServer(up, nil)
	go func() { _ = srv.Serve(l) }()
	b.Cleanup(srv.Stop)
	cc, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = cc.Close() })
	return []via{{direct, env.Direct}, {floorRelay, cc}, {etcdproxy, env.Via}}
}

// BenchmarkUnaryPut: one Put at a time (unary forwarding of a write).
func BenchmarkUnaryPut(b *testing.B) {
	env := proxytest.Start(b, proxytest.Options{})
	for _, tc := range withFloor(b, env) {
		b.Run(tc.name, func(b *testing.B) {
			kv := pb.NewKVClient(tc.cc)
			req := &pb.PutRequest{Key: []byte("bench/put"), Value: value}
			b.ReportAllocs()
			report := proxytest.CPUPerOp(b)
			for b.Loop() {
				if _, err := kv.Put(context.Background(), req); err != nil {
					b.Fatal(err)
				}
			}
			report()
		})
	}
}

// noCache runs the proxy without its read cache, so that a serializable Range measures forwarding.
func noCache(c *proxy.Config) { c.Overrides.KVCache = kvcache.Options{} }

// BenchmarkUnaryRange: one serializable Range of one 256-byte key at a time, the read cache off (unary forwarding
// where etcd's own work is smallest, so the hop shows most).
func BenchmarkUnaryRange(b *testing.B) {
	env := proxytest.Start(b, proxytest.Options{Proxy: noCache})
	put(b, env, "bench/get")
	for _, tc := range withFloor(b, env) {
		b.Run(tc.name, func(b *testing.B) {
			kv := pb.NewKVClient(tc.cc)
			req := &pb.RangeRequest{Key: []byte("bench/get"), Serializable: true}
			b.ReportAllocs()
			report := proxytest.CPUPerOp(b)
			for b.Loop() {
				if _, err := kv.Range(context.Background(), req); err != nil {
					b.Fatal(err)
				}
			}
			report()
		})
	}
}

// BenchmarkUnaryRangeParallel: the same Range from GOMAXPROCS goroutines sharing one connection, the cache off.
func BenchmarkUnaryRangeParallel(b *testing.B) {
	env := proxytest.Start(b, proxytest.Options{Proxy: noCache})
	put(b, env, "bench/get")
	for _, tc := range withFloor(b, env) {
		b.Run(tc.name, func(b *testing.B) {
			kv := pb.NewKVClient(tc.cc)
			b.ReportAllocs()
			b.RunParallel(func(p *testing.PB) {
				req := &pb.RangeRequest{Key: []byte("bench/get"), Serializable: true}
				for p.Next() {
					if _, err := kv.Range(context.Background(), req); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// BenchmarkCacheHit: the serializable Range of BenchmarkUnaryRange with the read cache on: through the proxy every
// read after the first is a cache hit (the cache lookup's hot path).
func BenchmarkCacheHit(b *testing.B) {
	env := proxytest.Start(b, proxytest.Options{})
	put(b, env, "bench/get")
	for _, tc := range targetsOf(env) {
		b.Run(tc.name, func(b *testing.B) {
			kv := pb.NewKVClient(tc.cc)
			req := &pb.RangeRequest{Key: []byte("bench/get"), Serializable: true}
			b.ReportAllocs()
			report := proxytest.CPUPerOp(b)
			for b.Loop() {
				if _, err := kv.Range(context.Background(), req); err != nil {
					b.Fatal(err)
				}
			}
			report()
		})
	}
}

// BenchmarkCacheHitParallel: the cache hit of BenchmarkCacheHit from 16 goroutines sharing one connection (the
// benchmark's C=16). Here and in BenchmarkCacheHit, cpu-µs/op is the process's CPU time per op: client, proxy and
// etcd together (etcd idles through the proxy: every read is a hit), the work of every goroutine counted, which
// ns/op misses; on a busy machine it still varies by a tenth from run to run, so compare interleaved runs.
func BenchmarkCacheHitParallel(b *testing.B) {
	env := proxytest.Start(b, proxytest.Options{})
	put(b, env, "bench/get")
	for _, tc := range targetsOf(env) {
		b.Run(tc.name, func(b *testing.B) {
			kv := pb.NewKVClient(tc.cc)
			b.ReportAllocs()
			b.SetParallelism(max(1, 16/runtime.GOMAXPROCS(0)))
			report := proxytest.CPUPerOp(b)
			b.RunParallel(func(p *testing.PB) {
				req := &pb.RangeRequest{Key: []byte("bench/get"), Serializable: true}
				for p.Next() {
					if _, err := kv.Range(context.Background(), req); err != nil {
						b.Error(err)
						return
					}
				}
			})
			report()
		})
	}
}

// BenchmarkWatchPump: one Watch stream with 100 watchers of one key; an op is one Put (straight to etcd) and the
// receipt of its 100 events, so the proxy pumps 100 responses per op. ns/event is reported too.
func BenchmarkWatchPump(b *testing.B) {
	const watchers = 100
	env := proxytest.Start(b, proxytest.Options{})
	writer := pb.NewKVClient(env.Direct)
	for _, tc := range targetsOf(env) {
		b.Run(tc.name, func(b *testing.B) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			ws, err := pb.NewWatchClient(tc.cc).Watch(ctx)
			if err != nil {
				b.Fatal(err)
			}
			key := []byte("bench/pump/" + tc.name)
			for range watchers {
				if err := ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{
					CreateRequest: &pb.WatchCreateRequest{Key: key}}}); err != nil {
					b.Fatal(err)
				}
			}
			for created := 0; created < watchers; {
				resp, err := ws.Recv()
				if err != nil {
					b.Fatal(err)
				}
				if resp.Created {
					created++
				}
			}
			req := &pb.PutRequest{Key: key, Value: value}
			b.ReportAllocs()
			start, n := time.Now(), 0
			for b.Loop() {
				n++
				if _, err := writer.Put(ctx, req); err != nil {
					b.Fatal(err)
				}
				for got := 0; got < watchers; {
					resp, err := ws.Recv()
					if err != nil {
						b.Fatal(err)
					}
					got += len(resp.Events)
				}
			}
			b.ReportMetric(float64(time.Since(start).Nanoseconds())/float64(n*watchers), "ns/event")
		})
	}
}

func put(b *testing.B, env *proxytest.Env, key string) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := pb.NewKVClient(env.Direct).Put(ctx, &pb.PutRequest{Key: []byte(key), Value: value}); err != nil {
		b.Fatal(fmt.Errorf("put %s: %w", key, err))
	}
}
