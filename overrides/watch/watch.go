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
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Options tune the coalescer; the zero value is the production setting.
type Options struct {
	// QueueLen bounds the event responses queued for one client stream; a watcher whose events do not fit is
	// detached and catches up later. 0 means 1024.
	QueueLen int
}

// ctrlQueueLen bounds the control responses (created, canceled, progress) queued for one client stream: past it
// the proxy stops reading the client's requests until the client reads, as etcd does with its control queue of
// the same length, so a client that sends and never reads holds a bounded amount of the proxy's memory.
const ctrlQueueLen = 16

// Watch is the coalescing override of the Watch service.
type Watch struct {
	pb.WatchServer
	cc       grpc.ClientConnInterface
	upstream pb.WatchClient
	leader   Leader
	logger   *zap.Logger
	opts     Options
	hubs     *shared.Pool[*hub] // one per client credentials
}

// Leader is what the coalescer needs to know of the cluster's leader (leader.Tracker).
type Leader interface {
	// HasLeader reports whether the cluster has a leader, as far as the proxy knows.
	HasLeader() bool
	// Found returns a channel that is closed when the leader is found (at once if it is present).
	Found() <-chan struct{}
}

// New wraps base; upstream watches are made on cc. Upstream streams are require-leader while ld says the cluster
// has a leader, and plain while it has none (see hub.serve).
func New(base pb.WatchServer, cc grpc.ClientConnInterface, ld Leader, lg *zap.Logger, opts Options) *Watch {
	if opts.QueueLen <= 0 {
		opts.QueueLen = 1024
	}
	w := &Watch{WatchServer: base, cc: cc, upstream: pb.NewWatchClient(cc), leader: ld, logger: lg, opts: opts}
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
	cs := &clientStream{h: h, ss: ss, watchers: map[int64]*watcher{}, notify: make(chan struct{}, 1),
		room: make(chan struct{}, 1), aborted: make(chan struct{})}
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
		case <-cs.aborted:
			return errCredentialsLost
		}
		for _, it := range cs.take() {
			if it.events {
				clientEventResponses.Inc()
			}
			if err := ss.Send(it.resp); err != nil {
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
	// progAfter is the number of upstream progress requests sent before the stream's pending progress request
	// arrived: only the answer to a later one answers it.
	progAfter int64

	lagged atomic.Bool // lagging is not empty

	// qmu protects queue, queuedEvents and queuedControl; it is taken under h.mu, never the other way round.
	qmu           sync.Mutex
	queue         []queued
	queuedEvents  int
	queuedControl int
	notify        chan struct{} // capacity 1: the queue has something
	room          chan struct{} // capacity 1: the control queue was emptied

	aborted   chan struct{} // closed when the stream must end with errCredentialsLost
	abortOnce sync.Once
}

// errCredentialsLost ends a client stream whose watchers etcd refused to re-create (after an upstream reconnect,
// or to resume a slow watcher) because the client's token is no longer valid. A client straight on etcd would be
// reconnecting at that point; clientv3 reconnects on Unavailable and fetches a fresh token when it opens a stream,
// then resumes its watchers from their last revision.
var errCredentialsLost = status.Error(codes.Unavailable,
	"etcdproxy: etcd no longer accepts this stream's auth token to resume its watches; reconnect")

// abort ends the stream with errCredentialsLost.
func (cs *clientStream) abort() { cs.abortOnce.Do(func() { close(cs.aborted) }) }

// lostCredentials reports whether etcd refused a watch because of the token itself (expired, or older than the
// latest auth change), which a client fixes by authenticating again.
func lostCredentials(reason string) bool {
	return reason == rpctypes.ErrGRPCInvalidAuthToken.Error() || reason == rpctypes.ErrGRPCAuthOldRevision.Error()
}

type queued struct {
	resp   *pb.WatchResponse
	events bool
}

// watcher is one client watcher.
type watcher struct {
	cs             *clientStream
	id             int64
	rk             rangeKey
	next           int64 // the first revision the client has not received
	startRev       int64 // the start revision the client asked for (0: from now)
	known          int64 // a revision etcd had when the watcher was created: a startRev above it is in the future
	idFrom         int64 // for an id the proxy chose: the stream's next id before, restored if etcd refuses the watch
	sent           bool  // an event was queued for the client since the last progress tick (progress.go)
	noPut          bool
	noDelete       bool
	progressNotify bool
	hdr            *pb.ResponseHeader // for the created response
	b              *broadcast         // nil while detached
	announced      bool               // the client has its created response
	dead           bool               // etcd ended it (compaction); it keeps its id until the client cancels it
	resolved       chan struct{}      // closed once announced or refused
}

// enqueueEvents queues resps for w, back to back (the parts of a fragmented response stay together), unless the
// stream already holds its share of event responses. Called with h.mu held.
func (cs *clientStream) enqueueEvents(w *watcher, resps ...*pb.WatchResponse) bool {
	cs.qmu.Lock()
	if cs.queuedEvents >= cs.h.w.opts.QueueLen {
		cs.qmu.Unlock()
		return false
	}
	for _, r := range resps {
		cs.queue = append(cs.queue, queued{resp: r, events: true})
		w.sent = w.sent || len(r.Events) > 0
	}
	cs.queuedEvents += len(resps)
	cs.qmu.Unlock()
	cs.poke()
	return true
}

// enqueueControl queues a control response (created, canceled, progress). They are never dropped: each answers
// a request of the client (bounded by waitRoom) or ends a watcher.
func (cs *clientStream) enqueueControl(resp *pb.WatchResponse) {
	cs.qmu.Lock()
	cs.queue = append(cs.queue, queued{resp: resp})
	cs.queuedControl++
	cs.qmu.Unlock()
	cs.poke()
}

// waitRoom returns once fewer than ctrlQueueLen control responses wait to be sent to the client.
func (cs *clientStream) waitRoom() error {
	for {
		cs.qmu.Lock()
		n := cs.queuedControl
		cs.qmu.Unlock()
		if n < ctrlQueueLen {
			return nil
		}
		select {
		case <-cs.room:
		case <-cs.ss.Context().Done():
			return cs.ss.Context().Err()
		case <-cs.h.ctx.Done():
			return shared.ErrClosed
		}
	}
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
	cs.queue, cs.queuedEvents, cs.queuedControl = nil, 0, 0
	select {
	case cs.room <- struct{}{}:
	default:
	}
	return q
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
		if w.announced && w.progressNotify {
			cs.h.notifyLeft()
		}
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
		case w.b == nil || !w.b.created || !w.announced || (rev > 0 && !w.b.progressOK):
			verdict = progressWait
		}
	}
	return verdict
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
	close(w.resolved)
}

