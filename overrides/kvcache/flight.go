package kvcache

import "sync"

// flights lets identical misses share one read from etcd: the first miss of a key reads (the leader); one that
// comes while that read is in flight waits for it and then looks in the cache again, as any read would. So a herd
// of identical reads after an invalidation costs etcd one read, and a waiter gets exactly what a cache hit would
// give it then: the leader's answer only if the cache took it (same generation, not older than what the
// invalidation watch had seen, which is how a write through the proxy is read back), else a read of its own.
//
// Waiters learn of the leader's answer only through the cache, so a leader with waiters stores its answer even
// on its key's first miss (admit.go): a herd on a key nobody has read still costs etcd one read.
type flights struct {
	mu sync.Mutex
	m  map[string]*flight // by cache key
}

// flight is one leader's read of key.
type flight struct {
	f       *flights
	key     string
	done    chan struct{} // closed when the leader's read and store are done
	waiters int           // the misses that joined it (under f.mu)
}

// join returns the channel of the read in flight for key, or, if there is none, makes the caller its leader: its
// flight's finish must then be called once the leader has stored (or not) its answer.
func (f *flights) join(key string) (wait <-chan struct{}, lead *flight) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if fl, ok := f.m[key]; ok {
		fl.waiters++
		return fl.done, nil
	}
	if f.m == nil {
		f.m = map[string]*flight{}
	}
	fl := &flight{f: f, key: key, done: make(chan struct{})}
	f.m[key] = fl
	return nil, fl
}

// shared reports whether other misses wait for the leader's answer. If none does, the flight takes no more: a
// miss that comes later leads a read of its own, rather than wait for an answer the leader is not going to store.
// A nil flight (a read that leads none) is shared with no one.
func (fl *flight) shared() bool {
	if fl == nil {
		return false
	}
	fl.f.mu.Lock()
	defer fl.f.mu.Unlock()
	if fl.waiters > 0 {
		return true
	}
	fl.leave()
	return false
}

// finish ends the flight: its waiters look in the cache.
func (fl *flight) finish() {
	fl.f.mu.Lock()
	fl.leave()
	fl.f.mu.Unlock()
	close(fl.done)
}

// leave takes the flight out of the map, unless it has left already (another flight of its key may be in it
// now). Called with f.mu held.
func (fl *flight) leave() {
	if fl.f.m[fl.key] == fl {
		delete(fl.f.m, fl.key)
	}
}
