// Package watch overrides Watch.Watch with a coalescer: client watchers of the same range share one upstream
// watch.
//
// Replaces: Watch.Watch (the only Watch RPC). Terms follow the seed notes: a WatchBroadcast (broadcast) is one
// upstream watch; client watchers attach to a broadcast of their range; WatchBroadcasts (broadcasts) holds the
// broadcasts of one range and merges one into another once both have delivered the same revision; WatchRanges
// (hub) holds all ranges of one identity and the upstream stream they share; a WatchProxyStream (clientStream) is
// one client's Watch stream and allocates its watchers.
//
// Guarantees kept from etcd, per client watcher: the created response carries etcd's current revision in its
// header (read from etcd, after the request arrived); rev=0 starts after that revision, rev=n at n; events in
// revision order, with no gap and no duplicate, across upstream reconnects, merges and slow-client catch-up;
// NOPUT/NODELETE filters; prev_kv; progress_notify; WatchProgressRequest answered with a revision up to which every
// event of every watcher of the stream has been sent; fragment; client-chosen watch ids and etcd's duplicate-id
// refusal; cancel; compaction (compact_revision, canceled); etcd's refusal of a watch the caller may not make.
// A client half-close keeps the stream delivering. Watchers end at once when their client goes away.
//
// Identity: etcd checks a watch against the caller's token when it is created, so upstream streams and broadcasts
// are shared only by callers with the same credentials (token and authorization metadata). With auth off, all
// clients share.
package watch

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"

	"github.com/etcdproxy/etcdproxy/overrides/internal/shared"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Options tune the coalescer; the zero value is the production setting.
type Options struct {
	// QueueLen bounds the event responses queued for one client stream; a watcher whose events do not fit is
	// detached and catches up later. 0 means 1024.
	QueueLen int
	// FragmentBytes is the size at which a response to a watcher that asked for fragments is split, as etcd
	// splits at its --max-request-bytes plus 512 KiB of gRPC overhead. 0 means 2 MiB, etcd's default.
	FragmentBytes int
}

// Watch is the coalescing override of the Watch service.
type Watch struct {
	pb.WatchServer
	cc       grpc.ClientConnInterface
	upstream pb.WatchClient
	logger   *zap.Logger
	opts     Options
	hubs     *shared.Pool[*hub] // one per client credentials
}

// New wraps base; upstream watches are made on cc.
func New(base pb.WatchServer, cc grpc.ClientConnInterface, lg *zap.Logger, opts Options) *Watch {
	if opts.QueueLen <= 0 {
		opts.QueueLen = 1024
	}
	if opts.FragmentBytes <= 0 {
		opts.FragmentBytes = 2 << 20
	}
	w := &Watch{WatchServer: base, cc: cc, upstream: pb.NewWatchClient(cc), logger: lg, opts: opts}
	w.hubs = shared.NewPool(func(ctx context.Context, c shared.Creds) *hub { return newHub(ctx, w, c) })
	return w
}

// Close ends every upstream stream and waits for them; client streams still open end with Unavailable.
func (w *Watch) Close() { w.hubs.Close() }

// Watch serves one client Watch stream.
func (w *Watch) Watch(ss grpc.BidiStreamingServer[pb.WatchRequest, pb.WatchResponse]) error {
	creds := shared.CredsOf(ss.Context())
	h, err := w.hubs.Join(creds)
	if err != nil {
		return err
	}
	defer w.hubs.Leave(creds)
	clientStreams.Inc()
	defer clientStreams.Dec()
	cs := &clientStream{h: h, ss: ss, watchers: map[int64]*watcher{}, notify: make(chan struct{}, 1)}
	defer cs.close()

	received := make(chan error, 1)
	go func() { received <- cs.receive() }()
	for {
		select {
		case <-cs.notify:
		case err := <-received:
			if err != nil {
				return err
			}
			received = nil // half-closed: keep delivering, as etcd does
			continue
		case <-h.ctx.Done():
			return shared.ErrClosed
		case <-ss.Context().Done():
			return ss.Context().Err()
		}
		for _, it := range cs.take() {
			if err := cs.send(it); err != nil {
				return err
			}
		}
		if cs.lagged.Load() {
			h.resume(cs)
		}
	}
}

