package kvcache

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/karlseguin/ccache/v3"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
)

// TestDoorkeeperBounded: the doorkeeper's table is made when it first remembers a key, small (4 KiB, or its full
// size if smaller), grows as new keys come, up to its full size, 1/32 of the cache's (one bucket at least), and never
// beyond, however many keys pass through it; growing forgets no key; remembering a key allocates nothing once the
// table is full-sized; a key is seen at its second time; it is forgotten once many newer keys came (the oldest of
// many times the table's slots are all forgotten), while the most recent ones are remembered.
func TestDoorkeeperBounded(t *testing.T) {
	grown := func(d *doorkeeper) int {
		for i := 0; ; i++ {
			if t := d.current(false); t != nil && t.buckets == d.buckets {
				return len(t.slots)
			}
			d.seen(fmt.Sprint("fill", i))
		}
	}
	for _, tc := range []struct {
		maxBytes     int64
		first, bytes int
	}{{0, 64, 64}, {4 << 10, 128, 128}, {1 << 20, 4 << 10, 32 << 10}, {64 << 20, 4 << 10, 2 << 20},
		{100 << 20, 4 << 10, 100 << 20 / 32}} {
		d := newDoorkeeper(tc.maxBytes)
		d.seen("a")
		if got := len(d.current(false).slots) * 8; got != tc.first {
			t.Errorf("a cache of %d bytes: a first table of %d bytes, want %d", tc.maxBytes, got, tc.first)
		}
		if got := grown(d) * 8; got != tc.bytes {
			t.Errorf("a cache of %d bytes: a doorkeeper of %d bytes, want %d", tc.maxBytes, got, tc.bytes)
		}
	}

	// A few hundred keys keep the first table; growing keeps every key the table held.
	d := newDoorkeeper(64 << 20)
	if d.remembers("a"); d.table.Load() != nil {
		t.Error("a doorkeeper has a table before it remembered a key")
	}
	if d.seen("a") || !d.seen("a") {
		t.Error("a key is not seen at its second time only")
	}
	first := d.current(false)
	for i := range 200 {
		d.seen(fmt.Sprint("few", i))
	}
	if d.current(false) != first {
		t.Errorf("201 keys grew a table of %d slots", len(first.slots))
	}
	held := 0
	for i := range 200 {
		if d.remembers(fmt.Sprint("few", i)) {
			held++
		}
	}
	d.grow(first)
	for i := range 200 {
		if d.remembers(fmt.Sprint("few", i)) {
			held--
		}
	}
	if next := d.current(false); next == first || len(next.slots) != doorGrowth*len(first.slots) || held != 0 {
		t.Errorf("growing the table forgot %d of the 200 first keys, or did not grow it", held)
	}

	// Misses on many goroutines grow it too (-race: the tables are shared through atomics only); a race may drop a
	// hash now and then, no more.
	d = newDoorkeeper(4 << 20) // 16,384 slots
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 2000 {
				d.seen(fmt.Sprint(g, "/", i))
			}
		})
	}
	wg.Wait()
	held = 0
	for g := range 4 {
		for i := range 1000 {
			if d.remembers(fmt.Sprint(g, "/", 1000+i)) {
				held++
			}
		}
	}
	if got := d.current(false); got.buckets == doorFirstBuckets || held < 3900 {
		t.Errorf("8000 keys on 4 goroutines: a table of %d buckets, %d of the last 4000 keys remembered",
			got.buckets, held)
	}

	d = newDoorkeeper(1 << 20)
	slots := grown(d)
	table := d.current(false)
	keys := make([]string, 64*slots)
	for i := range keys {
		keys[i] = fmt.Sprint("k", i)
	}
	i := 0
	if allocs := testing.AllocsPerRun(len(keys)-1, func() { d.seen(keys[i]); i++ }); allocs != 0 {
		t.Errorf("remembering a key allocates %v times", allocs)
	}
	n := 0
	for j := range table.slots {
		if table.slots[j].Load() != 0 {
			n++
		}
	}
	if got := d.current(false); got != table || n > slots {
		t.Errorf("after %d keys, %d slots (%d used); want the same %d", len(keys), len(got.slots), n, slots)
	}
	if d.remembers("fill0") || d.remembers(keys[0]) {
		t.Errorf("the doorkeeper remembers keys %d slots old", len(keys))
	}
	// The most recent quarter of a table's worth: at most about 1 in 1000 forgotten; a quarter of a table's worth
	// twice a table's worth older: at least 99 in 100 (admit.go's doorkeeper comment).
	recent, old := 0, 0
	for j := range slots / 4 {
		if d.remembers(keys[len(keys)-1-j]) {
			recent++
		}
		if d.remembers(keys[len(keys)-1-2*slots-j]) {
			old++
		}
	}
	if recent < slots/4*99/100 || old > slots/4*5/100 {
		t.Errorf("of %d keys, %d remembered among the most recent, %d among those 2 tables' worth older", slots/4,
			recent, old)
	}
}