// refuse answers w's create with etcd's refusal of the upstream watch, and w is gone; like etcd, the refused create
// uses up no watch id. Called with h.mu held.
func (w *watcher) refuse(resp *pb.WatchResponse) {
	if w.idFrom >= 0 {
		w.cs.nextID = w.idFrom
	}
	w.cs.enqueueControl(&pb.WatchResponse{Header: resp.Header, WatchId: -1, Created: true, Canceled: true,
		CancelReason: resp.CancelReason})
	close(w.resolved)
}

// receive handles the client's requests in order until it half-closes (nil) or fails.
func (cs *clientStream) receive() error {
	for {
		if err := cs.waitRoom(); err != nil {
			return err
		}
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
	if req.StartRevision < 0 {
		// etcd refuses a negative start before it looks at the caller's credentials.
		hdr, err := cs.h.revs.current(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			hdr = cs.h.header()
		}
		cs.enqueueControl(&pb.WatchResponse{Header: hdr, WatchId: -1, Created: true, Canceled: true,
			CancelReason: rpctypes.ErrCompacted.Error()})
		return nil
	}
	hdr, err := cs.h.currentForCreate(ctx)
	if err != nil {
		if reason, ok := authRefusal(err); ok {
			// etcd checks the caller's credentials before anything else and refuses the watch with this reason.
			cs.enqueueControl(&pb.WatchResponse{Header: cs.h.header(), WatchId: -1, Created: true, Canceled: true,
				CancelReason: reason})
			return nil
		}
		return err
	}
	key, end := normalize(req.Key, req.RangeEnd)
	w := &watcher{cs: cs, rk: rangeKey{key: key, end: end, prevKV: req.PrevKv}, next: req.StartRevision,
		startRev: req.StartRevision, known: hdr.Revision, idFrom: -1, progressNotify: req.ProgressNotify,
		hdr: hdr, resolved: make(chan struct{})}
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
	if req.Fragment {
		// etcd fragments a response after filtering it, at a size only etcd knows (its --max-request-bytes plus
		// 512 KiB): a fragmenting watcher shares only with watchers of the same filters, on an upstream watch
		// that asks etcd for the same fragments, which are passed on as they are.
		w.rk.fragment, w.rk.noPut, w.rk.noDelete = true, w.noPut, w.noDelete
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
		w.idFrom = cs.nextID
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
