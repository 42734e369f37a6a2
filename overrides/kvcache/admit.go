package kvcache

import (
	"hash/maphash"
	"sync/atomic"
)

// Admission (overrides/README.md, "kvcache: decisions"): a miss's answer is stored only when its key is likely to
// be read again. Storing an answer costs the proxy its encoding, an index insertion, ccache's Set (whose worker
// goroutine is woken through a channel at each one) and the GC its entry drives, about 10 µs per read in the
// benchmark's cold serializable reads, where keys are never read again and no stored entry is ever used.
//
// So the first miss of a cache key is only remembered, by a doorkeeper, and its answer is stored (under the same
// conditions as ever: invalidator.store) when the key misses again while the doorkeeper still remembers it, that is:
// admit stores the answer to a miss of key if
//  1. the doorkeeper remembers key: its last miss, or its entry's removal (invalidated, evicted or replaced:
//     dropped), was recent enough not to have been pushed out (doorkeeper); a key read twice is cached from its
//     second read on, and an entry invalidated is stored again at the key's next miss;
//  2. or ccache still holds an entry of key (expired: TTL or TokenCheck; or of an older generation): it was stored,
//     so it was read twice, and a hot key's entry that expires is stored again at its next miss;
//  3. or other misses wait for this one's read (flights): they are answered from the cache, so a herd of first
//     misses costs etcd one read, as before.
//
// Otherwise the answer is returned without being stored, and without being encoded by the cache (gRPC encodes it,
// as with the cache off). Linearizable misses fill through the same fill (linearizable.go), so the same rule holds
// for them; a linearizable read and its serializable twin have different cache keys, remembered apart. A flush
// leaves the doorkeeper as it is: it holds no answers, only hashes of keys that missed, and it never makes the
// cache store anything it would not have stored before it. Options.AdmitFirst (--kv-cache-admit=first) stores
// every miss's answer, as before the doorkeeper.

// admit reports whether the answer to a miss of key is to be stored; lead is the miss's flight, nil if it leads
// none (admit's comment above).
func (k *KV) admit(key string, lead *flight) bool {
	if k.door == nil {
		return true // AdmitFirst
	}
	if k.door.seen(key) || k.cache.GetWithoutPromote(key) != nil || lead.shared() {
		return true
	}
	firstMisses.Inc()
	return false
}

// doorkeeper remembers the hashes of recently missed keys, in a table: it allocates nothing per key (only when its
// table grows, below), and its full size is set by the cache's (newDoorkeeper). The table is set-associative: a key's
// hash (64 bits, maphash with a random seed of its own) picks a bucket of doorWays slots (64 bytes, a cache line), kept
// most recent first; a key is forgotten once doorWays keys newer than it have been remembered in its bucket. With B
// buckets, a key is still remembered after m newer keys unless doorWays of them fell into its bucket (about
// Poisson(m/B) of them do): after as many newer keys as the table has slots (m = doorWays*B), with probability 0.45;
// after half as many, 0.95; after a quarter, 0.999; after twice as many, 0.01. It forgets by being pushed out only, not
// with time: with few new keys it remembers long, which then costs nothing (few stores). Two keys whose hashes are
// equal are one key here: the second's first miss is stored (one chance in 2^64 per slot compared).
//
// Lock-free: slots are atomics, and a bucket's reordering is not atomic as a whole. Two misses racing in one bucket
// may drop a hash or leave one twice: the table forgets a key sooner, which costs one more miss of it. It decides
// only whether an answer the cache may take is stored, never what is served, so no race in it can make an answer
// stale.
//
// The table is made at the first key remembered, small, and grows with the keys that come, up to its size (1/32 of
// MaxBytes): a proxy that serves no read (watches only, say) keeps no table, and one that reads a few hundred keys a
// table of a few KiB. What the table holds counts in the heap the GC paces itself by (a live heap larger by 2 MiB
// lets 2 MiB more garbage pile up before each collection), so a table sized for 262,144 keys cost every proxy that
// served one read about 2 MiB of RSS more than the keys needed. A table grows (to doorGrowth times its buckets) once
// as many new keys as half its slots were remembered in it, where it would start to forget (a key is remembered
// after half a table's worth of newer keys with probability 0.95): the hashes it holds are moved to the new table,
// each bucket's order kept, so growing forgets nothing. A table of the full size stops counting.
type doorkeeper struct {
	seed    maphash.Seed
	table   atomic.Pointer[doorTable]
	buckets uint64 // the full size, in buckets
}

// doorTable is one size of the doorkeeper's table.
type doorTable struct {
	slots   []atomic.Uint64 // buckets of doorWays hashes, most recent first; 0 is an empty slot
	buckets uint64
	fresh   atomic.Int64 // keys remembered in it that it did not remember yet (counted below the full size only)
}

