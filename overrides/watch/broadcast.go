package watch

import (
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
)

// broadcasts holds the broadcasts of one range (etcd grpc-proxy's WatchBroadcasts). Usually there is one; a
// watcher that must start before what a broadcast has already delivered gets a broadcast of its own, which catches
// up and is merged into the other once both have delivered the same revision.
type broadcasts struct {
	h   *hub
	rk  rangeKey
	all map[*broadcast]struct{}
}

// broadcast is one upstream watch and the client watchers it fans out to (etcd grpc-proxy's WatchBroadcast).
type broadcast struct {
	bs *broadcasts
	id int64 // upstream watch id
	rk rangeKey
	// rev is the revision up to which every event of the range has been delivered to the watchers: the last
	// event's revision, or a progress notification's. An upstream watch is (re)created from rev itself, never
	// from rev+1, which may be etcd's next revision, a start in the future that would block progress answers on
	// the shared stream; deliver drops the replayed events at or below rev. (A new catch-up broadcast for a
	// client's own start revision n is created from n itself, with rev n-1: see newBroadcast.)
	rev int64
	// start is the StartRevision of the next upstream create: 0 for a broadcast "from now" (etcd picks the
	// revision, and rev is set from its created response), else a revision at or below etcd's current one.
	start   int64
	created bool // the upstream watch is live on the current stream
	// synced: etcd counts the upstream watcher as synced (caught up with its store), so no compaction can end it
	// and its events arrive one response per revision, in order with the stream's other synced watchers. True for
	// a watch created from now, and once a progress answer or notification arrived since its (re)creation.
	synced bool
	parts  []*pb.WatchResponse // the parts of a fragmented response received so far (fragmenting broadcasts)
	// confirmedAt is the number of progress requests sent on the stream before etcd confirmed the watch; progressOK
	// says whether the last progress answer covers it (see hub.progressAnswered).
	confirmedAt int64
	progressOK  bool
	watchers    map[*watcher]struct{}
	// waiting are watchers whose created response waits for the upstream watch's first creation.
	waiting []*watcher
}

func (bs *broadcasts) remove(b *broadcast) { delete(bs.all, b) }

// confirm runs when the upstream watch is created (hdr is etcd's created header): waiting watchers are
// announced and start receiving.
func (b *broadcast) confirm(hdr *pb.ResponseHeader) {
	b.created = true
	if b.start == 0 {
		b.rev, b.synced = hdr.Revision, true
	}
	waiting := b.waiting
	b.waiting = nil
	for _, w := range waiting {
		if !w.announced && w.startRev > 0 && w.next-1 < b.rev {
			// etcd passed a future start while the watch was being created: from its own start, then.
			w.known = max(w.known, b.rev)
			w.b = nil
			b.bs.h.attach(w)
			continue
		}
		w.startAfter(b.rev, hdr)
		b.watchers[w] = struct{}{}
		if !w.announced {
			w.announce()
		}
	}
	if len(b.watchers) == 0 && len(b.waiting) == 0 {
		b.bs.h.cancelUpstream(b)
	}
}

