package kvcache

import (
	"fmt"
	"testing"
	"time"

	"github.com/karlseguin/ccache/v3"
	"github.com/prometheus/client_golang/prometheus/testutil"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.uber.org/zap"
)

// TestAttribution covers the orders in which a write's response and the watch's events can reach the proxy,
// through the invalidator's own apply.
func TestAttribution(t *testing.T) {
	k := &KV{index: newIndex(), opts: Options{TTL: time.Minute}}
	k.cache = ccache.New(ccache.Configure[*entry]().MaxSize(1 << 20).OnDelete(k.index.evicted))
	defer k.cache.Stop()
	inv := newInvalidator(nil, k.cache, k.index, time.Second, -1, zap.NewNop())
	k.watch = inv
	inv.setLive(true, 1)

	counts := func() (float64, float64) {
		return testutil.ToFloat64(invalidations.WithLabelValues("local")),
			testutil.ToFloat64(invalidations.WithLabelValues("remote"))
	}
	// apply has the watch deliver a write at rev that invalidates n cached entries.
	apply := func(rev int64, n int) {
		key := fmt.Sprint("k", rev)
		for i := range n {
			k.keep(&entry{key: fmt.Sprint(key, "#", i), start: key, resp: &pb.RangeResponse{}, size: 1})
		}
		inv.apply(&pb.WatchResponse{Header: &pb.ResponseHeader{Revision: rev},
			Events: []*mvccpb.Event{{Type: mvccpb.PUT, Kv: &mvccpb.KeyValue{Key: []byte(key), ModRevision: rev}}}})
	}
	check := func(step string, local0, remote0, wantLocal, wantRemote float64) {
		t.Helper()
		local, remote := counts()
		if local-local0 != wantLocal || remote-remote0 != wantRemote {
			t.Errorf("%s: +%v local, +%v remote; want +%v, +%v", step, local-local0, remote-remote0, wantLocal, wantRemote)
		}
	}

	l, r := counts()
	apply(10, 2) // nothing in flight: remote at once
	check("no local write in flight", l, r, 0, 2)

	l, r = counts()
	w := inv.beginWrite()
	inv.endWrite(w, 11) // response first
	apply(11, 3)
	check("response before event", l, r, 3, 0)

	l, r = counts()
	w = inv.beginWrite()
	apply(12, 1) // event first: waits
	check("event while the write is in flight", l, r, 0, 0)
	inv.endWrite(w, 12)
	check("event before response", l, r, 1, 0)

	l, r = counts()
	w1 := inv.beginWrite()
	apply(13, 4) // a write elsewhere while w1 is in flight
	w2 := inv.beginWrite()
	apply(14, 5) // w2's, or w1's, or elsewhere's
	inv.endWrite(w2, 14)
	check("w2 ended at 14", l, r, 5, 0)
	inv.endWrite(w1, 15)
	check("w1 ended at 15", l, r, 5, 4)
	apply(15, 1)
	check("w1's own event after its response", l, r, 6, 4)

	l, r = counts()
	w = inv.beginWrite()
	apply(16, 1)
	inv.endWrite(w, 0) // failed, or did not say what it wrote
	check("failed write", l, r, 0, 1)
	if len(inv.sources.localRevs) != 0 {
		t.Errorf("local revisions %v kept after the watch passed them", inv.sources.localRevs)
	}

	// A write stuck in flight: invalidations wait, at most maxPending of them, the overflow counted remote.
	l, r = counts()
	stuck := inv.beginWrite()
	for rev := int64(100); rev < 100+maxPending+5; rev++ {
		inv.mu.Lock()
		inv.sources.attribute(rev, 1)
		inv.mu.Unlock()
	}
	if len(inv.sources.pending) > maxPending {
		t.Errorf("%d invalidations pending, more than %d", len(inv.sources.pending), maxPending)
	}
	check("overflow while a write is stuck", l, r, 0, 5)
	inv.endWrite(stuck, 0)
	check("the stuck write ended", l, r, 0, maxPending+5)

	// While the watch is down, local writes leave nothing behind.
	inv.setLive(false, 0)
	for range 100 {
		inv.endWrite(inv.beginWrite(), 1000)
	}
	if len(inv.sources.pending) != 0 || len(inv.sources.queue) != 0 || len(inv.sources.inFlight) != 0 || len(inv.sources.localRevs) != 0 {
		t.Errorf("left over: %d pending, %d queued, %d in flight, %d local revisions", len(inv.sources.pending),
			len(inv.sources.queue), len(inv.sources.inFlight), len(inv.sources.localRevs))
	}
}
