package watch

import (
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
)

// watcher is one client watcher.
type watcher struct {
	cs             *clientStream
	id             int64 // set once, when the stream takes the watcher (clientStream.create)
	rk             rangeKey
	next           int64 // the first revision the client has not received
	startRev       int64 // the start revision the client asked for (0: from now)
	known          int64 // a revision etcd had when the watcher was created: a startRev above it is in the future
	idFrom         int64 // for an id the proxy chose: the stream's next id before, restored if etcd refuses the watch
	sent           bool  // an event was queued for the client since the last progress tick (progress.go)
	noPut          bool
	noDelete       bool
	progressNotify bool
	announced      bool               // the client has its created response
	dead           bool               // etcd ended it (compaction); it keeps its id until the client cancels it
	hdr            *pb.ResponseHeader // for the created response
	b              *broadcast         // nil while detached
	idEnc          mem.Buffer         // the encoding of an id of smallIDs or more as a response's watch_id, once made
}

// idPart returns the encoding of the watcher's id as a response's watch_id (encoding.go): a small id's from the
// table every watcher shares, a larger one's made once.
func (w *watcher) idPart() mem.Buffer {
	if w.id >= 0 && w.id < smallIDs {
		return smallIDParts()[w.id]
	}
	if w.idEnc == nil {
		w.idEnc = idPart(w.id)
	}
	return w.idEnc
}

// startAfter moves the start of a watcher from now to rev, if rev is later than the revision of its created
// header: the watcher's upstream watch starts after rev, and etcd had rev after the create request arrived. hdr,
// if given, is etcd's header at rev.
func (w *watcher) startAfter(rev int64, hdr *pb.ResponseHeader) {
	if w.announced || w.startRev != 0 || rev <= w.hdr.Revision {
		return
	}
	if hdr == nil || hdr.Revision != rev {
		hdr = proto.CloneOf(w.hdr)
		hdr.Revision = rev
	}
	w.hdr, w.next = hdr, rev+1
}

func (w *watcher) announce() {
	w.announced = true
	if w.progressNotify {
		w.cs.h.notifyJoined(w)
	}
	w.cs.enqueueControl(&pb.WatchResponse{Header: w.hdr, WatchId: w.id, Created: true})
	w.cs.resolve()
}

// refuse answers w's create with etcd's refusal of the upstream watch, and w is gone; like etcd, the refused create
// uses up no watch id. Called with h.mu held.
func (w *watcher) refuse(resp *pb.WatchResponse) {
	if w.idFrom >= 0 {
		w.cs.nextID = w.idFrom
	}
	w.cs.enqueueControl(refusal(resp.Header, resp.CancelReason))
	w.cs.resolve()
}

// canRide says whether w can be served by b. A watcher being created rides only a broadcast whose upstream watch
// etcd holds as synced, or one about to be created from now: joining a catch-up broadcast would expose it to that
// watch's compaction (etcd compacts no watcher from now) and to its batched catch-up responses. A watcher that
// starts at a revision etcd already has gets a broadcast of its own from that revision, so that etcd applies its
// compaction rule to it. A watcher resuming after it lagged rides any broadcast that has not passed it.
func (w *watcher) canRide(b *broadcast) bool {
	fromNow := !b.created && b.start == 0
	switch {
	case w.announced:
		return !fromNow && b.rev <= w.next-1
	case w.startRev == 0:
		return fromNow || b.synced
	case w.startRev > w.known:
		return fromNow || (b.synced && b.rev <= w.next-1)
	default:
		return false
	}
}

// filtered returns the events of evs that w receives: revision at or after w.next, minus filtered types. It
// returns evs itself when w receives them all (a fan-out's usual case: nothing allocated per watcher).
func filtered(evs []*mvccpb.Event, w *watcher) []*mvccpb.Event {
	for i, ev := range evs {
		if !w.receives(ev) {
			keep := make([]*mvccpb.Event, i, len(evs)-1)
			copy(keep, evs)
			for _, ev := range evs[i+1:] {
				if w.receives(ev) {
					keep = append(keep, ev)
				}
			}
			return keep
		}
	}
	return evs
}

// receives reports whether w receives ev.
func (w *watcher) receives(ev *mvccpb.Event) bool {
	return ev.Kv.ModRevision >= w.next && !(w.noPut && ev.Type == mvccpb.PUT) &&
		!(w.noDelete && ev.Type == mvccpb.DELETE)
}
