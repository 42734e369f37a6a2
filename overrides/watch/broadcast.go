package watch

import (
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
)

// broadcasts holds the broadcasts of one range (WatchBroadcasts in the seed's terms). Usually there is one; a
// watcher that must start before what a broadcast has already delivered gets a broadcast of its own, which catches
// up and is merged into the other once both have delivered the same revision.
type broadcasts struct {
	h   *hub
	rk  rangeKey
	all map[*broadcast]struct{}
}

// broadcast is one upstream watch and the client watchers it fans out to (WatchBroadcast in the seed's terms).
type broadcast struct {
	bs *broadcasts
	id int64 // upstream watch id
	rk rangeKey
	// rev is the revision up to which every event of the range has been delivered to the watchers: the last
	// event's revision, or a progress notification's. An upstream watch is (re)created from rev itself, never
	// from rev+1, which may be etcd's next revision, a start in the future that would block progress answers on
	// the shared stream; deliver drops the replayed events at or below rev.
	rev      int64
	created  bool // the upstream watch is live on the current stream
	watchers map[*watcher]struct{}
	// waiting are watchers whose created response waits for the upstream watch's first creation.
	waiting []*watcher
}

func (bs *broadcasts) remove(b *broadcast) { delete(bs.all, b) }

// attach hands w, which must receive every event from revision w.next on, to a broadcast of the range: one that
// has not delivered past w.next-1, else a new one starting at w.next. Called with h.mu held.
func (h *hub) attach(w *watcher) {
	bs := h.ranges[w.rk]
	if bs == nil {
		bs = &broadcasts{h: h, rk: w.rk, all: map[*broadcast]struct{}{}}
		h.ranges[w.rk] = bs
	}
	var best *broadcast
	// With auth on, a new watcher gets an upstream watch of its own, so that etcd checks the caller's permission
	// on the range exactly as it would; a progress round then lets it merge into the shared broadcast.
	if !(h.authed && !w.announced) {
		for b := range bs.all {
			if b.rev <= w.next-1 && (best == nil || len(b.watchers) > len(best.watchers)) {
				best = b
			}
		}
	}
	if best == nil {
		rev := w.next - 1
		if !w.announced {
			// Never ask etcd for a watch that starts in the future (not even at its next revision): etcd answers
			// no progress request on a stream holding one, and the upstream stream is shared. w skips what it
			// does not want (w.next).
			rev = min(rev, w.hdr.Revision)
		}
		best = &broadcast{bs: bs, id: h.nextID, rk: w.rk, rev: rev, watchers: map[*watcher]struct{}{}}
		h.nextID++
		bs.all[best] = struct{}{}
		h.byID[best.id] = best
		upstreamWatchers.Inc()
		if h.connected {
			h.createUpstream(best)
		}
	}
	w.b = best
	if best.created || w.announced {
		best.watchers[w] = struct{}{}
		if !w.announced {
			w.announce()
		}
		return
	}
	best.waiting = append(best.waiting, w)
}

// detach takes w off its broadcast, dropping the broadcast when nobody is left on it. Called with h.mu held.
func (h *hub) detach(w *watcher) {
	b := w.b
	if b == nil {
		return
	}
	w.b = nil
	delete(b.watchers, w)
	for i, x := range b.waiting {
		if x == w {
			b.waiting = append(b.waiting[:i], b.waiting[i+1:]...)
			break
		}
	}
	if len(b.watchers) == 0 && len(b.waiting) == 0 {
		h.cancelUpstream(b)
	}
}

// confirm runs when the upstream watch is created: waiting watchers are announced and start receiving.
func (b *broadcast) confirm() {
	for _, w := range b.waiting {
		b.watchers[w] = struct{}{}
		if !w.announced {
			w.announce()
		}
	}
	b.waiting = nil
}

