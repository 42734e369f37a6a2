package kvcache

// attribution counts each invalidation as made by a write through this proxy ("local") or by any other
// ("remote"), for etcdproxy_kvcache_invalidations_total. It is bookkeeping for a metric only: nothing about
// coherence depends on it. The watch may apply a local write before the write's response reaches the proxy, so an
// invalidation applied while local writes are in flight waits in pending until the write whose revision it is
// reports it (local), or every write that was in flight then has ended (remote). Its methods are called with the
// invalidator's lock held.
type attribution struct {
	writeSeq  uint64              // sequence numbers of local writes, in start order
	inFlight  map[uint64]struct{} // local writes started and not yet ended
	localRevs map[int64]struct{}  // revisions of ended local writes that the live watch has not reached
	pending   map[int64]pendingInvalidation
	queue     []int64 // revisions of pending, in the order applied (so by seq); settled ones are skipped
}

// pendingInvalidation is n invalidations at one revision, applied while the local writes up to seq were in flight.
type pendingInvalidation struct {
	n   int
	seq uint64
}

// maxPending bounds the invalidations that wait for attribution; past it the oldest are counted as remote.
const maxPending = 10000

func newAttribution() attribution {
	return attribution{inFlight: map[uint64]struct{}{}, localRevs: map[int64]struct{}{},
		pending: map[int64]pendingInvalidation{}}
}

// begin registers a local write about to be forwarded; its end must follow, whatever happens.
func (a *attribution) begin() uint64 {
	a.writeSeq++
	a.inFlight[a.writeSeq] = struct{}{}
	return a.writeSeq
}

// end ends the local write seq, which wrote at revision rev (0: it failed, or did not say what it wrote), and
// settles the invalidations that waited for it. ahead says the live watch has not reached rev yet.
func (a *attribution) end(seq uint64, rev int64, ahead bool) {
	delete(a.inFlight, seq)
	if p, ok := a.pending[rev]; ok && rev > 0 {
		invalidatedLocal.Add(float64(p.n))
		delete(a.pending, rev)
	} else if ahead {
		a.localRevs[rev] = struct{}{} // its events are still to come
	}
	if len(a.queue) == 0 {
		return // the common case: nothing waits, no need to find the oldest write in flight
	}
	oldest := a.writeSeq + 1 // the oldest local write still in flight
	for s := range a.inFlight {
		oldest = min(oldest, s)
	}
	// Whatever waited only for writes that have all ended now is remote.
	for len(a.queue) > 0 {
		p, ok := a.pending[a.queue[0]]
		if ok && p.seq >= oldest {
			break
		}
		a.settleFront()
	}
}

// settleFront counts the oldest queued invalidation as remote, unless it was settled already.
func (a *attribution) settleFront() {
	rev := a.queue[0]
	a.queue[0] = 0
	a.queue = a.queue[1:]
	if p, ok := a.pending[rev]; ok {
		invalidatedRemote.Add(float64(p.n))
		delete(a.pending, rev)
	}
}

// attribute counts n invalidations made by the events of revision rev.
func (a *attribution) attribute(rev int64, n int) {
	_, local := a.localRevs[rev]
	switch {
	case n == 0:
	case local:
		invalidatedLocal.Add(float64(n))
	case len(a.inFlight) > 0:
		for len(a.pending) >= maxPending || len(a.queue) >= 2*maxPending {
			a.settleFront()
		}
		p := a.pending[rev]
		if p.n == 0 {
			a.queue = append(a.queue, rev)
		}
		a.pending[rev] = pendingInvalidation{n: p.n + n, seq: a.writeSeq}
	default:
		invalidatedRemote.Add(float64(n))
	}
}

// reached forgets the local revisions the watch has now applied (up to rev).
func (a *attribution) reached(rev int64) {
	for r := range a.localRevs {
		if r <= rev {
			delete(a.localRevs, r)
		}
	}
}