// TestDroppedRemembered: an entry that ccache drops, deleted (as an invalidation does) or evicted, has its key
// remembered by the doorkeeper (its next miss is stored), even after the doorkeeper had forgotten its first miss.
func TestDroppedRemembered(t *testing.T) {
	k := &KV{index: newIndex(), opts: Options{TTL: time.Minute}, door: newDoorkeeper(0)} // one bucket: 8 keys
	k.cache = ccache.New(ccache.Configure[*entry]().MaxSize(5).ItemsToPrune(1).OnDelete(k.dropped))
	defer k.cache.Stop()
	keep := func(key string) {
		k.door.seen(key)
		k.keep(&entry{key: key, start: key, resp: &pb.RangeResponse{}, size: 1})
		for i := range doorWays {
			k.door.seen(fmt.Sprint("other", i)) // k's first miss forgotten
		}
		if k.door.remembers(key) {
			t.Fatalf("%s is still remembered", key)
		}
	}
	keep("deleted")
	k.cache.SyncUpdates()
	k.cache.Delete("deleted")
	k.cache.SyncUpdates()
	if !k.door.remembers("deleted") {
		t.Error("the key of a deleted entry is not remembered")
	}
	for i := range 6 { // one more than the cache holds
		keep(fmt.Sprint("e", i))
		k.cache.SyncUpdates()
	}
	k.cache.GC()
	k.cache.SyncUpdates()
	evicted := 0
	for i := range 6 {
		key := fmt.Sprint("e", i)
		if k.cache.GetWithoutPromote(key) == nil {
			evicted++
			if !k.door.remembers(key) {
				t.Errorf("%s was evicted and is not remembered", key)
			}
		}
	}
	if evicted == 0 {
		t.Error("nothing evicted")
	}
}

// TestFlightShared: a leader learns whether misses wait for its answer; one that none waits for closes its flight,
// so the next miss leads a read of its own, and the first leader's end leaves the new flight alone.
func TestFlightShared(t *testing.T) {
	var f flights
	wait, a := f.join("k")
	if wait != nil || a.shared() {
		t.Fatal("a lone miss does not lead, or is shared")
	}
	wait, b := f.join("k")
	if wait != nil {
		t.Fatal("a miss after its leader found no waiters waits for it")
	}
	a.finish()
	wait, none := f.join("k")
	if wait == nil || none != nil {
		t.Fatal("the first leader's end closed the second's flight")
	}
	if !b.shared() {
		t.Error("a leader with a waiter is not shared")
	}
	if wait2, _ := f.join("k"); wait2 != wait {
		t.Error("a shared flight took no more waiters")
	}
	b.finish()
	select {
	case <-wait:
	default:
		t.Error("the waiters were not released")
	}
	if _, c := f.join("k"); c == nil || len(f.m) != 1 {
		t.Error("a miss after the flights ended does not lead")
	}
	if (*flight)(nil).shared() {
		t.Error("a read outside a flight is shared")
	}
}
