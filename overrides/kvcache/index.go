package kvcache

import (
	"sync"

	"github.com/karlseguin/ccache/v3"
)

// index finds the cached entries a written key invalidates. Single-key entries are found by their key; range
// entries (prefixes, ranges, "every key from") are checked one by one, so an event costs one map lookup plus one
// comparison per cached range. It stays in step with the cache, so it never outgrows it: it holds at most one
// entry per cache key (a new entry replaces the old, whether or not ccache reports the old one's removal), an
// entry leaves when ccache evicts it (evicted), and invalidation takes entries out itself (covering).
type index struct {
	// mu protects byCacheKey, byKey and ranges.
	mu         sync.Mutex
	byCacheKey map[string]*entry
	byKey      map[string]map[*entry]struct{}
	ranges     map[*entry]struct{}
}

func newIndex() *index {
	return &index{byCacheKey: map[string]*entry{}, byKey: map[string]map[*entry]struct{}{}, ranges: map[*entry]struct{}{}}
}

func (x *index) add(e *entry) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if old := x.byCacheKey[e.key]; old != nil {
		x.remove(old)
	}
	x.byCacheKey[e.key] = e
	if e.end == "" {
		set := x.byKey[e.start]
		if set == nil {
			set = map[*entry]struct{}{}
			x.byKey[e.start] = set
		}
		set[e] = struct{}{}
		return
	}
	x.ranges[e] = struct{}{}
}

// remove takes e out of the index and reports whether it was there. Called with x.mu held.
func (x *index) remove(e *entry) bool {
	if x.byCacheKey[e.key] != e {
		return false // replaced or invalidated already
	}
	delete(x.byCacheKey, e.key)
	if e.end == "" {
		if set := x.byKey[e.start]; set != nil {
			delete(set, e)
			if len(set) == 0 {
				delete(x.byKey, e.start)
			}
		}
		return true
	}
	delete(x.ranges, e)
	return true
}

// evicted is ccache's OnDelete callback. ccache calls it for every entry it drops: evicted to stay within size,
// deleted by an invalidation, or replaced. The last two are out of the index already, so an entry still in it was
// evicted.
func (x *index) evicted(item *ccache.Item[*entry]) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.remove(item.Value()) {
		evictions.Inc()
	}
}

// covering returns the entries whose range holds key, and takes them out of the index.
func (x *index) covering(key string) []*entry {
	x.mu.Lock()
	defer x.mu.Unlock()
	var out []*entry
	for e := range x.byKey[key] {
		out = append(out, e)
	}
	for e := range x.ranges {
		if contains(e.start, e.end, key) {
			out = append(out, e)
		}
	}
	for _, e := range out {
		x.remove(e)
	}
	return out
}

// clear empties the index.
func (x *index) clear() {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.byCacheKey = map[string]*entry{}
	x.byKey = map[string]map[*entry]struct{}{}
	x.ranges = map[*entry]struct{}{}
}

// len returns the number of indexed entries.
func (x *index) len() int {
	x.mu.Lock()
	defer x.mu.Unlock()
	return len(x.byCacheKey)
}

// contains reports whether the range [start, end) holds key, with etcd's conventions: end "" is the single key
// start, end "\x00" every key from start on.
func contains(start, end, key string) bool {
	switch end {
	case "":
		return key == start
	case "\x00":
		return key >= start
	default:
		return key >= start && key < end
	}
}