// refused runs when etcd refused to create the upstream watch (permission denied, invalid token, ...): waiting
// watchers that were never announced get etcd's refusal as their created response, as etcd would have answered
// them. Others (the watch was re-created after an upstream reconnect, or for a slow watcher's catch-up) end with
// it; but if the token itself is no longer valid, their client stream ends with Unavailable instead, so that the
// client reconnects with fresh credentials, as it would on etcd, rather than losing its watchers.
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
		if lostCredentials(resp.CancelReason) {
			w.cs.abort()
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
// (to watchers that asked for them). A response etcd fragmented (only for a broadcast of fragmenting watchers,
// whose filters etcd applies) is passed on part by part; the broadcast's revision moves once the last part is in.
func (b *broadcast) deliver(resp *pb.WatchResponse) {
	h := b.bs.h
	if len(resp.Events) == 0 {
		// A progress notification: everything up to its revision has been delivered, and etcd holds the
		// watcher as synced (it notifies no other).
		rev := resp.Header.GetRevision()
		if rev > b.rev {
			b.rev = rev
		}
		b.synced = true
		if h.clock == nil {
			for w := range b.watchers {
				if w.progressNotify && w.startRev <= rev {
					w.cs.enqueueEvents(w, &pb.WatchResponse{Header: resp.Header, WatchId: w.id})
				}
			}
		}
		b.bs.mergeInto(b)
		return
	}
	if resp.Fragment {
		// etcd sends the parts of a fragmented response back to back; each client gets its parts back to back
		// too, once the last is in (clientv3 drops the parts it holds when a response of another watch comes
		// between them).
		b.parts = append(b.parts, resp)
		return
	}
	if len(b.parts) > 0 {
		b.deliverParts(append(b.parts, resp))
		b.parts = nil
	} else {
		// An upstream watch is re-created from b.rev, not after it (see hub.createUpstream): what it replays is
		// not news.
		events := afterRev(resp.Events, b.rev)
		var enc *shared // made for the first watcher that gets every event (encoding.go)
		for w := range b.watchers {
			evs := filtered(events, w)
			if len(evs) == 0 {
				continue
			}
			if len(evs) == len(events) && &evs[0] == &events[0] {
				if enc == nil {
					enc = encodeShared(resp.Header, events)
				}
				if enc != nil {
					b.sendShared(w, enc)
					continue
				}
			}
			b.send(w, &pb.WatchResponse{Header: resp.Header, WatchId: w.id, Events: evs})
		}
		eventsFannedOut.Add(float64(len(events)))
	}
	if evs := resp.Events; len(evs) > 0 {
		b.rev = max(b.rev, evs[len(evs)-1].Kv.ModRevision)
	}
	if len(b.watchers) == 0 && len(b.waiting) == 0 {
		h.cancelUpstream(b)
		return
	}
	b.bs.mergeInto(b)
}

// deliverParts fans out the parts of a fragmented response (a fragmenting broadcast: etcd filtered them already).
func (b *broadcast) deliverParts(parts []*pb.WatchResponse) {
	for w := range b.watchers {
		var out []*pb.WatchResponse
		for _, p := range parts {
			if evs := filtered(afterRev(p.Events, b.rev), w); len(evs) > 0 {
				out = append(out, &pb.WatchResponse{Header: p.Header, WatchId: w.id, Events: evs, Fragment: true})
			}
		}
		if len(out) > 0 {
			out[len(out)-1].Fragment = false
			b.send(w, out...)
		}
	}
	for _, p := range parts {
		eventsFannedOut.Add(float64(len(afterRev(p.Events, b.rev))))
	}
}

// send queues resps (one response, or the parts of one) for w. A slow client's watcher is taken off the
// broadcast instead; it resumes from its first undelivered event once its stream has drained (hub.resume).
func (b *broadcast) send(w *watcher, resps ...*pb.WatchResponse) {
	if !w.cs.enqueueEvents(w, resps...) {
		b.detach(w, resps[0].Events[0].Kv.ModRevision)
	}
}

// sendShared is send of the response of enc's header and events (encoding.go) under w's watch id.
func (b *broadcast) sendShared(w *watcher, enc *shared) {
	if !w.cs.enqueueShared(w, enc) {
		b.detach(w, enc.events[0].Kv.ModRevision)
	}
}

// detach takes the slow client's watcher w off the broadcast; it resumes from next.
func (b *broadcast) detach(w *watcher, next int64) {
	delete(b.watchers, w)
	w.b = nil
	w.next = next
	w.cs.lag(w)
	slowDetaches.Inc()
}

// afterRev returns the events of evs after revision rev (evs is in revision order).
func afterRev(evs []*mvccpb.Event, rev int64) []*mvccpb.Event {
	for len(evs) > 0 && evs[0].Kv.ModRevision <= rev {
		evs = evs[1:]
	}
	return evs
}

// mergeInto merges b with another synced broadcast of the range that has delivered exactly as far: the watchers
// of the smaller move to the larger, whose future events they need and nothing else, and the smaller's upstream
// watch is cancelled.
func (bs *broadcasts) mergeInto(b *broadcast) {
	if !b.synced {
		return
	}
	for o := range bs.all {
		if o == b || !o.synced || o.rev != b.rev || len(o.waiting) > 0 || len(b.waiting) > 0 {
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
