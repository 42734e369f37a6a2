package kvcache

import (
	"context"
	"time"

	"github.com/karlseguin/ccache/v3"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	grpcenc "google.golang.org/grpc/encoding"
)

// Stored returns how many entries k's cache and its index hold (the cache's count after ccache's worker has
// applied what it was sent).
func (k *KV) Stored() (cached, indexed int) {
	k.cache.SyncUpdates()
	return k.cache.ItemCount(), k.index.len()
}

// Remembers reports whether k's doorkeeper remembers req, made with ctx's credentials, without remembering it.
func (k *KV) Remembers(ctx context.Context, req *pb.RangeRequest) bool {
	key, _, ok := cacheKey(ctx, req)
	if !ok || k.door == nil {
		return false
	}
	return k.door.remembers(key)
}

// Waiters returns the number of misses waiting for reads in flight.
func (k *KV) Waiters() int {
	k.flights.mu.Lock()
	defer k.flights.mu.Unlock()
	n := 0
	for _, fl := range k.flights.m {
		n += fl.waiters
	}
	return n
}

// SkimCodec is the invalidation watch's codec (skim.go), for the benchmarks of package kvcache_test.
func SkimCodec() grpcenc.CodecV2 { return newSkimCodec() }

// WatchInvalidation runs an invalidation watch on cc, as New does, that sends each response it receives (what it
// applies) on resps, or drops it if resps is full. live says whether the watch is live; stop ends it.
func WatchInvalidation(cc grpc.ClientConnInterface, resps chan<- *pb.WatchResponse) (live func() bool, stop func()) {
	ix := newIndex()
	cache := ccache.New(ccache.Configure[*entry]().MaxSize(1 << 20).OnDelete(ix.evicted))
	inv := newInvalidator(cc, cache, ix, time.Second, -1, zap.NewNop())
	inv.watch = recordingWatch{WatchClient: inv.watch, resps: resps}
	go inv.run()
	return func() bool { _, live := inv.state(); return live }, func() { inv.stop(); cache.Stop() }
}

type recordingWatch struct {
	pb.WatchClient
	resps chan<- *pb.WatchResponse
}

func (w recordingWatch) Watch(ctx context.Context, opts ...grpc.CallOption) (pb.Watch_WatchClient, error) {
	ws, err := w.WatchClient.Watch(ctx, opts...)
	if err != nil {
		return nil, err
	}
	return recordingStream{Watch_WatchClient: ws, resps: w.resps}, nil
}

type recordingStream struct {
	pb.Watch_WatchClient
	resps chan<- *pb.WatchResponse
}

func (s recordingStream) Recv() (*pb.WatchResponse, error) {
	resp, err := s.Watch_WatchClient.Recv()
	if err == nil {
		select {
		case s.resps <- resp:
		default:
		}
	}
	return resp, err
}

// HoldFor makes the linearizable batcher hold a batch back for up to d, whatever the barrier's round trip, until
// the test ends. Call it before the proxy starts (the batcher reads it with no lock of the test's).
func HoldFor(t interface{ Cleanup(func()) }, d time.Duration) {
	was := holdFor
	holdFor = func(time.Duration) time.Duration { return d }
	t.Cleanup(func() { holdFor = was })
}
