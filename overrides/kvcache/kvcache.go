// Package kvcache overrides KV with a coherent cache of reads (github.com/karlseguin/ccache/v3).
//
// Replaces: Range (current revision: served from the cache when it can vouch for an entry; a linearizable one only
// when that is provably linearizable, linearizable.go; a serializable hit may be answered from the request's bytes
// before gRPC decodes them, RawHit in raw.go) and the
// Auth RPCs that change rights (forwarded, then the cache is flushed). Every RPC that writes keys (ryw.KeyWriter)
// is held, through the ryw interceptor and this cache's BeginWrite, EndWrite and Await, until the cache has seen
// its revision, so a client reads its own writes through this proxy. RangeStream and Compact fall through.
//
// Guarantees:
//   - A linearizable read is answered from the cache only with etcd's answer at a revision R etcd had committed
//     after the read arrived: R is the revision of a linearizable barrier read sent after it (one shared by a batch
//     of reads), the invalidation watch must have delivered every event up to R, and the entry must not have been
//     invalidated then. The barrier carries no credentials, so with auth enabled etcd refuses it and linearizable
//     reads go to etcd, which checks the caller's token and rights as it serves them. Otherwise (barrier failed,
//     watch behind, a miss) etcd answers (linearizable.go).
//   - Reads at a historical revision (revision > 0) always go to etcd: their answer depends on compaction, which
//     the proxy would otherwise have to track: etcd answers them, compacted error included, and a compaction never
//     stops current-revision reads from being cached.
//   - Coherence: one keyspace-wide upstream watch (invalidate.go) invalidates every entry whose range holds a key
//     written anywhere, through this proxy or not. It runs while the cache is read: the first cacheable read starts
//     it, and it stops after Options.WatchIdle without one (invalidator). While that watch is not live (stopped,
//     starting, reconnecting, leader loss, no permission to watch), the cache serves nothing and stores nothing. A
//     response is stored only if no write the cache has seen is newer than it, so a fill racing a write cannot
//     store a stale answer. TTL is a backstop.
//   - No client gets an answer its credentials would not get from etcd: the caller's token and authorization
//     metadata are part of the cache key, and a permission change flushes the cache (auth.go): at once when made
//     through this proxy, within about a second when made elsewhere.
//   - A cached response is shared, never mutated.
//   - Admission: a miss's answer is stored at its key's second miss (a doorkeeper remembers the first), unless
//     other misses wait for it (admit.go); Options.AdmitFirst stores it at the first.
//
// It owns the cache, its keyspace watch and the auth poll; it must not answer a read it cannot vouch for, and writes
// nothing into etcd.
package kvcache

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/etcdproxy/etcdproxy/overrides/internal/upstream"
	"github.com/karlseguin/ccache/v3"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// Options configure the cache.
type Options struct {
	// MaxBytes bounds the cache: twice the encoded size of the cached responses (an entry holds its response both
	// decoded and encoded) plus their keys; 0 disables it.
	MaxBytes int64
	// TTL bounds the life of an entry whatever the invalidation watch says; 0 means 30s.
	TTL time.Duration
	// WriteWait bounds how long a write through the proxy waits for the invalidation watch to reach its revision
	// before the cache is flushed instead; 0 means 1s.
	WriteWait time.Duration
	// AuthPoll is how often the cache reads etcd's auth revision, to drop answers that a permission change made
	// elsewhere may have invalidated; 0 means 1s, negative turns the poll off (then such a change is noticed
	// only through the TTL). Each poll is one AuthStatus call, which etcd serves through raft.
	AuthPoll time.Duration
	// TokenCheck bounds how long an answer cached for a caller with a token is served without etcd seeing the
	// token: from the time the read that filled it was sent (and never past a JWT token's expiry); 0 means 1s. It
	// must not exceed etcd's --auth-token-ttl (simple tokens expire that long after their last use, and a refill
	// is a use that renews them).
	TokenCheck time.Duration
	// SerializableOnly sends every linearizable read to etcd (--kv-cache-linearizable=false). By default a
	// linearizable read at the current revision is answered from the cache when that is provably linearizable
	// (linearizable.go).
	SerializableOnly bool
	// LinearizableWait bounds how long a linearizable read waits for its barrier read and for the invalidation
	// watch to reach the barrier's revision before it reads from etcd instead; 0 means 500ms.
	LinearizableWait time.Duration
	// Floor, if set, is a revision below which a cached answer is not served (a hit whose header is older is
	// read again): --experimental-serializable-ordering keeps answers from going back in time.
	Floor func() int64
	// WatchIdle is how long the invalidation watch runs without a cacheable read before it stops (the next one
	// starts it again, and goes to etcd meanwhile): see invalidator. 0 means DefaultWatchIdle; negative keeps it
	// running from the start (--kv-cache-watch-idle=0).
	WatchIdle time.Duration
	// AdmitFirst stores the answer of every miss the cache may take (--kv-cache-admit=first). By default a key's
	// first miss is only remembered, in a table of 1/32 of MaxBytes, and its answer stored at its second miss,
	// or at the first if other misses wait for it (admit.go).
	AdmitFirst bool
}

