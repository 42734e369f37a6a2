package kvcache

import (
	"fmt"
	"testing"
	"time"

	"github.com/karlseguin/ccache/v3"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
)

// TestIndexFollowsEvictions: the invalidation index is bounded by the cache's capacity, however many entries pass
// through it (etcd's grpc-proxy's grows without bound): entries evicted for size, replaced, or deleted leave it.
// (ccache may drop a just-replaced entry from its map before its list, so the index can briefly hold entries the
// map no longer has; they are still in ccache's list, which MaxSize bounds, and leave with it.)
func TestIndexFollowsEvictions(t *testing.T) {
	x := newIndex()
	cache := ccache.New(ccache.Configure[*entry]().MaxSize(100).ItemsToPrune(10).OnDelete(x.evicted))
	defer cache.Stop()
	for i := 0; i < 10000; i++ {
		key := fmt.Sprint("k", i%500)
		e := &entry{key: key, start: key, resp: &pb.RangeResponse{}, size: 1}
		if i%3 == 0 {
			e.end = "\x00"
		}
		cache.Set(key, e, 0)
		x.add(e)
	}
	cache.SyncUpdates()
	cache.GC()
	cache.SyncUpdates()
	const capacity = 100
	if got := x.len(); got > capacity {
		t.Errorf("after 10000 entries through a cache of %d, the index holds %d", capacity, got)
	}
	for _, key := range []string{"k1", "k499"} {
		for _, e := range x.covering(key) {
			cache.Delete(e.key)
		}
		if left := x.covering(key); len(left) != 0 {
			t.Errorf("%d entries covering %s left after invalidation", len(left), key)
		}
	}
}

func TestContains(t *testing.T) {
	for _, tc := range []struct {
		start, end, key string
		want            bool
	}{
		{"a", "", "a", true},
		{"a", "", "ab", false},
		{"a", "\x00", "zzz", true},
		{"b", "\x00", "a", false},
		{"a", "b", "a\xff", true},
		{"a", "b", "b", false},
	} {
		if got := contains(tc.start, tc.end, tc.key); got != tc.want {
			t.Errorf("contains(%q, %q, %q) = %v", tc.start, tc.end, tc.key, got)
		}
	}
}

// TestKeepThenEvict: entries that ccache evicts as soon as it has them (a cache a few entries large, pruned whole)
// leave the index too, so it never holds entries the cache has dropped.
func TestKeepThenEvict(t *testing.T) {
	k := &KV{index: newIndex(), opts: Options{TTL: time.Minute}}
	k.cache = ccache.New(ccache.Configure[*entry]().MaxSize(5).ItemsToPrune(500).OnDelete(k.index.evicted))
	defer k.cache.Stop()
	for i := 0; i < 20000; i++ {
		key := fmt.Sprint("k", i)
		k.keep(&entry{key: key, start: key, resp: &pb.RangeResponse{}, size: 1})
	}
	k.cache.SyncUpdates()
	k.cache.GC()
	k.cache.SyncUpdates()
	if got, cached := k.index.len(), k.cache.ItemCount(); got > cached {
		t.Errorf("the index holds %d entries, the cache %d: the index kept entries ccache evicted", got, cached)
	}
}