// clientStream is one client's Watch stream (WatchProxyStream in the seed's terms).
type clientStream struct {
	h  *hub
	ss grpc.BidiStreamingServer[pb.WatchRequest, pb.WatchResponse]

	// Protected by h.mu:
	watchers map[int64]*watcher // by client watch id
	nextID   int64
	lagging  []*watcher
	closed   bool

	lagged atomic.Bool // lagging is not empty

	// qmu protects queue and queuedEvents; it is taken under h.mu, never the other way round.
	qmu          sync.Mutex
	queue        []queued
	queuedEvents int
	notify       chan struct{} // capacity 1
}

type queued struct {
	resp     *pb.WatchResponse
	fragment bool
	events   bool
}

// watcher is one client watcher.
type watcher struct {
	cs             *clientStream
	id             int64
	rk             rangeKey
	next           int64 // the first revision the client has not received
	startRev       int64 // the start revision the client asked for (0: from now)
	noPut          bool
	noDelete       bool
	progressNotify bool
	fragment       bool
	hdr            *pb.ResponseHeader // for the created response
	b              *broadcast         // nil while detached
	announced      bool               // the client has its created response
	dead           bool               // etcd ended it (compaction); it keeps its id until the client cancels it
	resolved       chan struct{}      // closed once announced or refused
}

// enqueueEvents queues resp for w unless the stream already holds its share of event responses. Called with h.mu
// held.
func (cs *clientStream) enqueueEvents(w *watcher, resp *pb.WatchResponse) bool {
	cs.qmu.Lock()
	if cs.queuedEvents >= cs.h.w.opts.QueueLen {
		cs.qmu.Unlock()
		return false
	}
	cs.queue = append(cs.queue, queued{resp: resp, fragment: w.fragment, events: true})
	cs.queuedEvents++
	cs.qmu.Unlock()
	cs.poke()
	return true
}

// enqueueControl queues a control response (created, canceled, progress); they are few and never dropped.
func (cs *clientStream) enqueueControl(resp *pb.WatchResponse) {
	cs.qmu.Lock()
	cs.queue = append(cs.queue, queued{resp: resp})
	cs.qmu.Unlock()
	cs.poke()
}

func (cs *clientStream) poke() {
	select {
	case cs.notify <- struct{}{}:
	default:
	}
}

func (cs *clientStream) take() []queued {
	cs.qmu.Lock()
	defer cs.qmu.Unlock()
	q := cs.queue
	cs.queue, cs.queuedEvents = nil, 0
	return q
}

// send writes one response. A response to a watcher that asked for fragments is split by etcd's rule: only when
// it has two events or more and its size reaches the limit; each fragment takes events while it stays under the
// limit (and at least one), and every fragment but the last has Fragment set.
func (cs *clientStream) send(it queued) error {
	if it.events {
		clientEventResponses.Inc()
	}
	limit := cs.h.w.opts.FragmentBytes
	if !it.fragment || len(it.resp.Events) < 2 || proto.Size(it.resp) < limit {
		return cs.ss.Send(it.resp)
	}
	evs := it.resp.Events
	for len(evs) > 0 {
		part := &pb.WatchResponse{Header: it.resp.Header, WatchId: it.resp.WatchId, Fragment: true}
		n := 0
		for n < len(evs) {
			part.Events = evs[:n+1]
			if n > 0 && proto.Size(part) >= limit {
				part.Events = evs[:n]
				break
			}
			n++
		}
		evs = evs[n:]
		part.Fragment = len(evs) > 0
		if err := cs.ss.Send(part); err != nil {
			return err
		}
	}
	return nil
}

// lag records that w was detached because the stream fell behind. Called with h.mu held.
func (cs *clientStream) lag(w *watcher) {
	cs.lagging = append(cs.lagging, w)
	cs.lagged.Store(true)
}

