package kvcache

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestAttribution covers the orders in which a write's response and the watch's events can reach the proxy.
func TestAttribution(t *testing.T) {
	inv := &invalidator{inFlight: map[uint64]struct{}{}, localRevs: map[int64]struct{}{}}
	counts := func() (float64, float64) {
		return testutil.ToFloat64(invalidations.WithLabelValues("local")),
			testutil.ToFloat64(invalidations.WithLabelValues("remote"))
	}
	apply := func(rev int64, n int) {
		inv.mu.Lock()
		inv.attribute(rev, n)
		inv.pos = max(inv.pos, rev)
		for r := range inv.localRevs {
			if r <= inv.pos {
				delete(inv.localRevs, r)
			}
		}
		inv.mu.Unlock()
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

	l, r = counts()
	w = inv.beginWrite()
	apply(16, 1)
	inv.endWrite(w, 0) // failed, or wrote nothing
	check("failed write", l, r, 0, 1)
	if len(inv.pending) != 0 || len(inv.inFlight) != 0 || len(inv.localRevs) != 0 {
		t.Errorf("left over: pending %v, in flight %v, local revisions %v", inv.pending, inv.inFlight, inv.localRevs)
	}
}
