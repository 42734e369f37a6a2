package kvcache

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/etcdproxy/etcdproxy/overrides/internal/upstream"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// invalidator keeps the cache coherent with one upstream watch over the whole keyspace: every event deletes the
// entries whose range holds its key. Decision (measured in BENCHMARKS.md, written down in overrides/README.md):
// a keyspace-wide watch rather than one watch per cached range. It costs etcd one watcher and the proxy one
// event per write, whatever is cached, and it is exact: nothing has to be re-watched when the set of cached
// ranges changes, and there is no window in which a newly cached range is not yet watched.
//
// The watch is require-leader: a member that loses the cluster ends it. Whenever the watch is not live the cache
// is flushed and serves nothing; each (re)start begins a new generation, and entries of an older generation are
// never served.
type invalidator struct {
	watch  pb.WatchClient
	kv     *KV
	logger *zap.Logger
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	// mu protects pos and advanced, orders invalidations against stores, and is held to change live and gen,
	// which are atomics so that the read path (state) takes no lock.
	mu       sync.Mutex
	live     atomic.Bool
	gen      atomic.Uint64
	pos      int64         // every write up to pos has been applied to the cache
	advanced chan struct{} // closed (and replaced) whenever pos advances or the watch stops

	// Attribution of invalidations to their source (mu protects these too): a write through this proxy
	// ("local") or any other ("remote"). The watch may apply a local write before the write's response reaches
	// the proxy, so an invalidation applied while local writes are in flight waits in pending until the write
	// whose revision it is reports it (local), or every write that was in flight then has ended (remote).
	writeSeq  uint64              // sequence numbers of local writes, in start order
	inFlight  map[uint64]struct{} // local writes started and not yet ended
	localRevs map[int64]struct{}  // revisions of ended local writes that the live watch has not reached
	pending   map[int64]pendingInvalidation
	queue     []int64 // revisions of pending, in the order applied (so by seq); settled ones are skipped
}

// pendingInvalidation is n invalidations at one revision, applied while the local writes up to seq were in flight.
type pendingInvalidation struct {
	n   int
	seq uint64
}

// maxPending bounds the invalidations that wait for attribution; past it the oldest are counted as remote.
const maxPending = 10000

// beginWrite registers a local write about to be forwarded; its endWrite must follow, whatever happens.
func (inv *invalidator) beginWrite() uint64 {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	inv.writeSeq++
	inv.inFlight[inv.writeSeq] = struct{}{}
	return inv.writeSeq
}

// endWrite ends the local write seq, which wrote at revision rev (0: it failed, or did not say what it wrote), and
// settles the invalidations that waited for it.
func (inv *invalidator) endWrite(seq uint64, rev int64) {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	delete(inv.inFlight, seq)
	if p, ok := inv.pending[rev]; ok && rev > 0 {
		invalidatedLocal.Add(float64(p.n))
		delete(inv.pending, rev)
	} else if rev > inv.pos && inv.live.Load() {
		inv.localRevs[rev] = struct{}{} // its events are still to come
	}
	if len(inv.queue) == 0 {
		return // the common case: nothing waits, no need to find the oldest write in flight
	}
	oldest := inv.writeSeq + 1 // the oldest local write still in flight
	for s := range inv.inFlight {
		oldest = min(oldest, s)
	}
	// Whatever waited only for writes that have all ended now is remote.
	for len(inv.queue) > 0 {
		p, ok := inv.pending[inv.queue[0]]
		if ok && p.seq >= oldest {
			break
		}
		inv.settleFront()
	}
}

// settleFront counts the oldest queued invalidation as remote, unless it was settled already. Called with inv.mu
// held.
func (inv *invalidator) settleFront() {
	rev := inv.queue[0]
	inv.queue[0] = 0
	inv.queue = inv.queue[1:]
	if p, ok := inv.pending[rev]; ok {
		invalidatedRemote.Add(float64(p.n))
		delete(inv.pending, rev)
	}
}

// attribute counts n invalidations made by the events of revision rev. Called with inv.mu held.
func (inv *invalidator) attribute(rev int64, n int) {
	_, local := inv.localRevs[rev]
	switch {
	case n == 0:
	case local:
		invalidatedLocal.Add(float64(n))
	case len(inv.inFlight) > 0:
		for len(inv.pending) >= maxPending || len(inv.queue) >= 2*maxPending {
			inv.settleFront()
		}
		p := inv.pending[rev]
		if p.n == 0 {
			inv.queue = append(inv.queue, rev)
		}
		inv.pending[rev] = pendingInvalidation{n: p.n + n, seq: inv.writeSeq}
	default:
		invalidatedRemote.Add(float64(n))
	}
}

func newInvalidator(cc grpc.ClientConnInterface, kv *KV, lg *zap.Logger) *invalidator {
	inv := &invalidator{watch: pb.NewWatchClient(cc), kv: kv, logger: lg, done: make(chan struct{}),
		advanced: make(chan struct{}), inFlight: map[uint64]struct{}{}, localRevs: map[int64]struct{}{},
		pending: map[int64]pendingInvalidation{}}
	inv.ctx, inv.cancel = context.WithCancel(context.Background())
	return inv
}

func (inv *invalidator) stop() {
	inv.cancel()
	<-inv.done
}