// forget drops w from the stream's watchers (its id becomes free). Called with h.mu held.
func (cs *clientStream) forget(w *watcher) {
	if cs.watchers[w.id] == w {
		delete(cs.watchers, w.id)
		clientWatchers.Dec()
	}
}

// progressVerdict says what to do with the stream's progress request given etcd's current revision rev (0 when
// not known yet). Called with h.mu held.
type progressVerdict int

const (
	progressAnswer progressVerdict = iota // every watcher has all events up to rev: answer
	progressWait                          // a watcher is catching up inside the proxy: ask again later
	progressDrop                          // etcd itself would not answer: no watcher, a compacted watcher, or
	// one that starts after rev
)

func (cs *clientStream) progress(rev int64) progressVerdict {
	if len(cs.watchers) == 0 {
		return progressDrop
	}
	verdict := progressAnswer
	if len(cs.lagging) > 0 {
		verdict = progressWait
	}
	for _, w := range cs.watchers {
		switch {
		case w.dead, rev > 0 && w.startRev > rev:
			return progressDrop
		case w.b == nil || !w.b.created || !w.announced:
			verdict = progressWait
		}
	}
	return verdict
}

func (w *watcher) announce() {
	w.announced = true
	w.cs.enqueueControl(&pb.WatchResponse{Header: w.hdr, WatchId: w.id, Created: true})
	close(w.resolved)
}

// refuse answers w's create with etcd's refusal of the upstream watch, and w is gone.
func (w *watcher) refuse(resp *pb.WatchResponse) {
	w.cs.enqueueControl(&pb.WatchResponse{Header: resp.Header, WatchId: -1, Created: true, Canceled: true,
		CancelReason: resp.CancelReason})
	close(w.resolved)
}

// receive handles the client's requests in order until it half-closes (nil) or fails.
func (cs *clientStream) receive() error {
	for {
		req, err := cs.ss.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		switch r := req.RequestUnion.(type) {
		case *pb.WatchRequest_CreateRequest:
			if r.CreateRequest != nil {
				if err := cs.create(r.CreateRequest); err != nil {
					return err
				}
			}
		case *pb.WatchRequest_CancelRequest:
			if r.CancelRequest != nil {
				if err := cs.cancel(r.CancelRequest.WatchId); err != nil {
					return err
				}
			}
		case *pb.WatchRequest_ProgressRequest:
			if r.ProgressRequest != nil {
				cs.h.mu.Lock()
				if cs.progress(0) != progressDrop {
					cs.h.requestProgress(cs)
				}
				cs.h.mu.Unlock()
			}
		}
	}
}

// create handles a create request; it returns once the client's created response (or refusal) is queued, so
// created responses keep the order of the requests, as with etcd.
func (cs *clientStream) create(req *pb.WatchCreateRequest) error {
	ctx := cs.ss.Context()
	hdr, err := cs.h.revs.current(ctx)
	if err != nil {
		if reason, ok := authRefusal(err); ok {
			// etcd checks the caller's credentials before anything else and refuses the watch with this reason.
			cs.enqueueControl(&pb.WatchResponse{Header: cs.h.header(), WatchId: -1, Created: true, Canceled: true,
				CancelReason: reason})
			return nil
		}
		return err
	}
	if req.StartRevision < 0 {
		cs.enqueueControl(&pb.WatchResponse{Header: hdr, WatchId: -1, Created: true, Canceled: true,
			CancelReason: rpctypes.ErrCompacted.Error()})
		return nil
	}
	key, end := normalize(req.Key, req.RangeEnd)
	w := &watcher{cs: cs, rk: rangeKey{key: key, end: end, prevKV: req.PrevKv}, next: req.StartRevision, startRev: req.StartRevision,
		progressNotify: req.ProgressNotify, fragment: req.Fragment, hdr: hdr, resolved: make(chan struct{})}
	if w.next == 0 {
		w.next = hdr.Revision + 1
	}
	for _, f := range req.Filters {
		switch f {
		case pb.WatchCreateRequest_NOPUT:
			w.noPut = true
		case pb.WatchCreateRequest_NODELETE:
			w.noDelete = true
		}
	}
	h := cs.h
	h.mu.Lock()
	if req.WatchId != 0 {
		if _, dup := cs.watchers[req.WatchId]; dup {
			h.mu.Unlock()
			cs.enqueueControl(&pb.WatchResponse{Header: hdr, WatchId: -1, Created: true, Canceled: true,
				CancelReason: errDuplicateID})
			return nil
		}
		w.id = req.WatchId
	} else {
		for cs.watchers[cs.nextID] != nil {
			cs.nextID++
		}
		w.id = cs.nextID
		cs.nextID++
	}
	cs.watchers[w.id] = w
	clientWatchers.Inc()
	h.attach(w)
	h.mu.Unlock()
	select {
	case <-w.resolved:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-h.ctx.Done():
		return shared.ErrClosed
	}
}

