package kvcache

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

var (
	hits = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "kvcache", Name: "hits_total",
		Help: "Serializable Range requests answered from the cache.",
	})
	rawHits = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "kvcache", Name: "raw_hits_total",
		Help: "Cache hits answered from the request's bytes before it was decoded (counted in hits_total too).",
	})
	misses = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "kvcache", Name: "misses_total",
		Help: "Cacheable Range requests forwarded to etcd (not cached, expired, invalidated, or the cache not live).",
	})
	sharedMisses = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "kvcache", Name: "shared_misses_total",
		Help: "Cacheable Range requests that waited for an identical read in flight instead of reading etcd themselves " +
			"(each then counts as a hit if the cache took that read's answer, else as a miss).",
	})
	firstMisses = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "kvcache", Name: "first_misses_total",
		Help: "Cacheable Range misses whose answer was not stored because it was the first miss of its key that the " +
			"cache remembers (the doorkeeper, --kv-cache-admit=second): the key's next miss is stored.",
	})
	invalidations = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "kvcache", Name: "invalidations_total",
		Help: "Entries dropped because a key in their range was written, seen by the invalidation watch; source is " +
			"local for a write made through this proxy, remote for any other.",
	}, []string{"source"})
	// The two series, looked up once: they are counted on every invalidation.
	invalidatedLocal  = invalidations.WithLabelValues("local")
	invalidatedRemote = invalidations.WithLabelValues("remote")
	evictions         = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "kvcache", Name: "evictions_total",
		Help: "Entries ccache evicted to keep the cache within its size (invalidations and flushes not counted).",
	})
	authPolls = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "kvcache", Name: "auth_polls_total",
		Help: "AuthStatus calls made to follow etcd's auth revision (each is a raft entry in etcd); none while no hit is served.",
	})
	flushes = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "kvcache", Name: "flushes_total",
		Help: "Whole-cache flushes because a write through the proxy was not seen in time.",
	})
	entries = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "etcdproxy", Subsystem: "kvcache", Name: "entries",
		Help: "Entries in the cache.",
	}, func() float64 {
		n := 0
		caches.Range(func(k, _ any) bool {
			n += k.(*KV).cache.ItemCount()
			return true
		})
		return float64(n)
	})
	// caches are the open caches, for the entries gauge.
	caches    sync.Map
	cacheLive = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "etcdproxy", Subsystem: "kvcache", Name: "live",
		Help: "1 while the invalidation watch is live and the cache may serve; 0 also while the watch is stopped because no cacheable read came (watch_idle is 1 then, and the proxy is healthy).",
	})
	watchIdle = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "etcdproxy", Subsystem: "kvcache", Name: "watch_idle",
		Help: "1 while the invalidation watch is stopped because no cacheable read came for --kv-cache-watch-idle (the next one starts it; live is 0 meanwhile).",
	})
	writeWait = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "etcdproxy", Subsystem: "kvcache", Name: "write_wait_seconds",
		Help:    "Time a write through the proxy waited for the invalidation watch to see it: the staleness window of the cache.",
		Buckets: prometheus.ExponentialBuckets(0.00005, 2, 16),
	})
	linHits = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "kvcache", Name: "linearizable_hits_total",
		Help: "Linearizable Range requests answered from the cache, after a barrier read and the invalidation watch reaching its revision.",
	})
	linBatches = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "kvcache", Name: "linearizable_batches_total",
		Help: "Barrier reads sent to etcd (one linearizable count-only Range each), each shared by the linearizable reads that came before it was sent.",
	})
	linWait = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "etcdproxy", Subsystem: "kvcache", Name: "linearizable_wait_seconds",
		Help:    "Time a barrier read's batch waited for the invalidation watch to reach the barrier's revision (timeouts included).",
		Buckets: prometheus.ExponentialBuckets(0.00005, 2, 16),
	})
	linFallbacks = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "kvcache", Name: "linearizable_fallbacks_total",
		Help: "Linearizable Range requests read from etcd instead of the cache, by reason: miss (not cached; the answer " +
			"fills the cache), auth (etcd refused the barrier read: auth is on), barrier_failed, watch_behind (the " +
			"invalidation watch did not reach the barrier's revision in time), timeout, slow_barrier, backoff (after " +
			"a failed barrier or wait), not_live, uncacheable, closed.",
	}, []string{"reason"})
)

// linFallbackReasons are the reasons of linFallbacks, every series created at start.
var linFallbackReasons = []string{"miss", "auth", "barrier_failed", "watch_behind", "timeout", "slow_barrier",
	"backoff", "not_live", "uncacheable", "closed"}

func init() {
	for _, r := range linFallbackReasons {
		linFallbacks.WithLabelValues(r)
	}
	prometheus.MustRegister(hits, rawHits, misses, sharedMisses, firstMisses, invalidations, evictions, authPolls, flushes, entries, cacheLive, watchIdle, writeWait,
		linHits, linBatches, linWait, linFallbacks)
}