const (
	// doorWays is the number of slots in a bucket: 8 hashes, 64 bytes.
	doorWays = 8
	// doorBytes is how many bytes of Options.MaxBytes each slot of the doorkeeper stands for: one key remembered
	// per 256 bytes of cache, about what a small entry weighs (an entry weighs twice its encoded response plus its
	// key: a 20-byte key with a 30-byte value weighs about 200 bytes). The table takes 8 bytes per slot: 1/32 of
	// MaxBytes (2 MiB at the default 64 MiB, remembering 262,144 keys), on top of MaxBytes, at its full size.
	doorBytes = 256
	// doorFirstBuckets is the first table's size: 64 buckets, 512 keys, 4 KiB (or the full size if smaller).
	doorFirstBuckets = 64
	// doorGrowth is how many times larger each table is than the one before (until the full size).
	doorGrowth = 4
)

// newDoorkeeper returns a doorkeeper for a cache of maxBytes: a slot per doorBytes, one bucket at least.
func newDoorkeeper(maxBytes int64) *doorkeeper {
	buckets := uint64(max(maxBytes/(doorBytes*doorWays), 1))
	return &doorkeeper{seed: maphash.MakeSeed(), buckets: buckets}
}

// current returns the table, made at the first call that needs it (create; nil until then without).
func (d *doorkeeper) current(create bool) *doorTable {
	if t := d.table.Load(); t != nil || !create {
		return t
	}
	t := newDoorTable(min(d.buckets, doorFirstBuckets))
	if !d.table.CompareAndSwap(nil, t) {
		return d.table.Load() // another miss made it first
	}
	return t
}

func newDoorTable(buckets uint64) *doorTable {
	return &doorTable{slots: make([]atomic.Uint64, buckets*doorWays), buckets: buckets}
}

// seen remembers key, as its most recent key in its bucket, and reports whether it remembered it already.
func (d *doorkeeper) seen(key string) bool {
	h := d.hash(key)
	t := d.current(true)
	b := t.bucket(h)
	at, found := slotOf(b, h)
	if !found {
		at = doorWays - 1 // a key not in the bucket takes the place of its oldest
	}
	moveToFront(b, at, h)
	if !found && t.buckets < d.buckets && t.fresh.Add(1) == int64(len(t.slots)/2) {
		d.grow(t) // only the miss that reached the mark grows t
	}
	return found
}

// grow replaces t, the current table, by one doorGrowth times larger (at most the full size) and moves t's hashes
// into it. The new table is current first, so that misses remember their keys in it while the hashes move; a hash
// it holds already is not moved twice. Misses that loaded t just before the switch may have their keys dropped from
// it (the doorkeeper forgets them sooner, which costs one more miss of each), as may two misses racing in a bucket.
func (d *doorkeeper) grow(t *doorTable) {
	n := newDoorTable(min(t.buckets*doorGrowth, d.buckets))
	d.table.Store(n)
	for i := uint64(0); i < t.buckets; i++ {
		old := t.slots[i*doorWays : (i+1)*doorWays]
		for at := doorWays - 1; at >= 0; at-- { // oldest first, so that each bucket keeps its order
			h := old[at].Load()
			if h == 0 {
				continue
			}
			b := n.bucket(h)
			if _, found := slotOf(b, h); !found {
				moveToFront(b, doorWays-1, h) // in the place of the bucket's oldest
			}
		}
	}
}

// moveToFront puts h first in bucket b, in the place of slot at: the hashes before it move one slot back.
func moveToFront(b []atomic.Uint64, at int, h uint64) {
	for ; at > 0; at-- {
		b[at].Store(b[at-1].Load())
	}
	b[0].Store(h)
}

// hash returns key's hash, never 0 (an empty slot).
func (d *doorkeeper) hash(key string) uint64 {
	if h := maphash.String(d.seed, key); h != 0 {
		return h
	}
	return 1
}

// bucket returns the bucket of hash h: from the hash's high 32 bits, scaled to the number of buckets (any number,
// not a power of two), so that a bucket's hashes land in doorGrowth buckets of the next table, in one at most.
func (t *doorTable) bucket(h uint64) []atomic.Uint64 {
	i := ((h >> 32) * t.buckets >> 32) * doorWays
	return t.slots[i : i+doorWays : i+doorWays]
}

// remembers reports whether d remembers key, without remembering it.
func (d *doorkeeper) remembers(key string) bool {
	t := d.current(false)
	if t == nil {
		return false
	}
	h := d.hash(key)
	_, found := slotOf(t.bucket(h), h)
	return found
}

// slotOf returns where h is in bucket b, if it is.
func slotOf(b []atomic.Uint64, h uint64) (int, bool) {
	for i := range b {
		if b[i].Load() == h {
			return i, true
		}
	}
	return 0, false
}