// DefaultWatchIdle is Options.WatchIdle when it is 0.
const DefaultWatchIdle = 30 * time.Second

// KV is the caching override of the KV service.
type KV struct {
	pb.KVServer
	opts   Options
	cache  *ccache.Cache[*entry]
	index  *index
	door   *doorkeeper // nil with AdmitFirst
	watch  *invalidator
	logger *zap.Logger

	stopAuth context.CancelFunc
	authDone chan struct{}
	// auth.go: the cache serves and stores only while authKnown (its entries are vouched for at the auth
	// revision last read); authFailing while the last poll failed (or none succeeded yet); read says a cacheable
	// read came since the auth poll last looked.
	authKnown, authFailing atomic.Bool
	read                   atomic.Bool
	// flights lets identical misses share one read (flight.go).
	flights flights
	// batches sends the barrier reads of linearizable reads (linearizable.go), until stopLin ends linCtx.
	batches batcher
	linCtx  context.Context
	stopLin context.CancelFunc
}

// New wraps base. The invalidation watch runs on cc until Close.
func New(base pb.KVServer, cc grpc.ClientConnInterface, lg *zap.Logger, opts Options) *KV {
	if opts.TTL <= 0 {
		opts.TTL = 30 * time.Second
	}
	if opts.WriteWait <= 0 {
		opts.WriteWait = time.Second
	}
	if opts.TokenCheck <= 0 {
		opts.TokenCheck = time.Second
	}
	if opts.AuthPoll == 0 {
		opts.AuthPoll = time.Second
	}
	if opts.LinearizableWait <= 0 {
		opts.LinearizableWait = 500 * time.Millisecond
	}
	if opts.WatchIdle == 0 {
		opts.WatchIdle = DefaultWatchIdle
	}
	k := &KV{KVServer: base, opts: opts, logger: lg, index: newIndex()}
	if !opts.AdmitFirst {
		k.door = newDoorkeeper(opts.MaxBytes)
	}
	k.cache = ccache.New(configure(opts.MaxBytes).OnDelete(k.dropped))
	k.watch = newInvalidator(cc, k.cache, k.index, opts.WriteWait, opts.WatchIdle, lg)
	k.linCtx, k.stopLin = context.WithCancel(context.Background())
	go k.watch.run()
	var ctx context.Context
	ctx, k.stopAuth = context.WithCancel(context.Background())
	k.authDone = make(chan struct{})
	if opts.AuthPoll > 0 {
		k.authFailing.Store(true) // until the first poll
		go k.authWatch(ctx, cc, k.authDone)
	} else {
		k.authKnown.Store(true) // nothing to follow: permission changes are caught by the TTL only
		close(k.authDone)
	}
	caches.Store(k, nil)
	return k
}

// Live reports whether the cache can serve: its invalidation watch is live, or stopped for want of reads, or
// started by a read and on its way (invalidator.fine), and etcd's auth revision can be read (while idle, the cache
// starts serving again at the first poll after a read: auth.go). A watch that is wanted and cannot be opened
// (etcd refuses it, or is gone) is not live.
func (k *KV) Live() bool {
	return k.watch.fine() && !k.authFailing.Load()
}

