package watch

import (
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
)

// Progress notifications (progress_notify) follow etcd's rule per client watcher: at each tick of etcd's progress
// interval, a watcher that was sent no event since the previous tick gets a notification, provided it is synced
// and does not start in the future. A broadcast's own notifications cannot tell that: the upstream watcher is
// notified only when the range had no event at all, while a client watcher may have had every event filtered out,
// or joined after the range's last event.
//
// So a hub with progress-notify watchers holds a clock: one more upstream watch, from now, with both of etcd's
// filters on a range a notifying watcher of the hub may watch. It receives no event ever, so etcd notifies it at
// every tick. A tick is answered with an upstream progress request, whose answer (etcd sends it once every
// watcher of the stream is synced) gives a revision through which every event of every broadcast has been sent;
// the notifications carry it. Without a clock (etcd refused it), a broadcast's notifications are passed on.

// notifyJoined counts w, just announced, among the hub's notifying watchers and starts the clock if there is none.
// Called with h.mu held.
func (h *hub) notifyJoined(w *watcher) {
	h.notifying++
	if h.clock != nil {
		return
	}
	h.clock = &broadcast{id: h.nextID, rk: rangeKey{key: w.rk.key, end: w.rk.end, noPut: true, noDelete: true},
		watchers: map[*watcher]struct{}{}}
	h.nextID++
	h.byID[h.clock.id] = h.clock
	upstreamWatchers.Inc()
	if h.connected {
		h.createUpstream(h.clock)
	}
}

// notifyLeft uncounts a notifying watcher that is gone; the clock stops with the last one. Called with h.mu held.
func (h *hub) notifyLeft() {
	h.notifying--
	if h.notifying == 0 && h.clock != nil {
		h.stopClock()
	}
}

// stopClock drops the clock's upstream watch. Called with h.mu held.
func (h *hub) stopClock() {
	c := h.clock
	h.clock, h.tick = nil, false
	delete(h.byID, c.id)
	h.pokeIfEmpty()
	h.retarget(c)
	upstreamWatchers.Dec()
	if c.created {
		h.cancel(c.id)
	}
}

// clockTicked handles a response to the clock's watch: a notification is a tick; a cancel (etcd ended it) stops
// the clock. Called with h.mu held.
func (h *hub) clockTicked(resp *pb.WatchResponse) {
	if resp.Canceled {
		h.clock.created = false
		h.stopClock()
		return
	}
	h.tick = true
	h.askProgress()
}

// notifyProgress sends the tick's notifications at hdr's revision, through which every event of every created
// broadcast has been delivered. Called with h.mu held.
func (h *hub) notifyProgress(hdr *pb.ResponseHeader) {
	h.tick = false
	for _, bs := range h.ranges {
		for b := range bs.all {
			if !b.progressOK {
				continue
			}
			for w := range b.watchers {
				if w.progressNotify && !w.sent && w.startRev <= hdr.Revision && w.next-1 <= hdr.Revision {
					w.cs.enqueueEvents(w, &pb.WatchResponse{Header: hdr, WatchId: w.id})
				}
				w.sent = false
			}
		}
	}
}
