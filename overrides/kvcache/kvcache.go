// Package kvcache overrides KV with a coherent cache of serializable reads (github.com/karlseguin/ccache/v3).
//
// Replaces: Range (serializable, current revision: served from the cache when it can vouch for an entry), Put,
// DeleteRange, Txn and Lease.LeaseRevoke (forwarded, then held until the cache has seen their revision, so a client
// reads its own writes through this proxy), and the Auth RPCs that can take a right away (forwarded, then the cache
// is flushed). RangeStream and Compact fall through untouched.
//
// Guarantees:
//   - Linearizable reads always go to etcd; so do reads at a historical revision (revision > 0), whose answer
//     depends on compaction, which the proxy would otherwise have to track: etcd answers them, compacted error
//     included, and a compaction never stops current-revision reads from being cached.
//   - Coherence: one keyspace-wide upstream watch (invalidate.go) invalidates every entry whose range holds a key
//     written anywhere, through this proxy or not. While that watch is not live (startup, reconnect, leader loss,
//     no permission to watch), the cache serves nothing and stores nothing. A response is stored only if no write
//     the cache has seen is newer than it, so a fill racing a write cannot store a stale answer. TTL is a backstop.
//   - No client gets an answer its credentials would not get from etcd: the caller's token and authorization
//     metadata are part of the cache key, and a permission change flushes the cache (auth.go): at once when made
//     through this proxy, within about a second when made elsewhere.
//   - A cached response is shared, never mutated.
package kvcache

import (
	"context"
	"time"

	"github.com/etcdproxy/etcdproxy/overrides/internal/shared"
	"github.com/karlseguin/ccache/v3"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

// Options configure the cache.
type Options struct {
	// MaxBytes bounds the cache (the encoded size of the cached responses plus their keys); 0 disables it.
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
}

// KV is the caching override of the KV service.
type KV struct {
	pb.KVServer
	opts   Options
	cache  *ccache.Cache[*entry]
	index  *index
	watch  *invalidator
	logger *zap.Logger

	stopAuth context.CancelFunc
	authDone chan struct{}
}

// New wraps base. The invalidation watch runs on cc until Close.
func New(base pb.KVServer, cc grpc.ClientConnInterface, lg *zap.Logger, opts Options) *KV {
	if opts.TTL <= 0 {
		opts.TTL = 30 * time.Second
	}
	if opts.WriteWait <= 0 {
		opts.WriteWait = time.Second
	}
	if opts.AuthPoll == 0 {
		opts.AuthPoll = time.Second
	}
	k := &KV{KVServer: base, opts: opts, logger: lg, index: newIndex()}
	k.cache = ccache.New(ccache.Configure[*entry]().MaxSize(opts.MaxBytes).OnDelete(k.index.evicted))
	k.watch = newInvalidator(cc, k, lg)
	go k.watch.run()
	var ctx context.Context
	ctx, k.stopAuth = context.WithCancel(context.Background())
	k.authDone = make(chan struct{})
	if opts.AuthPoll > 0 {
		go k.authWatch(ctx, cc, k.authDone)
	} else {
		close(k.authDone)
	}
	caches.Store(k, nil)
	return k
}

// Live reports whether the invalidation watch is live, so that the cache may serve.
func (k *KV) Live() bool {
	_, live := k.watch.state()
	return live
}

// Close stops the invalidation watch and the cache.
func (k *KV) Close() {
	caches.Delete(k)
	k.stopAuth()
	<-k.authDone
	k.watch.stop()
	k.cache.Stop()
}

// entry is a cached response.
type entry struct {
	key   string // the cache key
	resp  *pb.RangeResponse
	start string // the request's range: [start, end), end "" for a single key, "\x00" for every key from start
	end   string
	gen   uint64 // the invalidator's generation when stored
	size  int64
}

// Size is the entry's weight against MaxBytes.
func (e *entry) Size() int64 { return e.size }

// cacheKey identifies a request and the credentials it is made with.
func cacheKey(ctx context.Context, req *pb.RangeRequest) (string, bool) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(req)
	if err != nil {
		return "", false
	}
	c := shared.CredsOf(ctx)
	return c.Token + "\x00" + c.Authorization + "\x00" + string(b), true
}

// cacheable reports whether req may be answered from the cache: a serializable read at the current revision.
func cacheable(req *pb.RangeRequest) bool {
	return req.Serializable && req.Revision == 0
}

