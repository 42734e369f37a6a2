package kvcache

import (
	"context"
	"sync"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Linearizable reads from the cache (overrides/README.md, "kvcache: decisions", has the proof sketch).
//
// A linearizable Range at the current revision is answered from the cache when the cache can show that its entry
// is etcd's answer at a revision R that etcd had committed at some moment after the read arrived:
//
//  1. R is the header revision of a linearizable request made after the read arrived: a count-only Range of one
//     key (barrierKey), sent with no credentials. One such request (a batch) serves every read that joined it
//     before it was sent; a read that arrives while one is in flight joins the next, sent once that one returns,
//     so at most one is in flight (linBatches).
//  2. The invalidation watch has applied every event up to R (invalidator.reach: its events, or a progress
//     notification asked for on its stream, since etcd sends one only once every event up to its revision has been
//     sent), within LinearizableWait. A watch on a member that lags or is cut off does not get there: etcd then.
//  3. The entry is in the cache, of the generation in which the watch reached R. It was stored only if no event
//     newer than its own revision F had been applied (invalidator.store), and every event in its range applied
//     since deleted it: so if F <= R, no write touched its range in (F, R], and it is etcd's answer at R, returned
//     with the batch's header (revision R, and the member, raft term and cluster of etcd's answer at R); if F > R
//     it is etcd's answer at F, which was committed after R, returned as it is.
//
// Auth: etcd checks a linearizable read's token and permissions when it serves it, which the cache cannot do (its
// auth poll lags by up to a second). The barrier is sent without credentials, so etcd serves it only while auth is
// disabled (with auth on it refuses it: user name is empty); a read is answered from the cache only after a
// barrier etcd served, i.e. with auth disabled at R, when etcd ignores tokens and every caller may read every key.
// With auth on, linearizable reads go to etcd (after a refused barrier, for linBackoff, with no barrier at all).
//
// Everything else goes to etcd, so the client gets etcd's own answer or error: the barrier failed (leader loss,
// timeout, auth on), the watch is not live or did not reach R in time, the entry is missing (the answer then fills
// the cache for the next reads: at the key's second such miss, as for serializable reads, admit.go). After a failed
// barrier or a wait that timed out, linearizable reads go straight to etcd for linBackoff, so a lost leader or a
// lagging watch does not add a wait to every read.

// barrierKey is the key of the barrier read: any key will do, it is only counted.
var barrierKey = []byte("\x00etcdproxy/linearizable")

// linBackoff is how long linearizable reads skip the cache after a barrier failed or the watch did not reach its
// revision in time.
const linBackoff = time.Second

// barrierTimeout bounds a barrier read. Reads do not wait for it that long (LinearizableWait), but the next batch
// is not sent before it returns.
const barrierTimeout = 5 * time.Second

// A batch is held back for the reads of the previous batch to come again (batcher) for holdRTTs barrier round
// trips, at most maxHold. Measured (BENCHMARKS.md, 16 clients reading in a loop): one round trip gathers about 8.5
// reads per barrier, two 12.4, three 14.9 of the 16.
const (
	holdRTTs = 3
	maxHold  = 2 * time.Millisecond
)

// holdFor returns how long a batch is held back at most, given the barrier's round trip. A variable so that a
// test can hold for longer than a busy machine takes to schedule its clients (export_test.go): what the bounds
// above gather is measured by the bench, not by a unit test.
var holdFor = func(rtt time.Duration) time.Duration { return min(holdRTTs*rtt, maxHold) }

// batch is one barrier read and the linearizable reads that wait for it.
type batch struct {
	reads int           // the reads that joined it (under batcher.mu)
	done  chan struct{} // closed once the fields below are set
	hdr   *pb.ResponseHeader
	gen   uint64 // the generation in which the invalidation watch reached hdr.Revision
	why   string // why not, if the reads cannot be answered from the cache (a fallback reason)
}

// batcher sends the barrier reads: one in flight at most, the next one gathering the reads that come meanwhile.
//
// Holding: when a barrier returns, the next one is held back until as many reads have joined it as were waiting
// when the barrier returned (those of the next batch and those just answered), or for holdRTTs round trips of the
// barrier (at most maxHold). Clients that read in a loop come back within that time, so they share one barrier
// instead of splitting into two groups that alternate, each with its own barrier (which doubles etcd's cost per
// read). A single client is never held (its read is the one it waits for), and after an idle spell the first read
// sends its barrier at once. Holding never makes an answer older: a barrier is always sent after every read that
// joined it.
type batcher struct {
	// mu protects the fields below.
	mu       sync.Mutex
	next     *batch        // the batch a read joins; sent when the one in flight returns
	inFlight bool          // a barrier read is in flight
	sentAt   time.Time     // when it was sent
	rtt      time.Duration // a moving average of the barrier reads' round trips
	hold     int           // while holdEnd is ahead, next is sent once this many reads have joined it
	holdEnd  time.Time
	holdT    *time.Timer // sends next at holdEnd
	until    time.Time   // linearizable reads skip the cache until then (linBackoff)
	closed   bool
	wg       sync.WaitGroup // the batches' goroutines
}

// join returns the batch the caller's read is answered by, sending it at once if no barrier is in flight; nil and
// a fallback reason if the cache is not to be used now.
func (k *KV) join() (*batch, string) {
	bt := &k.batches
	bt.mu.Lock()
	defer bt.mu.Unlock()
	now := time.Now()
	switch {
	case bt.closed:
		return nil, "closed"
	case now.Before(bt.until):
		return nil, "backoff"
	case bt.inFlight && now.Sub(bt.sentAt) > k.opts.LinearizableWait:
		return nil, "slow_barrier" // etcd is slow to answer: reads would wait for nothing
	}
	if bt.next == nil {
		bt.next = &batch{done: make(chan struct{})}
	}
	b := bt.next
	b.reads++
	if !bt.inFlight && (b.reads >= bt.hold || !now.Before(bt.holdEnd)) {
		k.sendLocked()
	}
	return b, ""
}

// holdLocked holds the next batch back after a barrier that served served reads returned (batcher's comment).
// Called with bt.mu held.
func (k *KV) holdLocked(served int, now time.Time) {
	bt := &k.batches
	waiting := served
	if bt.next != nil {
		waiting += bt.next.reads
	}
	if bt.closed || served <= 1 && bt.next == nil {
		bt.hold = 0 // closed, or a single client: the next read sends its barrier at once
		return
	}
	bt.hold, bt.holdEnd = waiting, now.Add(holdFor(bt.rtt))
	if bt.next != nil && bt.next.reads >= bt.hold {
		k.sendLocked()
		return
	}
	if bt.holdT == nil {
		bt.holdT = time.AfterFunc(time.Until(bt.holdEnd), k.holdExpired)
	} else {
		bt.holdT.Reset(time.Until(bt.holdEnd))
	}
}

// holdExpired sends the held batch once the hold is over.
func (k *KV) holdExpired() {
	bt := &k.batches
	bt.mu.Lock()
	defer bt.mu.Unlock()
	if bt.next != nil && !bt.inFlight && !bt.closed && !time.Now().Before(bt.holdEnd) {
		k.sendLocked()
	}
}

// sendLocked sends bt.next. Called with bt.mu held.
func (k *KV) sendLocked() {
	bt := &k.batches
	b := bt.next
	bt.next, bt.inFlight, bt.sentAt = nil, true, time.Now()
	bt.wg.Add(1)
	go k.barrier(b)
}

// barrier sends b's barrier read, sends the next batch if reads joined it meanwhile, then waits for the
// invalidation watch to reach the barrier's revision, and releases b's reads.
func (k *KV) barrier(b *batch) {
	defer k.batches.wg.Done()
	defer close(b.done)
	linBatches.Inc()
	ctx, cancel := context.WithTimeout(k.linCtx, barrierTimeout)
	resp, err := k.KVServer.Range(ctx, &pb.RangeRequest{Key: barrierKey, CountOnly: true})
	cancel()
	bt := &k.batches
	bt.mu.Lock()
	now := time.Now()
	bt.inFlight = false
	if err != nil || resp.GetHeader() == nil {
		bt.until = now.Add(linBackoff)
		bt.hold = 0
		if bt.next != nil && !bt.closed {
			k.sendLocked()
		}
	} else {
		bt.rtt += (now.Sub(bt.sentAt) - bt.rtt) / 8
		k.holdLocked(b.reads, now)
	}
	bt.mu.Unlock()
	switch {
	case err != nil:
		b.why = "barrier_failed"
		switch status.Code(err) {
		case codes.InvalidArgument, codes.PermissionDenied, codes.Unauthenticated:
			b.why = "auth" // with auth on etcd refuses a read without credentials: user name is empty
		}
		return
	case resp.GetHeader() == nil:
		b.why = "barrier_failed"
		return
	}
	start := time.Now()
	gen, ok := k.watch.reach(k.linCtx, resp.Header.Revision, k.opts.LinearizableWait)
	linWait.Observe(time.Since(start).Seconds())
	if !ok {
		b.why = "watch_behind"
		if _, live := k.watch.state(); live && k.linCtx.Err() == nil {
			bt.mu.Lock()
			bt.until = time.Now().Add(linBackoff)
			bt.mu.Unlock()
		}
		return
	}
	b.hdr, b.gen = resp.Header, gen
}

// closeBatches stops sending barriers and waits for those in flight.
func (k *KV) closeBatches() {
	k.batches.mu.Lock()
	k.batches.closed = true
	if k.batches.holdT != nil {
		k.batches.holdT.Stop()
	}
	k.batches.mu.Unlock()
	k.stopLin()
	k.batches.wg.Wait()
}

// linearizable serves a linearizable current-revision read (linearizable.go's comment says when from the cache).
func (k *KV) linearizable(ctx context.Context, req *pb.RangeRequest) (*pb.RangeResponse, error) {
	fallback := func(why string) (*pb.RangeResponse, error) {
		linFallbacks.WithLabelValues(why).Inc()
		return k.KVServer.Range(ctx, req)
	}
	key, creds, ok := cacheKey(ctx, req)
	if !ok {
		return fallback("uncacheable")
	}
	k.watch.use()
	if _, live := k.watch.state(); !live {
		return fallback("not_live")
	}
	b, why := k.join()
	if b == nil {
		return fallback(why)
	}
	timer := time.NewTimer(k.opts.LinearizableWait)
	defer timer.Stop()
	select {
	case <-b.done:
	case <-timer.C:
		return fallback("timeout")
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	if b.hdr == nil {
		return fallback(b.why)
	}
	if resp := k.linHit(ctx, key, b); resp != nil {
		return resp, nil
	}
	// A miss: read etcd (identical misses share one read), and store the answer for the next reads (at the key's
	// second miss, as a serializable one: admit.go).
	again := func() *pb.RangeResponse { return k.linHit(ctx, key, b) }
	return k.readShared(ctx, key, again, func(lead *flight) (*pb.RangeResponse, error) {
		linFallbacks.WithLabelValues("miss").Inc()
		return k.fill(ctx, req, key, creds, b.gen, lead)
	})
}

// linHit returns the cached answer for key as etcd's answer at b's revision, if the entry is of the generation in
// which the watch reached that revision, and offers its encoding for the call of ctx.
func (k *KV) linHit(ctx context.Context, key string, b *batch) *pb.RangeResponse {
	item := k.lookup(key)
	if item == nil || item.Expired() || item.Value().gen != b.gen {
		return nil
	}
	linHits.Inc()
	e := item.Value()
	resp := e.resp
	if resp.GetHeader().GetRevision() > b.hdr.Revision {
		e.enc.offer(ctx, resp)
		return resp // etcd's answer at a revision committed after the barrier's
	}
	// The cached answer is shared and never mutated: a new response around its parts, with the barrier's header.
	// Every field of RangeResponse is listed (TestRangeResponseFields fails when etcd adds one).
	out := &pb.RangeResponse{Header: b.hdr, Kvs: resp.Kvs, More: resp.More, Count: resp.Count}
	e.enc.offerWithHeader(ctx, out)
	return out
}

// rangeResponseFields is the number of fields linHit copies.
const rangeResponseFields = 4