// refused runs when etcd refused to create the upstream watch (permission denied, invalid token, ...): waiting
// watchers that were never announced get etcd's refusal as their created response, as etcd would have answered
// them; others end with it.
func (b *broadcast) refused(resp *pb.WatchResponse) {
	h := b.bs.h
	all := append(b.waiting, keys(b.watchers)...)
	b.waiting, b.watchers = nil, map[*watcher]struct{}{}
	h.cancelUpstream(b)
	for _, w := range all {
		w.b = nil
		w.cs.forget(w)
		if !w.announced {
			w.refuse(resp)
			continue
		}
		w.cs.enqueueControl(&pb.WatchResponse{Header: resp.Header, WatchId: w.id, Canceled: true, CancelReason: resp.CancelReason})
	}
}

// ended runs when etcd ended the upstream watch (compaction, or a cancel of its own): every watcher gets etcd's
// response under its own id. Like etcd, the watcher keeps its id until the client cancels it.
func (b *broadcast) ended(resp *pb.WatchResponse) {
	h := b.bs.h
	all := append(b.waiting, keys(b.watchers)...)
	b.waiting, b.watchers = nil, map[*watcher]struct{}{}
	// etcd keeps a compacted watcher on its stream (and answers no progress request) until it is cancelled:
	// cancel it (a cancel of a watcher etcd already dropped is ignored).
	b.created = true
	h.cancelUpstream(b)
	for _, w := range all {
		w.b = nil
		w.dead = true
		if !w.announced {
			w.announce()
		}
		w.cs.enqueueControl(&pb.WatchResponse{Header: resp.Header, WatchId: w.id, Canceled: true,
			CompactRevision: resp.CompactRevision, CancelReason: resp.CancelReason})
	}
}

// deliver fans an upstream response out to the watchers: events (filtered per watcher) or a progress notification
// (to watchers that asked for them).
func (b *broadcast) deliver(resp *pb.WatchResponse) {
	h := b.bs.h
	if len(resp.Events) == 0 {
		// A progress notification: everything up to its revision has been delivered.
		if rev := resp.Header.GetRevision(); rev > b.rev {
			b.rev = rev
		}
		for w := range b.watchers {
			if w.progressNotify {
				w.cs.enqueueEvents(w, &pb.WatchResponse{Header: resp.Header, WatchId: w.id})
			}
		}
		b.bs.mergeInto(b)
		return
	}
	// An upstream watch starts at b.rev, not after it (see hub.createUpstream): what it replays is not news.
	events := resp.Events
	for len(events) > 0 && events[0].Kv.ModRevision <= b.rev {
		events = events[1:]
	}
	if len(events) == 0 {
		return
	}
	for w := range b.watchers {
		evs := filtered(events, w)
		if len(evs) == 0 {
			continue
		}
		if !w.cs.enqueueEvents(w, &pb.WatchResponse{Header: resp.Header, WatchId: w.id, Events: evs}) {
			// A slow client: take this watcher off the broadcast; it resumes from its first undelivered event
			// once its stream has drained (clientStream.resume).
			delete(b.watchers, w)
			w.b = nil
			w.next = evs[0].Kv.ModRevision
			w.cs.lag(w)
			slowDetaches.Inc()
		}
	}
	eventsFannedOut.Add(float64(len(events)))
	if rev := events[len(events)-1].Kv.ModRevision; rev > b.rev {
		b.rev = rev
	}
	if len(b.watchers) == 0 && len(b.waiting) == 0 {
		h.cancelUpstream(b)
		return
	}
	b.bs.mergeInto(b)
}

// mergeInto merges b with another created broadcast of the range that has delivered exactly as far: the watchers
// of the smaller move to the larger, whose future events they need and nothing else, and the smaller's upstream
// watch is cancelled.
func (bs *broadcasts) mergeInto(b *broadcast) {
	if !b.created {
		return
	}
	for o := range bs.all {
		if o == b || !o.created || o.rev != b.rev || len(o.waiting) > 0 || len(b.waiting) > 0 {
			continue
		}
		from, to := o, b
		if len(o.watchers) > len(b.watchers) {
			from, to = b, o
		}
		for w := range from.watchers {
			to.watchers[w] = struct{}{}
			w.b = to
		}
		from.watchers = map[*watcher]struct{}{}
		bs.h.cancelUpstream(from)
		merges.Inc()
		return
	}
}

func keys(m map[*watcher]struct{}) []*watcher {
	out := make([]*watcher, 0, len(m))
	for w := range m {
		out = append(out, w)
	}
	return out
}
