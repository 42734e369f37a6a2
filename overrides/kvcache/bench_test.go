package kvcache_test

import (
	"bytes"
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/gen"
	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/overrides/kvcache"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.uber.org/zap"
	"google.golang.org/grpc/encoding"
	protoenc "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
)

// BenchmarkHit: the cache's Range for a serializable read it holds, called as the gRPC server calls it (with the
// incoming metadata a clientv3 client sends), without the network and the server around it; serially, and from 16
// goroutines (the benchmark's C=16); and, serially, as RawHit answers it from the request's bytes:
//
//	go test ./overrides/kvcache -run '^$' -bench Hit -benchmem
func BenchmarkHit(b *testing.B) {
	e := proxytest.Start(b, proxytest.Options{})
	ctx := proxytest.Timeout(b, 30*time.Second)
	proxytest.Put(b, ctx, e.Direct, "bench/hit", "v")
	cc := e.Upstream.ActiveConnection()
	k := kvcache.New(gen.NewServices(cc).KV, cc, zap.NewNop(), kvcache.Options{MaxBytes: 1 << 20, WatchIdle: -1})
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
	}) // raw: the same hit answered from the request's bytes (RawHit), as the server's Range handler tries first.
	enc, err := proto.Marshal(req)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("raw", func(b *testing.B) {
		b.ReportAllocs()
		report := proxytest.CPUPerOp(b)
		for b.Loop() {
			if _, _, ok := k.RawHit(in, enc); !ok {
				b.Fatal("not answered from the request's bytes")
			}
		}
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
	k := kvcache.New(base, cc, zap.NewNop(), kvcache.Options{MaxBytes: 64 << 20, WatchIdle: -1})
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

// BenchmarkWatchDecode: decoding the invalidation watch's typical response, one put (a 100-byte key and a value of
// 256 bytes or 4 KiB, header and revisions as etcd sends them), as gRPC hands it to its codec: by gRPC's proto codec
// (what the watch used to do) and by the watch's own (kvcache.SkimCodec), which skips the value.
//
//	go test ./overrides/kvcache -run '^$' -bench WatchDecode -benchmem
func BenchmarkWatchDecode(b *testing.B) {
	for _, size := range []int{256, 4096} {
		rev := int64(1234567)
		resp := &pb.WatchResponse{
			Header: &pb.ResponseHeader{ClusterId: 14841639068965178418, MemberId: 10276657743932975437, Revision: rev, RaftTerm: 2},
			Events: []*mvccpb.Event{{Kv: &mvccpb.KeyValue{Key: []byte("/registry/pods/" + strings.Repeat("k", 85)),
				Value: bytes.Repeat([]byte("v"), size), CreateRevision: rev - 10, ModRevision: rev, Version: 3}}},
		}
		enc, err := proto.Marshal(resp)
		if err != nil {
			b.Fatal(err)
		}
		for _, c := range []struct {
			name  string
			codec encoding.CodecV2
		}{{"proto", encoding.GetCodecV2(protoenc.Name)}, {"skim", kvcache.SkimCodec()}} {
			b.Run(fmt.Sprintf("value=%d/codec=%s", size, c.name), func(b *testing.B) {
				b.ReportAllocs()
				data := mem.BufferSlice{mem.SliceBuffer(enc)}
				report := proxytest.CPUPerOp(b)
				for b.Loop() {
					m := new(pb.WatchResponse)
					if err := c.codec.Unmarshal(data, m); err != nil || len(m.Events) != 1 {
						b.Fatal(err)
					}
				}
				report()
			})
		}
	}
}