// Range serves serializable current-revision reads from the cache when it can vouch for the entry.
func (k *KV) Range(ctx context.Context, req *pb.RangeRequest) (*pb.RangeResponse, error) {
	if !cacheable(req) {
		return k.KVServer.Range(ctx, req)
	}
	key, ok := cacheKey(ctx, req)
	if !ok {
		return k.KVServer.Range(ctx, req)
	}
	gen, live := k.watch.state()
	if live {
		if item := k.cache.Get(key); item != nil && !item.Expired() && item.Value().gen == gen {
			hits.Inc()
			return item.Value().resp, nil
		}
	}
	misses.Inc()
	resp, err := k.KVServer.Range(ctx, req)
	if err != nil || !live {
		return resp, err
	}
	e := &entry{key: key, resp: resp, start: string(req.Key), end: string(req.RangeEnd), gen: gen,
		size: int64(proto.Size(resp) + len(key))}
	k.watch.store(e, resp.Header.GetRevision(), func() { k.keep(e) })
	return resp, nil
}

// keep stores e: in the index first, then in ccache. ccache may evict e as soon as it has it (its worker prunes
// from another goroutine, the whole list when a few large entries exceed the size), and an eviction takes e out
// of the index only if e is in it already; the other order could index an entry ccache has dropped, for good.
// Called under the invalidator's lock, so no invalidation runs between the two.
func (k *KV) keep(e *entry) {
	k.index.add(e)
	k.cache.Set(e.key, e, k.opts.TTL)
}

// Put forwards the write and returns once the cache has seen it.
func (k *KV) Put(ctx context.Context, req *pb.PutRequest) (*pb.PutResponse, error) {
	return write(ctx, k, func() (*pb.PutResponse, error) { return k.KVServer.Put(ctx, req) },
		func(*pb.PutResponse) bool { return true })
}

// DeleteRange forwards the write and returns once the cache has seen it.
func (k *KV) DeleteRange(ctx context.Context, req *pb.DeleteRangeRequest) (*pb.DeleteRangeResponse, error) {
	return write(ctx, k, func() (*pb.DeleteRangeResponse, error) { return k.KVServer.DeleteRange(ctx, req) },
		func(r *pb.DeleteRangeResponse) bool { return r.Deleted > 0 })
}

// Txn forwards the transaction; one that wrote (in either branch, at any depth) returns once the cache has seen it.
func (k *KV) Txn(ctx context.Context, req *pb.TxnRequest) (*pb.TxnResponse, error) {
	if !writes(req) {
		return k.KVServer.Txn(ctx, req)
	}
	return write(ctx, k, func() (*pb.TxnResponse, error) { return k.KVServer.Txn(ctx, req) },
		func(r *pb.TxnResponse) bool { return wrote(req, r) })
}

// write runs call, a write through the proxy, and returns once the cache has seen its revision. wrote reports
// whether a successful call changed a key (for the attribution of invalidations to this proxy's writes).
func write[R interface{ GetHeader() *pb.ResponseHeader }](ctx context.Context, k *KV, call func() (R, error),
	wrote func(R) bool) (R, error) {
	seq := k.watch.beginWrite()
	var rev int64
	defer func() { k.watch.endWrite(seq, rev) }() // even if call panics
	resp, err := call()
	if err == nil {
		if wrote(resp) {
			rev = resp.GetHeader().GetRevision()
		}
		k.watch.await(ctx, resp.GetHeader().GetRevision())
	}
	return resp, err
}

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

// writes reports whether a Txn may write: any Put or DeleteRange in either branch, nested Txns included.
func writes(r *pb.TxnRequest) bool {
	for _, ops := range [][]*pb.RequestOp{r.Success, r.Failure} {
		for _, op := range ops {
			switch {
			case op.GetRequestPut() != nil, op.GetRequestDeleteRange() != nil:
				return true
			case op.GetRequestTxn() != nil && writes(op.GetRequestTxn()):
				return true
			}
		}
	}
	return false
}

// Lease holds LeaseRevoke until the cache has seen the deletion of the lease's keys.
type Lease struct {
	pb.LeaseServer
	kv *KV
}

// NewLease wraps base; kv is the cache to keep coherent.
func NewLease(base pb.LeaseServer, kv *KV) *Lease { return &Lease{LeaseServer: base, kv: kv} }

// LeaseRevoke forwards the call and returns once the cache has seen its revision.
func (l *Lease) LeaseRevoke(ctx context.Context, req *pb.LeaseRevokeRequest) (*pb.LeaseRevokeResponse, error) {
	// The response does not tell whether the lease had keys: its header revision is then the last write's, which
	// may have been made elsewhere. So the keys a revoke deletes count as remote invalidations.
	return write(ctx, l.kv, func() (*pb.LeaseRevokeResponse, error) { return l.LeaseServer.LeaseRevoke(ctx, req) },
		func(*pb.LeaseRevokeResponse) bool { return false })
}
