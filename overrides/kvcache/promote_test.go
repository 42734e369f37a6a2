package kvcache

import (
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"

	"github.com/karlseguin/ccache/v3"
)

// TestLookupPromotes: an entry found by a lookup promoteAfter or more after it was stored or last promoted moves
// to the front of the LRU list, so that eviction takes older entries first; one found sooner stays where it is.
func TestLookupPromotes(t *testing.T) {
	defer func(d time.Duration) { promoteAfter = d }(promoteAfter)
	// clock reads an hour more than the process has run, so that an entry whose storing did not count as its last
	// promotion (promoted 0) is due for one even with the minute below.
	defer func(s time.Time) { started = s }(started)
	started = started.Add(-time.Hour)
	for _, c := range []struct {
		name         string
		promoteAfter time.Duration
		wait         bool // wait promoteAfter between storing the four entries and looking up "a"
		evicted      string
	}{
		// A minute, not the 50 ms waited below: storing four entries waits for ccache's worker four times, which
		// a busy machine running the race detector can stretch past 50 ms, and a would be promoted.
		{name: "looked up at once, a is the oldest and is evicted", promoteAfter: time.Minute, evicted: "a"},
		{name: "looked up later, a is promoted and b is evicted", promoteAfter: 50 * time.Millisecond, wait: true,
			evicted: "b"},
	} {
		t.Run(c.name, func(t *testing.T) {
			promoteAfter = c.promoteAfter
			k := &KV{index: newIndex()}
			k.cache = ccache.New(configure(4).ItemsToPrune(1).OnDelete(k.dropped))
			defer k.cache.Stop()
			keep := func(key string) {
				k.keep(&entry{key: key, start: key, resp: &pb.RangeResponse{}, size: 1, ttl: time.Minute})
				k.cache.SyncUpdates()
			}
			for _, key := range []string{"a", "b", "c", "d"} { // a at the back of the list, d at the front
				keep(key)
			}
			if c.wait {
				time.Sleep(promoteAfter + 10*time.Millisecond)
			}
			for range 3 {
				if k.lookup("a") == nil {
					t.Fatal("a is not found")
				}
			}
			k.cache.SyncUpdates()
			keep("e") // one more than the cache holds: ccache evicts one, from the back of the list
			for _, key := range []string{"a", "b", "c", "d", "e"} {
				if gone := k.cache.GetWithoutPromote(key) == nil; gone != (key == c.evicted) {
					t.Errorf("%s evicted: %v, want %v", key, gone, key == c.evicted)
				}
			}
		})
	}
}