// authRefusal maps an error of the revision lookup (made with the caller's credentials) to the cancel reason etcd
// gives a watch create refused for the same credentials.
func authRefusal(err error) (string, bool) {
	for _, e := range []error{rpctypes.ErrGRPCUserEmpty, rpctypes.ErrGRPCInvalidAuthToken, rpctypes.ErrGRPCAuthOldRevision,
		rpctypes.ErrGRPCPermissionDenied} {
		if status.Code(err) == status.Code(e) && status.Convert(err).Message() == status.Convert(e).Message() {
			return e.Error(), true
		}
	}
	return "", false
}

// errDuplicateID is etcd's cancel reason for a create that reuses a live watch id of the stream.
const errDuplicateID = "mvcc: duplicate watch ID provided on the WatchStream"

// cancel handles a cancel request; like etcd, an unknown id gets no answer.
func (cs *clientStream) cancel(id int64) error {
	hdr, err := cs.h.revs.current(cs.ss.Context())
	if err != nil {
		if ctxErr := cs.ss.Context().Err(); ctxErr != nil {
			return ctxErr
		}
		hdr = cs.h.header() // etcd checks no credentials on cancel: answer with the last revision seen
	}
	h := cs.h
	h.mu.Lock()
	defer h.mu.Unlock()
	w := cs.watchers[id]
	if w == nil || !w.announced {
		return nil
	}
	cs.forget(w)
	h.detach(w)
	cs.unlag(w)
	cs.enqueueControl(&pb.WatchResponse{Header: hdr, WatchId: id, Canceled: true})
	return nil
}

// unlag drops w from the lagging list. Called with h.mu held.
func (cs *clientStream) unlag(w *watcher) {
	for i, x := range cs.lagging {
		if x == w {
			cs.lagging = append(cs.lagging[:i], cs.lagging[i+1:]...)
			break
		}
	}
	cs.lagged.Store(len(cs.lagging) > 0)
}

// close cancels every watcher of the stream at once.
func (cs *clientStream) close() {
	h := cs.h
	h.mu.Lock()
	defer h.mu.Unlock()
	cs.closed = true
	for _, w := range cs.watchers {
		cs.forget(w)
		h.detach(w)
	}
	cs.lagging = nil
	for i, c := range h.progress {
		if c == cs {
			h.progress = append(h.progress[:i], h.progress[i+1:]...)
			break
		}
	}
}

// resume re-attaches the watchers detached for lagging, once the stream has drained: each continues from its first
// undelivered revision, on a broadcast that has not passed it or on a catch-up broadcast of its own.
func (h *hub) resume(cs *clientStream) {
	h.mu.Lock()
	defer h.mu.Unlock()
	cs.qmu.Lock()
	busy := cs.queuedEvents > cs.h.w.opts.QueueLen/4
	cs.qmu.Unlock()
	if busy || cs.closed {
		return
	}
	lagging := cs.lagging
	cs.lagging = nil
	cs.lagged.Store(false)
	for _, w := range lagging {
		h.attach(w)
	}
	for _, c := range h.progress {
		if c == cs {
			h.askProgress()
		}
	}
}
