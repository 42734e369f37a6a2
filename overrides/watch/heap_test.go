package watch_test

import (
	"context"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
)

// BenchmarkWatcherHeap: the live heap one watcher of a shared prefix takes, 50,000 of them over 500 streams (100 a
// stream, as in the bench's W=10000 prefix workload, whose peak RSS has a target against etcd grpc-proxy's): the
// process's live heap after a collection, with the watchers created and nothing sent, less what it was before, per
// watcher. It counts the client's side of the streams too, and etcd's, which runs in the process; so many watchers
// keep the noise of what those allocate meanwhile to some 15 B a watcher. The metric is the last round's, and the
// first carries the process's one-time set-up (326 B with -benchtime 1x): run it with 2x or more. Measured (2x):
// 181-194 B, and 151-178 with the watchers of a range sharing its strings (hub.attach).
func BenchmarkWatcherHeap(b *testing.B) {
	const watchers, streams = 50000, 500
	env := proxytest.Start(b, proxytest.Options{})
	live := func() uint64 {
		var ms runtime.MemStats
		runtime.GC()
		runtime.GC()
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	for b.Loop() {
		before := live()
		ctx, cancel := context.WithCancel(context.Background())
		var created atomic.Int64
		done := make(chan struct{})
		var wg sync.WaitGroup
		for range streams {
			ws, err := pb.NewWatchClient(env.Via).Watch(ctx)
			if err != nil {
				b.Fatal(err)
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					r, err := ws.Recv()
					if err != nil {
						return
					}
					if r.Created && created.Add(1) == watchers {
						close(done)
					}
				}
			}()
			for range watchers / streams {
				req := &pb.WatchCreateRequest{Key: []byte("heap/"), RangeEnd: []byte("heap0")}
				if err := ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: req}}); err != nil {
					b.Fatal(err)
				}
			}
		}
		<-done
		after := live()
		b.ReportMetric(float64(after-before)/watchers, "live-B/watcher")
		cancel()
		wg.Wait()
	}
}
