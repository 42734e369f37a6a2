package watch

import (
	"errors"
	"io"
	"sync"
	"sync/atomic"

	"github.com/etcdproxy/etcdproxy/overrides/internal/upstream"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
)

// clientStream is one client's Watch stream (etcd grpc-proxy's WatchProxyStream).
type clientStream struct {
	h        *hub
	ss       grpc.BidiStreamingServer[pb.WatchRequest, pb.WatchResponse]
	queueLen int // Options.QueueLen: the event responses that may be queued for the client

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

	// resolved (capacity 1) is signalled when the watcher of the create being handled is announced or refused. One
	// create waits at a time (receive handles the client's requests one by one, and create returns once its watcher
	// is resolved), so a signal per stream serves every watcher of it: a channel per watcher cost 96 bytes of each.
	resolved chan struct{}

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

// queued is a response waiting to be sent: resp, or (resp nil) the response of enc's header and events under watch
// id watchID, made when it is sent: a fan-out of W events queues W entries and no response until each is sent.
type queued struct {
	resp    *pb.WatchResponse
	events  bool
	enc     *shared    // if set, the response is sent as enc's parts around id (encoding.go)
	id      mem.Buffer // the encoding of the response's watch id
	watchID int64
}

// response returns the response to send; a shared entry's is made in into, which only shared entries' responses
// are made in (so that its other fields stay unset).
func (q *queued) response(into *pb.WatchResponse) *pb.WatchResponse {
	if q.resp == nil {
		into.Header, into.WatchId, into.Events = q.enc.header, q.watchID, q.enc.events
		return into
	}
	return q.resp
}

// enqueueEvents queues resps for w, back to back (the parts of a fragmented response stay together), unless the
// stream already holds its share of event responses. Called with h.mu held.
func (cs *clientStream) enqueueEvents(w *watcher, resps ...*pb.WatchResponse) bool {
	return cs.enqueue(func() {
		for _, r := range resps {
			cs.queue = append(cs.queue, queued{resp: r, events: true})
			w.sent = w.sent || len(r.Events) > 0
		}
		cs.queuedEvents += len(resps)
	})
}

// enqueueShared is enqueueEvents of the response of enc's header and events under w's id.
func (cs *clientStream) enqueueShared(w *watcher, enc *shared) bool {
	id := w.idPart()
	return cs.enqueue(func() {
		cs.queue = append(cs.queue, queued{events: true, enc: enc, id: id, watchID: w.id})
		w.sent = true
		cs.queuedEvents++
	})
}

// enqueue runs add under qmu, unless the stream already holds its share of event responses (false).
func (cs *clientStream) enqueue(add func()) bool {
	cs.qmu.Lock()
	defer cs.qmu.Unlock()
	if cs.queuedEvents >= cs.queueLen {
		return false
	}
	add()
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
			return upstream.ErrClosed
		}
	}
}

// resolve tells the create waiting on the stream that its watcher was announced or refused. Called with h.mu held.
func (cs *clientStream) resolve() {
	select {
	case cs.resolved <- struct{}{}:
	default:
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
		hdr, err := cs.h.current(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			hdr = cs.h.header()
		}
		cs.enqueueControl(refusal(hdr, rpctypes.ErrCompacted.Error()))
		return nil
	}
	hdr, err := cs.h.currentForCreate(ctx)
	if err != nil {
		if reason, ok := authRefusal(err); ok {
			// etcd checks the caller's credentials before anything else and refuses the watch with this reason.
			cs.enqueueControl(refusal(cs.h.header(), reason))
			return nil
		}
		return err
	}
	w := cs.newWatcher(req, hdr)
	h := cs.h
	h.mu.Lock()
	if req.WatchId != 0 {
		if _, dup := cs.watchers[req.WatchId]; dup {
			h.mu.Unlock()
			// etcd looks at the range before the id: an empty range is refused as such, even with a duplicate id.
			cs.enqueueControl(refusal(hdr, w.rk.duplicateRefusal()))
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
	case <-cs.resolved:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-h.ctx.Done():
		return upstream.ErrClosed
	}
}

// newWatcher is the watcher req asks for, created when etcd's revision was hdr's; it has no id yet.
func (cs *clientStream) newWatcher(req *pb.WatchCreateRequest, hdr *pb.ResponseHeader) *watcher {
	key, end := normalize(req.Key, req.RangeEnd)
	w := &watcher{cs: cs, rk: rangeKey{key: key, end: end, prevKV: req.PrevKv}, next: req.StartRevision,
		startRev: req.StartRevision, known: hdr.Revision, idFrom: -1, progressNotify: req.ProgressNotify,
		hdr: hdr}
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
	return w
}

// refusal is etcd's answer to a create it refuses: created and canceled at once, with no watch id (etcd uses none
// up) and the reason.
func refusal(hdr *pb.ResponseHeader, reason string) *pb.WatchResponse {
	return &pb.WatchResponse{Header: hdr, WatchId: -1, Created: true, Canceled: true, CancelReason: reason}
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

// errDuplicateID is etcd's cancel reason for a create that reuses a live watch id of the stream, and
// errEmptyRange its reason for a range whose end is not above its key (mvcc's errors, as etcd sends them).
const (
	errDuplicateID = "mvcc: duplicate watch ID provided on the WatchStream"
	errEmptyRange  = "mvcc: watcher range is empty"
)

// duplicateRefusal is etcd's reason for refusing a create of rk with a watch id already in use: the empty range,
// which etcd checks first, else the duplicate id.
func (rk rangeKey) duplicateRefusal() string {
	if rk.end != "" && rk.end != "\x00" && rk.key >= rk.end {
		return errEmptyRange
	}
	return errDuplicateID
}

// cancel handles a cancel request; like etcd, an unknown id gets no answer.
func (cs *clientStream) cancel(id int64) error {
	hdr, err := cs.h.current(cs.ss.Context())
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