// Close stops the invalidation watch and the cache.
func (k *KV) Close() {
	caches.Delete(k)
	k.closeBatches()
	k.stopAuth()
	<-k.authDone
	k.watch.stop()
	k.cache.Stop()
}

// entry is a cached response.
type entry struct {
	key   string // the cache key
	resp  *pb.RangeResponse
	enc   encoding // resp's encoding, sent for a hit that returns resp (internal/encoded)
	start string   // the request's range: [start, end), end "" for a single key, "\x00" for every key from start
	end   string
	gen   uint64 // the invalidator's generation when stored
	size  int64
	ttl   time.Duration
	// serializable says the entry answers a serializable read; a linearizable read's entry (a key of its own: the
	// request's encoding differs) is answered by linHit only, never by RawHit.
	serializable bool

	promoted atomic.Int64 // clock() when last promoted in ccache's LRU list, or stored (lookup)
}

// Size is the entry's weight against MaxBytes.
func (e *entry) Size() int64 { return e.size }

// cacheable reports whether req may be answered from the cache: a serializable read at the current revision.
func cacheable(req *pb.RangeRequest) bool {
	return req.Serializable && req.Revision == 0
}

// Range serves current-revision reads from the cache when it can vouch for the entry: serializable ones here,
// linearizable ones in linearizable.go.
func (k *KV) Range(ctx context.Context, req *pb.RangeRequest) (*pb.RangeResponse, error) {
	if !cacheable(req) {
		if !req.Serializable && req.Revision == 0 && !k.opts.SerializableOnly {
			return k.linearizable(ctx, req)
		}
		return k.KVServer.Range(ctx, req)
	}
	key, creds, ok := cacheKey(ctx, req)
	if !ok {
		return k.KVServer.Range(ctx, req)
	}
	k.used()
	gen, live := k.watch.state()
	live = live && k.authKnown.Load()
	if resp := k.hit(ctx, key, gen, live); resp != nil {
		return resp, nil
	}
	read := func(lead *flight) (*pb.RangeResponse, error) {
		misses.Inc()
		if !live {
			return k.KVServer.Range(ctx, req)
		}
		return k.fill(ctx, req, key, creds, gen, lead)
	}
	if !live {
		return read(nil)
	}
	return k.readShared(ctx, key, func() *pb.RangeResponse {
		gen, live = k.watch.state()
		live = live && k.authKnown.Load()
		return k.hit(ctx, key, gen, live)
	}, read)
}

// used records a cacheable read: the auth poll goes on (read), and the invalidation watch runs (use).
func (k *KV) used() {
	if !k.read.Load() { // one load on the read path; a store once per auth poll at most
		k.read.Store(true)
	}
	k.watch.use()
}

