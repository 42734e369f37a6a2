// Package overrides is the one composition point for hand-written overrides of the generated passthrough. An
// override wraps the service it replaces (embedding the server it is given, so a method it does not shadow falls
// through to the passthrough) and is wired here by one line.
//
// It owns that wiring, the order of the overrides, what they run on (Deps) and what they do (Config); it must not hold
// an override's logic, which is its package's, nor know of the server that uses it (package proxy).
package overrides

import (
	"context"
	"sync"

	"github.com/etcdproxy/etcdproxy/gen"
	"github.com/etcdproxy/etcdproxy/internal/encoded"
	"github.com/etcdproxy/etcdproxy/overrides/crashguard"
	"github.com/etcdproxy/etcdproxy/overrides/kvcache"
	"github.com/etcdproxy/etcdproxy/overrides/leader"
	"github.com/etcdproxy/etcdproxy/overrides/lease"
	"github.com/etcdproxy/etcdproxy/overrides/members"
	"github.com/etcdproxy/etcdproxy/overrides/namespace"
	"github.com/etcdproxy/etcdproxy/overrides/ryw"
	"github.com/etcdproxy/etcdproxy/overrides/watch"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/mem"
)

// Deps are what the overrides run on: the connections to etcd and the logger. What they do is Config.
type Deps struct {
	// Upstream is the connection to etcd that client calls are forwarded on.
	Upstream *clientv3.Client
	// Internal is the connection for the proxy's own calls (leader probe, cache invalidation, the registered
	// proxies' watch), with the proxy's own credentials if it has any; nil means Upstream.
	Internal *clientv3.Client
	Logger   *zap.Logger
}

// Config is what the overrides do, each field an override's own options; the zero value is the production
// setting with the read cache off. It is declared here only: proxy.Config carries it as its Overrides.
type Config struct {
	// Leader tunes the leader tracker (tests shorten or lengthen its retry). Its ProbePrefix is set from
	// Namespace by Apply.
	Leader leader.Options
	// Watch tunes the watch coalescer.
	Watch watch.Options
	// Lease tunes the keepalive sharing (--lease-keepalive-streams).
	Lease lease.Options
	// KVCache configures the read cache (serializable reads, and linearizable ones unless SerializableOnly);
	// MaxBytes 0 turns it off. Its Floor is set by Apply when ReadYourWrites.Ordering is on.
	KVCache kvcache.Options
	// ReadYourWrites tunes the read-your-writes tracker (ordering: --experimental-serializable-ordering).
	ReadYourWrites ryw.Options
	// Namespace, if set, confines clients to the keys under this prefix (--namespace): see overrides/namespace.
	Namespace string
	// Members says whether MemberList answers with the proxies instead of etcd's members (--advertise-client-url,
	// --resolver-prefix): see overrides/members. Its Prefix is the registration prefix as stored in etcd
	// (Namespace is not added to it).
	Members members.Options
}

// Set is what the overrides add to the proxy besides replaced services.
type Set struct {
	// Leader tracks whether the cluster has a leader.
	Leader *leader.Tracker
	// KVCache is the read cache, nil when it is off.
	KVCache *kvcache.KV
	// Unary and Stream are server interceptors, outermost first.
	Unary  []grpc.UnaryServerInterceptor
	Stream []grpc.StreamServerInterceptor
	// RawRange, if set, answers a KV.Range call from its request's bytes when the read cache can (a hit), before
	// the request is decoded and without Unary's interceptors, having checked what they would (encoded.Raw): set
	// only when no namespace rewrites the keys (the cache sees the namespaced request) and no serializable ordering
	// follows every read's revision (ryw). nil otherwise, and when the cache is off.
	RawRange encoded.Answer

	closers   []func()
	closeOnce sync.Once
}

// Close stops what the overrides started, last started first. Calls after the first do nothing.
func (s *Set) Close() {
	s.closeOnce.Do(func() {
		for i := len(s.closers) - 1; i >= 0; i-- {
			s.closers[i]()
		}
	})
}

// Apply replaces services of s with their overrides as c says, running on d, one line each, innermost first.
func Apply(s *gen.Services, d Deps, c Config) *Set {
	set := &Set{}
	c.Leader.ProbePrefix = c.Namespace
	cc := d.Upstream.ActiveConnection()
	own := d.Upstream
	if d.Internal != nil {
		own = d.Internal
	}
	internal := own.ActiveConnection()

	set.Leader = closing(set, leader.NewTracker(internal, d.Logger.Named("leader"), c.Leader))
	set.Unary = append(set.Unary, set.Leader.UnaryInterceptor)
	set.Stream = append(set.Stream, set.Leader.StreamInterceptor)
	s.KV = leader.NewKV(s.KV, set.Leader)
	s.Lease = leader.NewLease(s.Lease, set.Leader)
	s.Lease = closing(set, lease.New(s.Lease, cc, set.Leader, d.Logger.Named("lease"), c.Lease))
	s.Watch = closing(set, watch.New(s.Watch, cc, set.Leader, d.Logger.Named("watch"), c.Watch))
	writes := ryw.New(c.ReadYourWrites)
	closing(set, writes.Seed(pb.NewKVClient(internal), []byte(c.Namespace+"\x00etcdproxy/ordering")))
	set.Unary = append(set.Unary, writes.Unary)
	s.KV = ryw.NewKV(s.KV, writes)
	if c.KVCache.MaxBytes > 0 {
		if c.ReadYourWrites.Ordering {
			c.KVCache.Floor = writes.Floor
		}
		set.KVCache = closing(set, kvcache.New(s.KV, internal, d.Logger.Named("kvcache"), c.KVCache))
		writes.KeepCoherent(set.KVCache)
		s.KV = set.KVCache
		s.Auth = kvcache.NewAuth(s.Auth, set.KVCache)
		if c.Namespace == "" && !c.ReadYourWrites.Ordering && len(set.Unary) == rawReviewed {
			set.RawRange = rawRange(set.KVCache, set.Leader)
		}
	}
	s.Cluster = closing(set, members.New(s.Cluster, own, d.Logger.Named("members"), c.Members))
	s.Maintenance = crashguard.New(s.Maintenance)
	namespace.Apply(s, c.Namespace) // outermost: every override above sees namespaced keys
	return set
}

// rawReviewed is how many unary interceptors rawRange has been reviewed against (the leader tracker's and ryw's):
// one added to Set.Unary turns RawRange off, and TestRawHits fails, until it is reviewed there.
const rawReviewed = 2

// rawRange answers hits of kv from their request's bytes while the cluster has a leader, around Set.Unary: the
// leader tracker's interceptor refuses a require-leader call when there is none (then Range serves the call, which
// goes through it); ryw's does nothing to a read without ordering.
func rawRange(kv *kvcache.KV, t *leader.Tracker) encoded.Answer {
	return func(ctx context.Context, req []byte) (parts [2]mem.Buffer, n int, ok bool) {
		if !t.HasLeader() {
			return parts, 0, false
		}
		return kv.RawHit(ctx, req)
	}
}

// closing registers c to be closed with set, and returns it.
func closing[C interface{ Close() }](set *Set, c C) C {
	set.closers = append(set.closers, c.Close)
	return c
}
