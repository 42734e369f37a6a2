package watch

import (
	"context"
	"sync"
	"time"

	"github.com/etcdproxy/etcdproxy/overrides/internal/upstream"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// etcd's current revision, for the created and cancel responses the proxy writes itself (etcd puts its current
// revision there), is read after the request arrived, in one of two ways (hub.current):
//
//   - A probe on the hub's upstream watch stream: a create naming a watch id the stream already holds (a created
//     broadcast's, with that broadcast's range). etcd checks the stream's credentials and its permission on the
//     range, as for any create, then refuses the duplicate id ("mvcc: duplicate watch ID provided on the
//     WatchStream") at once, in order with the stream's other creates, with the header it would put on a created
//     response: its current revision. It creates no watcher, and costs one message each way on a stream that is
//     open anyway, where a Status call is a unary RPC of its own.
//   - Maintenance.Status, which etcd serves to any authenticated caller (no key permission needed), with the
//     credentials of the hub (revisions). Used when no probe can be sent (the hub holds no created watch on a live
//     stream: its first watcher, a reconnect) and when etcd answers a probe with anything but the duplicate
//     refusal (the credentials or the range refused): Status then decides, as it always did, whether the create
//     is refused and with which reason.
//
// Both batch without delaying anyone: while one read is in flight, callers that arrive join the next round, which
// starts when the in-flight one ends. A caller is only ever answered by a round that started after it asked, so
// the revision is at least that of every write acknowledged before it asked.

// revisions reads etcd's current revision with Maintenance.Status, in rounds as above.
type revisions struct {
	status func(context.Context, *pb.StatusRequest, ...grpc.CallOption) (*pb.StatusResponse, error)
	creds  upstream.Creds // the hub's

	// mu protects inflight and next.
	mu       sync.Mutex
	inflight bool
	next     *round // the round callers join; it has not started
}

// statusTimeout bounds one Status call; callers' own contexts bound their wait.
const statusTimeout = 10 * time.Second

type round struct {
	done chan struct{}
	hdr  *pb.ResponseHeader
	err  error
}

func newRevisions(cc grpc.ClientConnInterface, c upstream.Creds) *revisions {
	return &revisions{status: pb.NewMaintenanceClient(cc).Status, creds: c}
}

// current returns a header whose revision is etcd's current revision, read after the call began.
func (r *revisions) current(ctx context.Context) (*pb.ResponseHeader, error) {
	r.mu.Lock()
	rd := r.next
	if rd == nil {
		rd = &round{done: make(chan struct{})}
		r.next = rd
	}
	lead := !r.inflight
	if lead {
		r.inflight, r.next = true, nil
	}
	r.mu.Unlock()
	if lead {
		r.run(rd)
	}
	select {
	case <-rd.done:
		return rd.hdr, rd.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// run performs round rd, then starts the round that filled up meanwhile, if any.
func (r *revisions) run(rd *round) {
	ctx, cancel := context.WithTimeout(r.creds.Outgoing(context.Background(), false), statusTimeout)
	revisionReads.WithLabelValues("status").Inc()
	resp, err := r.status(ctx, &pb.StatusRequest{})
	cancel()
	if err == nil {
		rd.hdr = resp.Header
	}
	rd.err = err
	close(rd.done)
	r.mu.Lock()
	next := r.next
	r.next = nil
	r.inflight = next != nil
	r.mu.Unlock()
	if next != nil {
		go r.run(next)
	}
}

// current returns a header whose revision is etcd's current revision, read after the call began: from a probe when
// one can be sent, else from Status.
func (h *hub) current(ctx context.Context) (*pb.ResponseHeader, error) {
	h.mu.Lock()
	rd := h.joinProbe()
	h.mu.Unlock()
	if rd != nil {
		// Bounded as a Status call is: a stream that stops answering (a half-open connection) does not hold the
		// caller's creates and cancels for as long as TCP takes to notice; Status, a round started after this,
		// decides then.
		timer := time.NewTimer(statusTimeout)
		defer timer.Stop()
		select {
		case <-rd.done:
			if rd.hdr != nil {
				return rd.hdr, nil
			}
		case <-timer.C:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-h.ctx.Done():
			return nil, upstream.ErrClosed
		}
	}
	return h.revs.current(ctx)
}

// joinProbe returns the probe round the caller waits for (the next one if a probe is in flight), or nil if no probe
// can be sent. Called with h.mu held.
func (h *hub) joinProbe() *round {
	if h.probeNext != nil {
		return h.probeNext
	}
	rd := &round{done: make(chan struct{})}
	if h.probing != nil {
		h.probeNext = rd
		return rd
	}
	if !h.sendProbe() {
		return nil
	}
	h.probing = rd
	return rd
}

// sendProbe queues a probe on the current stream, if the hub holds a created watch there. A probe names a watch id
// etcd holds until the hub cancels it, and a cancel is queued after the probe (retarget), so etcd sees the
// duplicate. Called with h.mu held.
func (h *hub) sendProbe() bool {
	t := h.probeTarget
	if !h.connected || t == nil {
		return false
	}
	h.creating = append(h.creating, &h.probeMark)
	req := &pb.WatchCreateRequest{Key: []byte(t.rk.key), RangeEnd: rangeEndBytes(t.rk.end), WatchId: t.id}
	h.send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: req}})
	revisionReads.WithLabelValues("probe").Inc()
	return true
}

// probed handles etcd's answer to the probe in flight and sends the next one. Called with h.mu held.
func (h *hub) probed(resp *pb.WatchResponse) {
	rd := h.probing
	h.probing = nil
	switch {
	case resp.Canceled && resp.CancelReason == errDuplicateID:
		rd.hdr = resp.Header
	case !resp.Canceled:
		// etcd did not hold the id: it cannot happen while the hub holds the watch (see sendProbe).
		h.w.logger.Error("a revision probe created an upstream watch; cancelling it", zap.Int64("watch-id", resp.WatchId))
		h.cancel(resp.WatchId)
		h.probeTarget = nil // Status decides until a create is confirmed again
	default:
		// etcd refused the probe itself (credentials, or permission on the target's range revoked): its callers
		// ask Status, and so do the next ones until a create is confirmed again, instead of probing a target
		// etcd refuses.
		h.probeTarget = nil
	}
	close(rd.done)
	if next := h.probeNext; next != nil {
		h.probeNext = nil
		if h.sendProbe() {
			h.probing = next
		} else {
			close(next.done)
		}
	}
}

// abandonProbes sends the callers of the probes of a stream that ended to Status. Called with h.mu held.
func (h *hub) abandonProbes() {
	for _, rd := range []*round{h.probing, h.probeNext} {
		if rd != nil {
			close(rd.done)
		}
	}
	h.probing, h.probeNext = nil, nil
}

// retarget picks another probe target if b, whose watch the hub is dropping, was it: any created watch the hub
// still holds on the stream, or none. Called with h.mu held, before b's cancel is queued.
func (h *hub) retarget(b *broadcast) {
	if h.probeTarget != b {
		return
	}
	h.probeTarget = nil
	for _, o := range h.byID {
		if o.created {
			h.probeTarget = o
			return
		}
	}
}