// state returns the current generation and whether the cache may serve. The two loads are not one atomic read:
// a read racing the watch's failure may still be served the generation that is ending, which is a read ordered
// just before the failure.
func (inv *invalidator) state() (uint64, bool) {
	return inv.gen.Load(), inv.live.Load()
}

// store runs put (which stores e) unless a write newer than rev (the revision e was read at) has been applied, or
// the generation has changed: then e may already be stale and is dropped.
func (inv *invalidator) store(e *entry, rev int64, put func()) {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	if !inv.live.Load() || e.gen != inv.gen.Load() || rev < inv.pos {
		return
	}
	put()
}

// await returns once every write up to rev has been applied to the cache. If that takes longer than the
// configured wait (or ctx ends first), it flushes the cache instead, so that the caller still reads its write.
func (inv *invalidator) await(ctx context.Context, rev int64) {
	start := time.Now()
	timer := time.NewTimer(inv.kv.opts.WriteWait)
	defer timer.Stop()
	for {
		inv.mu.Lock()
		if !inv.live.Load() || inv.pos >= rev {
			inv.mu.Unlock()
			writeWait.Observe(time.Since(start).Seconds())
			return
		}
		advanced := inv.advanced
		inv.mu.Unlock()
		select {
		case <-advanced:
		case <-timer.C:
			inv.flush("a write through the proxy was not seen by the invalidation watch in time")
			return
		case <-ctx.Done():
			inv.flush("a write's caller gave up before the invalidation watch saw it")
			return
		}
	}
}

// flush drops every entry and starts a new generation.
func (inv *invalidator) flush(why string) {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	inv.flushLocked()
	flushes.Inc()
	inv.logger.Debug("kv cache flushed", zap.String("reason", why))
}

func (inv *invalidator) flushLocked() {
	inv.gen.Add(1)
	inv.kv.cache.Clear()
	inv.kv.index.clear()
}

// setLive marks the watch live from revision pos on (a new generation), or not live.
func (inv *invalidator) setLive(live bool, pos int64) {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	inv.flushLocked()
	inv.live.Store(live)
	inv.pos = pos
	clear(inv.localRevs) // a new watch starts after them, or none runs
	close(inv.advanced)
	inv.advanced = make(chan struct{})
	if live {
		cacheLive.Set(1)
	} else {
		cacheLive.Set(0)
	}
}

// apply invalidates the keys of an upstream response and advances pos: to its last event's revision, or to its
// header revision if it has no event (a progress notification, which etcd sends only to a watcher that has been
// sent every event up to it). Not to the header revision of a response with events: etcd's catch-up of a slow
// (unsynced) watcher sends at most 1000 revisions of events per response, each with the store's current revision
// in its header, the events beyond them held back for the next pass (watchable_store.go syncWatchers, moreRev).
// The keyspace-wide watch sees an event at every revision, so its last event's revision is how far it has seen.
func (inv *invalidator) apply(resp *pb.WatchResponse) {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	var rev int64
	if len(resp.Events) == 0 {
		rev = resp.Header.GetRevision()
	}
	n, at := 0, int64(0) // invalidations made by the events of revision at
	for _, ev := range resp.Events {
		if ev.Kv.ModRevision != at {
			inv.attribute(at, n)
			n, at = 0, ev.Kv.ModRevision
		}
		for _, e := range inv.kv.index.covering(string(ev.Kv.Key)) {
			inv.kv.cache.Delete(e.key)
			n++
		}
		rev = max(rev, ev.Kv.ModRevision)
	}
	inv.attribute(at, n)
	if rev > inv.pos {
		inv.pos = rev
		for r := range inv.localRevs {
			if r <= rev {
				delete(inv.localRevs, r)
			}
		}
		close(inv.advanced)
		inv.advanced = make(chan struct{})
	}
}

func (inv *invalidator) run() {
	defer close(inv.done)
	upstream.Keep(inv.ctx, upstream.Backoff{Min: 100 * time.Millisecond, Max: 10 * time.Second}, func() (bool, error) {
		err := inv.once()
		inv.setLive(false, 0)
		return false, err
	}, func(err error) {
		inv.logger.Warn("kv cache invalidation watch ended; the cache serves nothing until it is back", zap.Error(err))
	})
}

var errRefused = errors.New("etcd refused the keyspace watch (with auth enabled the proxy needs read permission on every key)")

// once runs one invalidation watch until it fails.
func (inv *invalidator) once() error {
	ctx, cancel := context.WithCancel(inv.ctx)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, rpctypes.MetadataRequireLeaderKey, rpctypes.MetadataHasLeader)
	ws, err := inv.watch.Watch(ctx)
	if err != nil {
		return err
	}
	if err := ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{
		Key: []byte{0}, RangeEnd: []byte{0}, ProgressNotify: true}}}); err != nil {
		return err
	}
	for {
		resp, err := ws.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errors.New("watch stream closed")
			}
			return err
		}
		switch {
		case resp.Created && resp.Canceled:
			return errRefused
		case resp.Created:
			// Events after the created revision are applied from here on: live from it.
			inv.setLive(true, resp.Header.GetRevision())
		case resp.Canceled:
			return errors.New("etcd cancelled the invalidation watch: " + resp.CancelReason)
		default:
			inv.apply(resp)
		}
	}
}
