package kvcache

import (
	"context"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
)

// Stored returns how many entries k's cache and its index hold (the cache's count after ccache's worker has
// applied what it was sent).
func (k *KV) Stored() (cached, indexed int) {
	k.cache.SyncUpdates()
	return k.cache.ItemCount(), k.index.len()
}

// Remembers reports whether k's doorkeeper remembers req, made with ctx's credentials, without remembering it.
func (k *KV) Remembers(ctx context.Context, req *pb.RangeRequest) bool {
	key, _, ok := cacheKey(ctx, req)
	if !ok || k.door == nil {
		return false
	}
	_, found := slotOf(k.door.locate(key))
	return found
}

// Waiters returns the number of misses waiting for reads in flight.
func (k *KV) Waiters() int {
	k.flights.mu.Lock()
	defer k.flights.mu.Unlock()
	n := 0
	for _, fl := range k.flights.m {
		n += fl.waiters
	}
	return n
}
