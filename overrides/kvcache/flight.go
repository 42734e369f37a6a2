package kvcache

import "sync"

// flights lets identical misses share one read from etcd: the first miss of a key reads (the leader); one that
// comes while that read is in flight waits for it and then looks in the cache again, as any read would. So a herd
// of identical reads after an invalidation costs etcd one read, and a waiter gets exactly what a cache hit would
// give it then: the leader's answer only if the cache took it (same generation, not older than what the
// invalidation watch had seen, which is how a write through the proxy is read back), else a read of its own.
type flights struct {
	mu sync.Mutex
	m  map[string]chan struct{} // by cache key: closed when the leader's read and store are done
}

// join returns the channel of the read in flight for key, or, if there is none, makes the caller its leader:
// done must then be called once the leader has stored (or not) its answer.
func (f *flights) join(key string) (wait <-chan struct{}, done func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if c, ok := f.m[key]; ok {
		return c, nil
	}
	if f.m == nil {
		f.m = map[string]chan struct{}{}
	}
	c := make(chan struct{})
	f.m[key] = c
	return nil, func() {
		f.mu.Lock()
		delete(f.m, key)
		f.mu.Unlock()
		close(c)
	}
}