// readShared serves a miss of key, letting identical misses share one read (flight.go): if a read of key is in
// flight, it waits for it (or for ctx) and returns what again then finds in the cache; if nothing, or if no read
// was in flight, it reads itself (read, which stores the answer for the next reads; lead is the flight it leads,
// nil if none, which tells it whether other misses wait for its answer: admit).
func (k *KV) readShared(ctx context.Context, key string, again func() *pb.RangeResponse,
	read func(lead *flight) (*pb.RangeResponse, error)) (*pb.RangeResponse, error) {
	wait, lead := k.flights.join(key)
	if wait == nil {
		defer lead.finish()
		return read(lead)
	}
	select {
	case <-wait:
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	sharedMisses.Inc()
	if resp := again(); resp != nil {
		return resp, nil
	}
	return read(nil)
}

// fill reads req from etcd and stores the answer under key, made in generation gen, unless the cache may not
// take it (invalidator.store), the caller's credentials give it no time to live, or it is not admitted (admit:
// the first miss of key, which lead, the miss's flight or nil, does not share).
func (k *KV) fill(ctx context.Context, req *pb.RangeRequest, key string, creds upstream.Creds, gen uint64,
	lead *flight) (*pb.RangeResponse, error) {
	sent := time.Now()
	resp, err := k.KVServer.Range(ctx, req)
	if err != nil {
		return resp, err
	}
	ttl := k.opts.TTL
	if creds != (upstream.Creds{}) {
		if ttl = min(ttl, k.opts.TokenCheck-time.Since(sent)); ttl <= 0 {
			return resp, nil
		}
		for _, tok := range []string{creds.Token, creds.Authorization} {
			if exp, ok := jwtExpiry(tok); ok {
				ttl = min(ttl, time.Until(exp))
			}
		}
		if ttl <= 0 {
			return resp, nil
		}
	}
	if !k.admit(key, lead) {
		return resp, nil
	}
	enc := encode(resp)
	enc.offer(ctx, resp) // the filling call sends the bytes it just made, not a second encoding of its own
	e := &entry{key: key, resp: resp, enc: enc, start: string(req.Key), end: string(req.RangeEnd), gen: gen,
		size: int64(2*enc.size + len(key)), ttl: ttl, // held twice: decoded and encoded
		serializable: req.Serializable}
	k.watch.store(e, resp.Header.GetRevision(), func() { k.keep(e) })
	return resp, nil
}

// hit returns the cached answer for key if the cache may serve it now (live, generation gen), counting the hit,
// and offers its encoding for the call of ctx.
func (k *KV) hit(ctx context.Context, key string, gen uint64, live bool) *pb.RangeResponse {
	if !live {
		return nil
	}
	e, rev := k.servable(key, gen)
	if e == nil {
		return nil
	}
	hits.Inc()
	resp := e.resp
	if rev == resp.Header.GetRevision() {
		e.enc.offer(ctx, resp)
		return resp
	}
	// Answered at the watch's position, as etcd answers with its current revision: an answer never says a revision
	// older than a write this proxy has acknowledged (it waits for the watch to reach it). The cached answer is
	// shared and never mutated: a new response around its parts.
	out := &pb.RangeResponse{Header: atRevision(resp.Header, rev), Kvs: resp.Kvs, More: resp.More, Count: resp.Count}
	e.enc.offerWithHeader(ctx, out)
	return out
}

// servable returns the entry of key if the cache, live in generation gen, may serve it now, and the revision the
// answer says: the entry's, or the watch's position if that is newer (see hit). It counts nothing.
func (k *KV) servable(key string, gen uint64) (*entry, int64) {
	pos := k.watch.position(gen) // before the lookup: the entry found is then the store at pos
	item := k.lookup(key)
	if item == nil || item.Expired() || item.Value().gen != gen {
		return nil, 0
	}
	e := item.Value()
	rev := max(e.resp.Header.GetRevision(), pos)
	if k.opts.Floor != nil && rev < k.opts.Floor() {
		return nil, 0
	}
	return e, rev
}

// atRevision is h at revision rev: a new header, h is shared.
func atRevision(h *pb.ResponseHeader, rev int64) *pb.ResponseHeader {
	return &pb.ResponseHeader{ClusterId: h.GetClusterId(), MemberId: h.GetMemberId(), Revision: rev, RaftTerm: h.GetRaftTerm()}
}

// lookup returns the item of key, if any, and promotes it (moves it to the front of ccache's LRU list) if it was
// last promoted, or stored, promoteAfter ago or more. ccache's Get sends the item it finds to ccache's worker
// goroutine through a channel, and here the worker moves it at each promotion (GetsPerPromote(1)): each promotion
// is a channel send and, when the worker sleeps, a wake-up. A hot key is promoted a few times a second whatever
// its read rate, and a key read less often at every read, as a plain LRU list would have it; an entry is evicted
// out of order only if the whole cache turns over within promoteAfter. Promoting one lookup in three at random,
// as before, cost more and kept the order less well (a key read once had one chance in three). Measured in
// process: BenchmarkHit/serial 0.70-0.82 µs of CPU per hit before, 0.47-0.51 after. Through the binary, A/B runs
// of the bench's hot reads disagreed within their noise (from 0.95× to 1.1× the CPU per hit at C=1 and C=4; the
// same binary in the two slots of one run differed by 9%): see overrides/README.md.
func (k *KV) lookup(key string) *ccache.Item[*entry] {
	item := k.cache.GetWithoutPromote(key)
	if item == nil {
		return nil
	}
	e := item.Value()
	now := clock()
	if last := e.promoted.Load(); now-last >= int64(promoteAfter) && e.promoted.CompareAndSwap(last, now) {
		k.cache.Get(key) // promotes what key holds now: item, or the entry that just replaced it
	}
	return item
}

// configure is ccache's configuration for a cache of maxBytes: it moves an item to the front at each promotion
// (lookup decides how often that is).
func configure(maxBytes int64) *ccache.Configuration[*entry] {
	return ccache.Configure[*entry]().MaxSize(maxBytes).GetsPerPromote(1)
}

// promoteAfter is how long an entry stays where its last promotion put it in the LRU list: see lookup.
var promoteAfter = 250 * time.Millisecond

// clock returns the time since the process started, in nanoseconds, from the monotonic clock.
func clock() int64 { return int64(time.Since(started)) }

var started = time.Now()

// keep stores e: in the index first, then in ccache. ccache may evict e as soon as it has it (its worker prunes
// from another goroutine, the whole list when a few large entries exceed the size), and an eviction takes e out
// of the index only if e is in it already; the other order could index an entry ccache has dropped, for good.
// Called under the invalidator's lock, so no invalidation runs between the two.
func (k *KV) keep(e *entry) {
	e.promoted.Store(clock())
	k.index.add(e)
	k.cache.Set(e.key, e, e.ttl)
}

// dropped is ccache's OnDelete callback, called for every entry it drops (evicted, deleted by an invalidation, or
// replaced): the index lets go of an evicted one (index.evicted), and the doorkeeper remembers its key, so that
// the key's next miss is stored again (admit.go).
func (k *KV) dropped(item *ccache.Item[*entry]) {
	k.index.evicted(item)
	if k.door != nil {
		k.door.seen(item.Key())
	}
}

// BeginWrite registers a write through the proxy about to be forwarded (ryw.Cache: the ryw interceptor calls it
// for every RPC that writes keys). Its EndWrite must follow, whatever happens.
func (k *KV) BeginWrite() uint64 { return k.watch.beginWrite() }

// EndWrite ends the write seq; resp is its reply, nil if it failed. A write whose reply says which revision it
// wrote (Put, a DeleteRange that deleted, a Txn whose branch wrote) has its invalidations counted as local; others
// (LeaseRevoke: its reply does not say whether the lease had keys, so its revision may be another write's; Election
// and Lock calls) as remote.
func (k *KV) EndWrite(seq uint64, req, resp any) {
	var rev int64
	switch r := resp.(type) {
	case *pb.PutResponse:
		rev = r.GetHeader().GetRevision()
	case *pb.DeleteRangeResponse:
		if r.Deleted > 0 {
			rev = r.GetHeader().GetRevision()
		}
	case *pb.TxnResponse:
		if t, ok := req.(*pb.TxnRequest); ok && wrote(t, r) {
			rev = r.GetHeader().GetRevision()
		}
	}
	k.watch.endWrite(seq, rev)
}

// Await returns once the cache has seen every write up to rev (or has been flushed instead: see invalidator.await).
func (k *KV) Await(ctx context.Context, rev int64) { k.watch.await(ctx, rev) }

// wrote reports whether the branch of r that ran (with its nested Txns) changed a key, as resp reports.
func wrote(r *pb.TxnRequest, resp *pb.TxnResponse) bool {
	ops := r.Failure
	if resp.Succeeded {
		ops = r.Success
	}
	for i, op := range ops {
		if i >= len(resp.Responses) {
			return true // not etcd's shape: assume it wrote
		}
		out := resp.Responses[i]
		switch {
		case op.GetRequestPut() != nil:
			return true
		case op.GetRequestDeleteRange() != nil && out.GetResponseDeleteRange().GetDeleted() > 0:
			return true
		case op.GetRequestTxn() != nil && out.GetResponseTxn() != nil && wrote(op.GetRequestTxn(), out.GetResponseTxn()):
			return true
		}
	}
	return false
}
