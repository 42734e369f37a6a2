// Package ryw makes every serializable read through the proxy read the client's own writes, whichever etcd member
// answers it and whether or not the read cache is on.
//
// The Tracker keeps the newest revision that this proxy has acknowledged for a write (its interceptor sees the
// reply of every RPC that writes keys: KeyWriter). A serializable Range, or a read-only all-serializable Txn
// (etcd serves both from the member's own store), answered with a header revision below it comes from a member
// that has not applied that write yet (the header revision of a local read is the member's applied revision). Such
// an answer is never returned: the read is sent again as it is, up to serializableRetries times (a retry is balanced
// to another member, usually one that has caught up), then once as a linearizable read, which etcd answers only
// once the member has applied everything committed before it. A read at an explicit revision that the answering
// member has not reached yet (etcd's "future revision" error) for a revision this proxy has acknowledged is treated
// the same way.
//
// It owns the acknowledged revision (Tracker) and the re-reads of an answer that is behind; it must not answer a read
// itself: every answer it returns is one the service below gave.
package ryw

import (
	"context"
	"math"
	"sync/atomic"
	"time"

	"github.com/etcdproxy/etcdproxy/overrides/internal/txn"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// serializableRetries bounds the serializable re-reads of an answer that was behind, before the linearizable one.
const serializableRetries = 2

// Cache is what the read cache does around a write through the proxy (kvcache.KV implements it).
type Cache interface {
	// BeginWrite registers a write about to be forwarded; EndWrite must follow it, whatever happens.
	BeginWrite() uint64
	// EndWrite ends the write seq; resp is nil if it failed.
	EndWrite(seq uint64, req, resp any)
	// Await returns once the cache has seen every write up to rev.
	Await(ctx context.Context, rev int64)
}

// Options tune a Tracker; the zero value is the default.
type Options struct {
	// Ordering (--experimental-serializable-ordering) also keeps serializable reads from going back in time
	// relative to any KV response the proxy has returned (reads included), not only to its writes: as clientv3's
	// ordering KV does for one client, for every client of the proxy. Without it only writes count.
	Ordering bool
}

// Tracker records the newest revision acknowledged for a write through this proxy (and, with Options.Ordering,
// the newest revision of any KV response it returned).
type Tracker struct {
	acked atomic.Int64
	seen  atomic.Int64 // with ordering: the newest header revision of a KV response returned
	// seeded, with ordering: seen is at least a revision etcd had committed when this proxy started (a linearizable
	// answer has come back since), so answers another proxy process gave before are covered too.
	seeded atomic.Bool
	opts   Options
	cache  Cache // nil when the read cache is off
}

// New returns a Tracker.
func New(opts Options) *Tracker { return &Tracker{opts: opts} }

// KeepCoherent makes every write through the proxy wait for cache. Call it before serving.
func (t *Tracker) KeepCoherent(cache Cache) { t.cache = cache }

// Acked returns the newest revision this proxy has acknowledged for a write.
func (t *Tracker) Acked() int64 { return t.acked.Load() }

// Floor returns the revision below which no serializable answer is returned: Acked, or with Options.Ordering the
// newest revision of any KV response returned; with ordering and no linearizable answer yet since the proxy
// started, every revision (math.MaxInt64: every serializable read is read linearizably).
func (t *Tracker) Floor() int64 {
	if t.opts.Ordering && !t.seeded.Load() {
		return math.MaxInt64
	}
	return max(t.acked.Load(), t.seen.Load())
}

// saw records the header revision of a KV answer returned; linearizable says etcd answered it through consensus or
// a read barrier, so its revision covers every answer any proxy gave before.
func (t *Tracker) saw(rev int64, linearizable bool) {
	raise(&t.seen, rev)
	if linearizable {
		t.seeded.Store(true)
	}
}

// Seed, with Ordering, makes one linearizable read (a count of key, with the proxy's own connection kv) as etcd
// grpc-proxy does before it serves, retried until it succeeds or Close; until a linearizable answer has come back
// (this one or a client's), serializable reads are read linearizably. Without Ordering it does nothing.
func (t *Tracker) Seed(kv pb.KVClient, key []byte) *Seeder {
	ctx, cancel := context.WithCancel(context.Background())
	sd := &Seeder{cancel: cancel, done: make(chan struct{})}
	if !t.opts.Ordering {
		close(sd.done)
		return sd
	}
	go func() {
		defer close(sd.done)
		for backoff := 50 * time.Millisecond; !t.seeded.Load(); backoff = min(2*backoff, 2*time.Second) {
			resp, err := kv.Range(ctx, &pb.RangeRequest{Key: key, CountOnly: true})
			if err == nil {
				t.saw(resp.Header.GetRevision(), true)
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
		}
	}()
	return sd
}

// Seeder is Seed's background read.
type Seeder struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// Close stops the read and waits for it.
func (sd *Seeder) Close() {
	sd.cancel()
	<-sd.done
}

// raise moves a up to rev, never down.
func raise(a *atomic.Int64, rev int64) {
	for {
		cur := a.Load()
		if rev <= cur || a.CompareAndSwap(cur, rev) {
			return
		}
	}
}

func (t *Tracker) ack(rev int64) { raise(&t.acked, rev) }

// linearizableRead reports whether req, a KV request that writes no key, was answered through a read barrier.
func linearizableRead(req any) bool {
	switch r := req.(type) {
	case *pb.RangeRequest:
		return !r.Serializable
	case *pb.TxnRequest:
		return !txn.Local(r)
	}
	return false
}

// kvMethods are the KV RPCs whose answers' revisions Options.Ordering keeps: what clientv3's ordering KV watches.
var kvMethods = map[string]bool{"/etcdserverpb.KV/Range": true, "/etcdserverpb.KV/Put": true,
	"/etcdserverpb.KV/DeleteRange": true, "/etcdserverpb.KV/Txn": true, "/etcdserverpb.KV/Compact": true}

// KeyWriter reports whether a call of the RPC method with req may write keys. Every method the proxy serves is
// classified in ryw_test.go (TestEveryMethodReviewed): a new etcd RPC fails that test until it is reviewed here.
func KeyWriter(method string, req any) bool {
	switch method {
	case "/etcdserverpb.KV/Put", "/etcdserverpb.KV/DeleteRange", "/etcdserverpb.Lease/LeaseRevoke",
		"/v3electionpb.Election/Campaign", "/v3electionpb.Election/Proclaim", "/v3electionpb.Election/Resign",
		"/v3lockpb.Lock/Lock", "/v3lockpb.Lock/Unlock":
		return true
	case "/etcdserverpb.KV/Txn":
		r, ok := req.(*pb.TxnRequest)
		return !ok || txn.Writes(r)
	}
	return false
}

// Unary is the server interceptor that sees every write: once a write succeeds, its revision is acknowledged and,
// with the read cache on, the reply waits until the cache has seen it.
func (t *Tracker) Unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if !KeyWriter(info.FullMethod, req) {
		if !t.opts.Ordering || !kvMethods[info.FullMethod] {
			return handler(ctx, req)
		}
		resp, err := handler(ctx, req)
		if err == nil {
			t.saw(headerRevision(resp), linearizableRead(req))
		}
		return resp, err
	}
	if t.cache == nil {
		resp, err := handler(ctx, req)
		if err == nil {
			t.ack(headerRevision(resp))
			if t.opts.Ordering {
				t.saw(headerRevision(resp), true)
			}
		}
		return resp, err
	}
	seq := t.cache.BeginWrite()
	var done any                                        // the reply, once the write succeeded
	defer func() { t.cache.EndWrite(seq, req, done) }() // even if the write panics
	resp, err := handler(ctx, req)
	if err != nil {
		return resp, err
	}
	done = resp
	rev := headerRevision(resp)
	t.ack(rev)
	if t.opts.Ordering {
		t.saw(rev, true)
	}
	t.cache.Await(ctx, rev)
	return resp, nil
}

func headerRevision(resp any) int64 {
	if h, ok := resp.(interface{ GetHeader() *pb.ResponseHeader }); ok {
		return h.GetHeader().GetRevision()
	}
	return 0
}

// KV checks the serializable reads of the KV service (below the read cache: it sees its misses only).
type KV struct {
	pb.KVServer
	t *Tracker
}

// NewKV wraps base.
func NewKV(base pb.KVServer, t *Tracker) *KV { return &KV{KVServer: base, t: t} }

// futureRev is etcd's answer to a read at a revision the member has not reached.
var futureRev = status.Convert(rpctypes.ErrGRPCFutureRev)

// behind reports whether an answer (resp, err) to a read at revision at (0: current) may miss a write acknowledged
// at acked.
func behind(acked, at int64, resp interface{ GetHeader() *pb.ResponseHeader }, err error) bool {
	if err != nil {
		s := status.Convert(err)
		return at > 0 && at <= acked && s.Code() == codes.OutOfRange && s.Message() == futureRev.Message()
	}
	return resp.GetHeader().GetRevision() < acked
}

// Range forwards the read; a serializable answer that is behind this proxy's writes is read again (see the package
// comment).
func (k *KV) Range(ctx context.Context, req *pb.RangeRequest) (*pb.RangeResponse, error) {
	if !req.Serializable {
		return k.KVServer.Range(ctx, req)
	}
	return read(ctx, k.t, req.Revision, req, k.KVServer.Range, func() (*pb.RangeResponse, error) {
		lin := proto.Clone(req).(*pb.RangeRequest)
		lin.Serializable = false
		return k.KVServer.Range(ctx, lin)
	})
}

// Txn forwards the transaction; one that etcd answers locally (read-only, every Range serializable) is checked as
// Range is. Its linearizable form has every Range linearizable; a Txn with compares but no op gets a linearizable
// count-only Range of its first compare's range in both branches (the same permission as the compare needs), whose
// response is taken out again. A Txn with neither (its answer carries nothing but the header) is only retried.
func (k *KV) Txn(ctx context.Context, req *pb.TxnRequest) (*pb.TxnResponse, error) {
	if !txn.Local(req) {
		return k.KVServer.Txn(ctx, req)
	}
	var lin func() (*pb.TxnResponse, error)
	switch {
	case len(req.Success) > 0 || len(req.Failure) > 0:
		lin = func() (*pb.TxnResponse, error) {
			l := proto.Clone(req).(*pb.TxnRequest)
			for _, ops := range [][]*pb.RequestOp{l.Success, l.Failure} {
				for _, op := range ops {
					op.GetRequestRange().Serializable = false
				}
			}
			return k.KVServer.Txn(ctx, l)
		}
	case len(req.Compare) > 0:
		lin = func() (*pb.TxnResponse, error) {
			l := proto.Clone(req).(*pb.TxnRequest)
			c := req.Compare[0]
			op := func() *pb.RequestOp {
				return &pb.RequestOp{Request: &pb.RequestOp_RequestRange{RequestRange: &pb.RangeRequest{
					Key: c.Key, RangeEnd: c.RangeEnd, CountOnly: true}}}
			}
			l.Success, l.Failure = []*pb.RequestOp{op()}, []*pb.RequestOp{op()}
			resp, err := k.KVServer.Txn(ctx, l)
			if err == nil {
				resp.Responses = nil
			}
			return resp, err
		}
	}
	return read(ctx, k.t, 0, req, k.KVServer.Txn, lin)
}

// read runs call(req) until its answer is not behind the tracker's floor when the read arrived (the writes
// acknowledged, and with ordering every KV answer returned), at most serializableRetries more times; then it
// returns lin() (if lin is nil, the last answer).
func read[Req any, Resp interface{ GetHeader() *pb.ResponseHeader }](ctx context.Context, t *Tracker, at int64,
	req Req, call func(context.Context, Req) (Resp, error), lin func() (Resp, error)) (Resp, error) {
	acked := t.Floor()
	if acked == math.MaxInt64 && lin != nil {
		// Ordering, and no linearizable answer yet since the proxy started: no serializable answer can be vouched for.
		resp, err := lin()
		if err == nil {
			t.saw(resp.GetHeader().GetRevision(), true)
		}
		return resp, err
	}
	resp, err := call(ctx, req)
	for i := 0; behind(acked, at, resp, err) && ctx.Err() == nil; i++ {
		if i == serializableRetries {
			if lin == nil {
				break
			}
			retries.WithLabelValues("linearizable").Inc()
			resp, err := lin()
			if err == nil {
				t.saw(resp.GetHeader().GetRevision(), true)
			}
			return resp, err
		}
		retries.WithLabelValues("serializable").Inc()
		resp, err = call(ctx, req)
	}
	return resp, err
}

// RangeStream forwards the read. A stream's chunks cannot be taken back once sent, so a serializable one is not
// checked after the fact: once the floor is above 0 (this proxy acknowledged a write or, with ordering, returned an
// answer), it is read linearizably, which etcd answers only from a member that has caught up. With ordering, its
// revision counts as any KV answer's.
func (k *KV) RangeStream(req *pb.RangeRequest, ss grpc.ServerStreamingServer[pb.RangeStreamResponse]) error {
	if req.Serializable && k.t.Floor() > 0 {
		lin := proto.CloneOf(req)
		lin.Serializable = false
		req = lin
	}
	if !k.t.opts.Ordering {
		return k.KVServer.RangeStream(req, ss)
	}
	return k.KVServer.RangeStream(req, &seenStream{ServerStreamingServer: ss, t: k.t, linearizable: !req.Serializable})
}

// seenStream records the revision of a RangeStream's answer (its last chunk carries the header).
type seenStream struct {
	grpc.ServerStreamingServer[pb.RangeStreamResponse]
	t            *Tracker
	linearizable bool
}

func (s *seenStream) Send(m *pb.RangeStreamResponse) error {
	if h := m.GetRangeResponse().GetHeader(); h != nil {
		s.t.saw(h.GetRevision(), s.linearizable)
	}
	return s.ServerStreamingServer.Send(m)
}
