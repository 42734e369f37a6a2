// Package overrides is the one composition point for hand-written overrides of the generated passthrough. An
// override wraps the service it replaces (embedding the server it is given, so a method it does not shadow falls
// through to the passthrough) and is wired here by one line.
package overrides

import (
	"sync"

	"github.com/etcdproxy/etcdproxy/gen"
	"github.com/etcdproxy/etcdproxy/overrides/kvcache"
	"github.com/etcdproxy/etcdproxy/overrides/leader"
	"github.com/etcdproxy/etcdproxy/overrides/lease"
	"github.com/etcdproxy/etcdproxy/overrides/watch"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// Deps are the dependencies an override may take.
type Deps struct {
	// Upstream is the proxy's clientv3 connection to etcd, for client calls.
	Upstream *clientv3.Client
	// Internal is the connection for the proxy's own calls (leader probe, cache invalidation), with the proxy's
	// own credentials if it has any; nil means Upstream.
	Internal *clientv3.Client
	Logger   *zap.Logger
	// Leader tunes the leader tracker (tests shorten or lengthen its retry).
	Leader leader.Options
	// Watch tunes the watch coalescer.
	Watch watch.Options
	// KVCache configures the cache of serializable reads; MaxBytes 0 turns it off.
	KVCache kvcache.Options
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

// Apply replaces services of s with their overrides, one line each, innermost first.
func Apply(s *gen.Services, d Deps) *Set {
	set := &Set{}
	cc := d.Upstream.ActiveConnection()
	internal := cc
	if d.Internal != nil {
		internal = d.Internal.ActiveConnection()
	}

	set.Leader = leader.NewTracker(internal, d.Logger.Named("leader"), d.Leader)
	set.closers = append(set.closers, set.Leader.Close)
	set.Unary = append(set.Unary, set.Leader.UnaryInterceptor)
	set.Stream = append(set.Stream, set.Leader.StreamInterceptor)
	s.KV = leader.NewKV(s.KV, set.Leader)
	s.Lease = leader.NewLease(s.Lease, set.Leader)
	keepalive := lease.New(s.Lease, cc, d.Logger.Named("lease"))
	set.closers = append(set.closers, keepalive.Close)
	s.Lease = keepalive
	coalescer := watch.New(s.Watch, cc, d.Logger.Named("watch"), d.Watch)
	set.closers = append(set.closers, coalescer.Close)
	s.Watch = coalescer
	if d.KVCache.MaxBytes > 0 {
		cache := kvcache.New(s.KV, internal, d.Logger.Named("kvcache"), d.KVCache)
		set.KVCache = cache
		set.closers = append(set.closers, cache.Close)
		s.KV = cache
		s.Lease = kvcache.NewLease(s.Lease, cache)
		s.Auth = kvcache.NewAuth(s.Auth, cache)
	}

	return set
}
