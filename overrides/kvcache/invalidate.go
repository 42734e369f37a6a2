package kvcache

import (
	"context"
	"errors"
	"io"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/etcdproxy/etcdproxy/overrides/internal/upstream"
	"github.com/karlseguin/ccache/v3"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// invalidator keeps the cache coherent with one upstream watch over the whole keyspace: every event deletes the
// entries whose range holds its key. Decision (measured in BENCHMARKS.md, written down in overrides/README.md):
// a keyspace-wide watch rather than one watch per cached range. It costs etcd one watcher and the proxy one
// event per write, whatever is cached, and it is exact: nothing has to be re-watched when the set of cached
// ranges changes, and there is no window in which a newly cached range is not yet watched.
//
// Every write reaches the watch as an event carrying its whole key-value, of which invalidation reads the key and
// the revisions: its stream decodes responses with skimCodec (skim.go), which skips the values (and prev_kv, never
// asked for) without copying them, rather than gRPC's proto codec.
//
// The watch is require-leader: a member that loses the cluster ends it. Whenever the watch is not live the cache
// is flushed and serves nothing; each (re)start begins a new generation, and entries of an older generation are
// never served.
//
// The watch runs while the cache is read: the first cacheable read starts it (use), and it stops once no
// cacheable read has come for idleAfter (Options.WatchIdle). An idle cache serves nothing anyway (the auth poll
// stops and flushes it after 10 s without a read, and its entries outlive no TTL), while a running watch costs etcd
// an event to this proxy for every write in the cluster, and the proxy the event's decoding and a wake-up: a
// fleet of proxies that serve writes, leases and watches but no cacheable reads would make etcd send every write
// to each of them for nothing. A read that finds the watch stopped goes to etcd, as any read while it is not live.
type invalidator struct {
	watch     pb.WatchClient
	cache     *ccache.Cache[*entry] // the entries it invalidates, and flushes
	index     *index                // which entries hold a key
	writeWait time.Duration         // Options.WriteWait
	logger    *zap.Logger
	ctx       context.Context
	cancel    context.CancelFunc
	done      chan struct{}

	// mu protects pos and advanced, orders invalidations against stores, and is held to change live and gen,
	// which are atomics so that the read path (state) takes no lock.
	mu   sync.Mutex
	live atomic.Bool
	gen  atomic.Uint64
	pos  int64 // every write up to pos has been applied to the cache
	// at publishes (gen, pos) for cache hits, which read it without the lock: stored after the invalidations of
	// every event up to pos, so an entry of generation gen found after reading it is the store at pos.
	at       atomic.Pointer[position]
	advanced chan struct{} // closed (and replaced) whenever pos advances or the watch stops

	// sources attributes each invalidation to a write through this proxy or elsewhere (mu protects it too).
	sources attribution

	// progress asks the live watch's stream for a progress notification (linearizable.go); a request already
	// pending covers the next. answered says one has come back (a response with no event and no watch id).
	progress, answered chan struct{}

	// idleAfter is how long the watch runs without a cacheable read; negative: from the start, always.
	idleAfter time.Duration
	used      atomic.Bool   // a cacheable read came since the idle check last looked
	running   atomic.Bool   // the watch is wanted: starting, live, or retrying
	starting  atomic.Bool   // a read started the watch, and its first attempt is neither live nor failed yet
	wanted    chan struct{} // a read's request to start the watch (cap 1)
}

// idleChecks is how many times per idleAfter the watch looks whether a cacheable read came.
const idleChecks = 4

// use records a cacheable read, and starts the watch if it is stopped. Two atomic loads on the read path.
func (inv *invalidator) use() {
	if !inv.used.Load() {
		inv.used.Store(true)
	}
	if !inv.running.Load() {
		select {
		case inv.wanted <- struct{}{}:
		default:
		}
	}
}

// fine reports whether the watch is where it should be: live, stopped for want of reads, or started by a read and
// on its way (its first attempt has not failed). A watch that is wanted and cannot be opened (etcd refuses it, or
// is gone) is not fine; nor is one that has not been live yet with the watch always on (WatchIdle < 0).
func (inv *invalidator) fine() bool {
	return inv.live.Load() || !inv.running.Load() || inv.starting.Load()
}

// beginWrite registers a local write about to be forwarded; its endWrite must follow, whatever happens.
func (inv *invalidator) beginWrite() uint64 {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	return inv.sources.begin()
}

// endWrite ends the local write seq, which wrote at revision rev (0: it failed, or did not say what it wrote).
func (inv *invalidator) endWrite(seq uint64, rev int64) {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	inv.sources.end(seq, rev, rev > inv.pos && inv.live.Load())
}

func newInvalidator(cc grpc.ClientConnInterface, cache *ccache.Cache[*entry], ix *index, writeWait,
	idleAfter time.Duration, lg *zap.Logger) *invalidator {
	inv := &invalidator{watch: pb.NewWatchClient(cc), cache: cache, index: ix, writeWait: writeWait, logger: lg,
		done: make(chan struct{}), advanced: make(chan struct{}), sources: newAttribution(),
		progress: make(chan struct{}, 1), answered: make(chan struct{}, 1),
		idleAfter: idleAfter, wanted: make(chan struct{}, 1)}
	inv.ctx, inv.cancel = context.WithCancel(context.Background())
	if idleAfter < 0 {
		inv.wanted <- struct{}{}
	} else {
		watchIdle.Set(1)
	}
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
	if inv.reached(rev) {
		writeWait.Observe(time.Since(start).Seconds())
		return
	}
	// Without --user, a write's event comes on the connection its reply came on, mostly in the same read, so the
	// watch's goroutine is usually runnable already, often queued behind this one on the same P. Let it run once
	// before parking: a yield costs less than the park and the wake-up it saves.
	runtime.Gosched()
	timer := time.NewTimer(inv.writeWait)
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

// reached reports whether every write up to rev has been applied to the cache, or the watch is not live.
func (inv *invalidator) reached(rev int64) bool {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	return !inv.live.Load() || inv.pos >= rev
}

// A linearizable read's wait (reach) asks for a progress notification once it has waited progressEvery for events
// (every revision has an event, so the watch usually gets there by itself), and again every progressEvery. The
// stream has one request outstanding at most: the next is sent once it is answered, or after progressRetry, since
// etcd answers a progress request only when every watcher of the stream is synced (watchable_store.go
// progressIfSync) and drops it otherwise. So a watch that lags is not sent more to answer than it can read.
const (
	progressEvery = 20 * time.Millisecond
	progressRetry = 100 * time.Millisecond
)

// reach waits until every write up to rev has been applied to the cache, asking etcd for a progress notification
// while it has not, for at most d or until ctx ends. It returns the generation in which that happened, or false
// (the watch is not live, or did not get there in time). Only what the watch delivered counts: its events and
// its progress notifications, which etcd sends only once it has sent every event up to their revision; so a watch
// on a member that lags, or is cut off from the cluster, never vouches for a revision it has not reached.
func (inv *invalidator) reach(ctx context.Context, rev int64, d time.Duration) (uint64, bool) {
	var timer *time.Timer
	var tick *time.Ticker
	defer func() {
		if timer != nil {
			timer.Stop()
			tick.Stop()
		}
	}()
	for {
		inv.mu.Lock()
		live, pos, gen, advanced := inv.live.Load(), inv.pos, inv.gen.Load(), inv.advanced
		inv.mu.Unlock()
		switch {
		case !live:
			return 0, false
		case pos >= rev:
			return gen, true
		}
		if timer == nil {
			timer, tick = time.NewTimer(d), time.NewTicker(progressEvery)
		}
		select {
		case <-advanced:
		case <-tick.C:
			inv.requestProgress()
		case <-timer.C:
			return 0, false
		case <-ctx.Done():
			return 0, false
		}
	}
}

// requestProgress asks the live watch for a progress notification, unless a request is pending already.
func (inv *invalidator) requestProgress() {
	select {
	case inv.progress <- struct{}{}:
	default:
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
	inv.cache.Clear()
	inv.index.clear()
	inv.publishLocked()
}

// position is a generation and how far the invalidation watch had applied writes in it.
type position struct {
	gen uint64
	pos int64
}

// publishLocked publishes (gen, pos) for cache hits. Called with mu held, after the invalidations up to pos.
func (inv *invalidator) publishLocked() {
	inv.at.Store(&position{gen: inv.gen.Load(), pos: inv.pos})
}

// position returns how far the watch had applied writes in generation gen, or 0 if gen is not the current one.
func (inv *invalidator) position(gen uint64) int64 {
	if p := inv.at.Load(); p != nil && p.gen == gen {
		return p.pos
	}
	return 0
}

// setLive marks the watch live from revision pos on (a new generation), or not live.
func (inv *invalidator) setLive(live bool, pos int64) {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	inv.flushLocked()
	inv.live.Store(live)
	inv.pos = pos
	inv.publishLocked()
	clear(inv.sources.localRevs) // a new watch starts after them, or none runs
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
			inv.sources.attribute(at, n)
			n, at = 0, ev.Kv.ModRevision
		}
		for _, e := range inv.index.covering(string(ev.Kv.Key)) {
			inv.cache.Delete(e.key)
			n++
		}
		rev = max(rev, ev.Kv.ModRevision)
	}
	inv.sources.attribute(at, n)
	if rev > inv.pos {
		inv.pos = rev
		inv.publishLocked()
		inv.sources.reached(rev)
		close(inv.advanced)
		inv.advanced = make(chan struct{})
	}
}

// run starts the watch when a read wants it, and keeps it while the cache is read, until stop.
func (inv *invalidator) run() {
	defer close(inv.done)
	for {
		select {
		case <-inv.ctx.Done():
			return
		case <-inv.wanted:
		}
		inv.starting.Store(inv.idleAfter >= 0) // first: fine all along
		inv.running.Store(true)
		select { // a read's request made before running was set is answered by this start
		case <-inv.wanted:
		default:
		}
		watchIdle.Set(0)
		ctx, cancel := context.WithCancel(inv.ctx)
		checked := make(chan struct{})
		go func() {
			defer close(checked)
			inv.untilIdle(ctx, cancel)
		}()
		upstream.Keep(ctx, upstream.Backoff{Min: 100 * time.Millisecond, Max: 10 * time.Second}, func() (bool, error) {
			err := inv.once(ctx)
			// A watch that went live ended for a new reason (a dropped connection, a member restarted): reopened
			// at once, as the other long-lived streams are; one that never went live, with backoff.
			wasLive := inv.live.Load()
			inv.setLive(false, 0)
			return wasLive, err
		}, func(err error) {
			inv.starting.Store(false)
			inv.logger.Warn("kv cache invalidation watch ended; the cache serves nothing until it is back", zap.Error(err))
		})
		cancel()
		<-checked
		if inv.ctx.Err() != nil {
			return
		}
		inv.logger.Debug("kv cache invalidation watch stopped: no cacheable read for a while",
			zap.Duration("idle", inv.idleAfter))
	}
}

// untilIdle calls stop once no cacheable read has come for idleAfter (never if idleAfter is negative), or returns
// when ctx ends.
func (inv *invalidator) untilIdle(ctx context.Context, stop context.CancelFunc) {
	if inv.idleAfter < 0 {
		<-ctx.Done()
		return
	}
	inv.used.Store(true) // the read that started the watch
	t := time.NewTicker(inv.idleAfter / idleChecks)
	defer t.Stop()
	for quiet := 0; ; {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if inv.used.Swap(false) {
			quiet = 0
		} else if quiet++; quiet >= idleChecks {
			// Stopped from here on: a read that comes now asks for the watch again (wanted keeps its request
			// until run is back for it), and the cache is fine meanwhile (its watch serves until it ends).
			inv.running.Store(false)
			watchIdle.Set(1)
			stop()
			return
		}
	}
}

var errRefused = errors.New("etcd refused the keyspace watch (with auth enabled the proxy needs read permission on every key)")

// once runs one invalidation watch until it fails or ctx ends.
func (inv *invalidator) once(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Its responses come without values (skimCodec): once and apply read keys, revisions, the header, the watch
	// id, created, canceled and the cancel reason.
	ws, err := inv.watch.Watch(upstream.Creds{}.Outgoing(ctx, true), grpc.ForceCodecV2(newSkimCodec()))
	if err != nil {
		return err
	}
	if err := ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{
		Key: []byte{0}, RangeEnd: []byte{0}, ProgressNotify: true}}}); err != nil {
		return err
	}
	// From here on one goroutine sends on the stream (gRPC allows one sender at a time): the progress requests of
	// linearizable reads (reach). Their answers are responses without events, applied as any progress notification.
	sender := make(chan struct{})
	defer func() {
		cancel()
		<-sender
	}()
	go func() {
		defer close(sender)
		inv.sendProgress(ctx, ws)
	}()
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
			inv.starting.Store(false)
		case resp.Canceled:
			return errors.New("etcd cancelled the invalidation watch: " + resp.CancelReason)
		default:
			inv.apply(resp)
			if len(resp.Events) == 0 && resp.WatchId == clientv3.InvalidWatchID {
				select { // a requested progress notification
				case inv.answered <- struct{}{}:
				default:
				}
			}
		}
	}
}

// sendProgress sends the progress requests of linearizable reads (reach) on ws, one outstanding at a time: the next
// once the last is answered, or after progressRetry (etcd drops a request while a watcher of the stream is
// unsynced). It returns when ctx ends or a send fails (Recv then says why).
func (inv *invalidator) sendProgress(ctx context.Context, ws pb.Watch_WatchClient) {
	req := &pb.WatchRequest{RequestUnion: &pb.WatchRequest_ProgressRequest{ProgressRequest: &pb.WatchProgressRequest{}}}
	retry := time.NewTimer(progressRetry)
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-inv.progress:
		}
		select {
		case <-inv.answered: // an answer to an earlier request, not to this one
		default:
		}
		if ws.Send(req) != nil {
			return
		}
		retry.Reset(progressRetry)
		select {
		case <-ctx.Done():
			return
		case <-inv.answered:
		case <-retry.C:
		}
	}
}
