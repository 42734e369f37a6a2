package watch

import (
	"bytes"
	"context"
	"errors"
	"io"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/etcdproxy/etcdproxy/overrides/internal/upstream"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// A hub holds everything the proxy watches on behalf of clients with one identity (etcd grpc-proxy's
// WatchRanges): the broadcasts of every range, and the one upstream Watch stream they share. Its run goroutine keeps that
// stream open, re-creating every broadcast from where it stopped when the stream has to be reopened, so clients
// notice nothing: no gap, no duplicate, no second "created".
//
// mu is the one lock of a hub: it protects the broadcasts, their watchers and the watcher maps of the hub's client
// streams. Fan-out happens under it and never blocks (see clientStream.enqueueEvents and enqueueControl).
type hub struct {
	w      *Watch
	ctx    context.Context // cancelled when the last client stream leaves
	creds  upstream.Creds  // the clients' credentials, for upstream calls
	authed bool            // creds are not empty: etcd checks permissions on what the hub asks
	revs   *revisions

	mu        sync.Mutex
	ranges    map[rangeKey]*broadcasts
	byID      map[int64]*broadcast // upstream watch id -> broadcast
	nextID    int64                // next upstream watch id; from 1, as 0 asks etcd to pick one (a probe names ids)
	creating  []*broadcast         // upstream creates sent on the current stream, not yet answered, oldest first
	progress  []*clientStream      // client streams waiting for a progress answer
	askedProg bool                 // a progress request is outstanding on the current stream
	// Progress requests sent on the current stream, and a lower bound of the index of the one the last answer
	// answered (etcd answers in order, and drops some): an answer may predate a watch created after its request.
	progSent, progAnswered int64
	askedAt                time.Time          // when it was sent
	outbox                 []*pb.WatchRequest // requests for the current stream's sender
	kick                   chan struct{}      // wakes the sender; capacity 1
	emptied                chan struct{}      // the stream carries no watch any more (pokeIfEmpty); capacity 1
	connected              bool
	lastHeader             *pb.ResponseHeader
	// Progress notifications (progress.go): the clock's upstream watch, whether one of its ticks waits for a
	// progress answer, and how many announced client watchers want notifications.
	clock     *broadcast
	tick      bool
	notifying int
	// Revision probes (revision.go): the round whose probe is in flight on the current stream, the round callers
	// join meanwhile, the created broadcast (or clock) whose watch id the next probe names, and probeMark, the
	// probe's place in creating.
	probing, probeNext *round
	probeTarget        *broadcast
	probeMark          broadcast
}

// rangeKey identifies the upstream watches a client watcher can share: same range, same prev_kv. Filters and
// progress notification are applied per client watcher, except for watchers that ask for fragments: etcd splits
// what is left after filtering, so they share by filters and etcd applies them (see clientStream.create).
type rangeKey struct {
	key, end        string
	prevKV          bool
	fragment        bool
	noPut, noDelete bool
}

func newHub(ctx context.Context, w *Watch, c upstream.Creds) *hub {
	h := &hub{w: w, ctx: ctx, creds: c, ranges: map[rangeKey]*broadcasts{}, byID: map[int64]*broadcast{},
		nextID: 1, kick: make(chan struct{}, 1), emptied: make(chan struct{}, 1)}
	h.revs = newRevisions(w.cc, c)
	h.authed = c != upstream.Creds{}
	return h
}

// pokeIfEmpty tells a plain stream waiting to become require-leader (upgradeWhenFree) that it carries no watch
// any more. Called with h.mu held.
func (h *hub) pokeIfEmpty() {
	if len(h.byID) == 0 {
		select {
		case h.emptied <- struct{}{}:
		default:
		}
	}
}

// send queues req for the upstream stream. Called with h.mu held.
func (h *hub) send(req *pb.WatchRequest) {
	h.outbox = append(h.outbox, req)
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// Run keeps the upstream stream open until the hub is closed.
func (h *hub) Run() {
	upstream.Keep(h.ctx, retry, func() (bool, error) {
		answered, err := h.serve()
		// Reopened at once after a stream that worked (a new failure: a dropped connection, a member restarted),
		// as clientv3 reopens its own, or when the leader is found (require-leader from now on); with backoff
		// while attempts fail before etcd answers anything.
		return answered || errors.Is(err, errLeaderFound), err
	}, func(err error) {
		if !errors.Is(err, errLeaderFound) {
			h.w.logger.Debug("upstream watch stream ended; reopening", zap.Error(err))
			upstreamReconnects.Inc()
		}
	})
}

// retry bounds the wait between upstream stream attempts (and between lookups of etcd's revision for a create).
var retry = upstream.Backoff{Min: 50 * time.Millisecond, Max: 2 * time.Second}

// errLeaderFound ends a plain upstream stream when the cluster has a leader again.
var errLeaderFound = errors.New("the cluster has a leader again: the upstream watch stream becomes require-leader")

// serve opens one upstream stream, (re)creates every broadcast on it and routes its responses until it fails.
//
// The stream is require-leader while the cluster has a leader, so that a member that loses the cluster
// (partitioned) ends it and the watches move to a member that has one. With no leader anywhere the proxy can see,
// the stream is plain: etcd serves watchers that did not ask for a leader from its local store, and so does the
// proxy (client streams that asked for one are ended by the leader override). It becomes require-leader again as
// soon as the leader is back.
func (h *hub) serve() (answered bool, err error) {
	ctx, cancel := context.WithCancelCause(h.ctx)
	var upgrading sync.WaitGroup // ends before the next stream's, so that it takes none of that one's pokes
	defer func() { cancel(nil); upgrading.Wait() }()
	// Not before the tracker has looked: a stream opened plain because it had not, and re-opened require-leader a
	// moment later, would re-create every watch from a past revision (leader.Tracker.Decided).
	select {
	case <-h.w.leader.Decided():
	case <-ctx.Done():
		return false, context.Cause(ctx)
	}
	requireLeader := h.w.leader.HasLeader()
	if !requireLeader {
		found := h.w.leader.Found()
		upgrading.Go(func() {
			select {
			case <-found:
			case <-ctx.Done():
				return
			}
			h.upgradeWhenFree(ctx, cancel)
		})
	}
	stream, err := h.w.upstream.Watch(h.creds.Outgoing(ctx, requireLeader))
	if err != nil {
		if cause := context.Cause(ctx); errors.Is(cause, errLeaderFound) {
			return false, cause
		}
		return false, err
	}
	upstreamStreams.Inc()
	defer upstreamStreams.Dec()

	h.connect()
	defer func() {
		h.mu.Lock()
		h.connected = false
		h.abandonProbes()
		h.mu.Unlock()
	}()

	// The stream's goroutines end before serve returns, so none of them can take what the hub queues for the next
	// stream.
	failed := make(chan error, 2)
	var helpers sync.WaitGroup
	defer helpers.Wait()
	defer cancel(nil)
	helpers.Go(func() { failed <- h.sendLoop(ctx, stream) })
	helpers.Go(func() { h.reaskProgress(ctx) })
	for {
		resp, err := stream.Recv()
		if err != nil {
			if cause := context.Cause(ctx); errors.Is(cause, errLeaderFound) {
				return answered, cause
			}
			if errors.Is(err, io.EOF) {
				err = errors.New("upstream watch stream closed")
			}
			return answered, err
		}
		answered = true
		h.route(resp)
		select {
		case err := <-failed:
			return answered, err
		default:
		}
	}
}

// plainGrace bounds how long a plain upstream stream that carries watches stays plain once the leader is back.
var plainGrace = 10 * time.Second

// upgradeWhenFree ends the plain stream of ctx (cancel, with errLeaderFound) so that it is reopened require-leader,
// the leader being back: at once if it carries no watch, else once it carries none, or after plainGrace, or when
// the leader is lost again (a require-leader stream would have ended then too). Reopening a stream re-creates its
// watches from where they were, which etcd serves as a catch-up: the events of the reopening's window come batched
// in one response, where a watcher that etcd had held all along gets one response per revision. Right after the
// proxy starts, or after a leader election, clients are creating watches and writing (etcd's
// TestV3WatchFromCurrentRevision: a watch made while the proxy's stream was plain, and three puts): the grace keeps
// those watchers exact, and still moves the stream off a member that may lose the cluster later.
func (h *hub) upgradeWhenFree(ctx context.Context, cancel context.CancelCauseFunc) {
	loss := h.w.leader.Loss()
	grace := time.NewTimer(plainGrace)
	defer grace.Stop()
	for {
		h.mu.Lock()
		idle := len(h.byID) == 0
		h.mu.Unlock()
		if idle {
			cancel(errLeaderFound)
			return
		}
		select {
		case <-h.emptied:
		case <-grace.C:
			cancel(errLeaderFound)
			return
		case <-loss.Done():
			cancel(errLeaderFound)
			return
		case <-ctx.Done():
			return
		}
	}
}

// connect marks the hub connected to a new upstream stream and queues on it the creation of every broadcast (a
// created one from where it stopped) and of the clock, and a progress request if one is owed.
func (h *hub) connect() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.connected = true
	h.outbox, h.creating, h.askedProg = nil, nil, false
	h.progSent, h.progAnswered = 0, 0
	h.probeTarget = nil // no watch id is held on the new stream until a create is confirmed
	for _, bs := range h.ranges {
		for b := range bs.all {
			if b.created {
				// From where it stopped: a catch-up until etcd says otherwise.
				b.start, b.synced = max(b.rev, 1), false
			}
			b.created, b.parts = false, nil
			h.createUpstream(b)
		}
	}
	if h.clock != nil {
		h.clock.created = false
		h.createUpstream(h.clock)
	}
	if len(h.progress) > 0 || h.tick {
		h.askProgress()
	}
}

// sendLoop owns the upstream stream's send side.
func (h *hub) sendLoop(ctx context.Context, stream grpc.BidiStreamingClient[pb.WatchRequest, pb.WatchResponse]) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-h.kick:
		}
		h.mu.Lock()
		out := h.outbox
		h.outbox = nil
		h.mu.Unlock()
		for _, req := range out {
			if err := stream.Send(req); err != nil {
				return err
			}
		}
	}
}

// createUpstream asks the upstream stream for b's watch, from b.start (see broadcast.start). Called with h.mu held.
func (h *hub) createUpstream(b *broadcast) {
	h.creating = append(h.creating, b)
	req := &pb.WatchCreateRequest{Key: []byte(b.rk.key), RangeEnd: rangeEndBytes(b.rk.end), StartRevision: b.start,
		PrevKv: b.rk.prevKV, ProgressNotify: true, WatchId: b.id, Fragment: b.rk.fragment}
	if b.rk.noPut {
		req.Filters = append(req.Filters, pb.WatchCreateRequest_NOPUT)
	}
	if b.rk.noDelete {
		req.Filters = append(req.Filters, pb.WatchCreateRequest_NODELETE)
	}
	h.send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: req}})
}

// cancelUpstream drops b's upstream watch. Called with h.mu held.
func (h *hub) cancelUpstream(b *broadcast) {
	delete(h.byID, b.id)
	h.pokeIfEmpty()
	h.retarget(b)
	b.bs.remove(b)
	if len(b.bs.all) == 0 {
		delete(h.ranges, b.rk)
	}
	upstreamWatchers.Dec()
	if b.created {
		h.cancel(b.id)
	}
	// A create still unanswered is answered later; route ignores ids it no longer knows, and the stray upstream
	// watcher is cancelled then.
}

// cancel asks the upstream stream to cancel watch id. Called with h.mu held.
func (h *hub) cancel(id int64) {
	h.send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CancelRequest{CancelRequest: &pb.WatchCancelRequest{WatchId: id}}})
}

// askProgress sends a progress request upstream unless one is outstanding. Called with h.mu held.
func (h *hub) askProgress() {
	if h.askedProg || !h.connected {
		return
	}
	h.askedProg, h.askedAt = true, time.Now()
	h.progSent++
	h.send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_ProgressRequest{ProgressRequest: &pb.WatchProgressRequest{}}})
}

// progressRetry is how long the hub waits for a progress answer before asking again: etcd drops a progress
// request, rather than deferring it, while a watcher of the stream is still catching up (a new watcher from the
// current revision is, until etcd's next sync, within 100 ms).
const progressRetry = 200 * time.Millisecond

// reaskProgress re-sends an unanswered progress request, every progressRetry, until the stream ends.
func (h *hub) reaskProgress(ctx context.Context) {
	t := time.NewTicker(progressRetry)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		h.mu.Lock()
		if h.askedProg && time.Since(h.askedAt) >= progressRetry {
			h.askedProg = false
			h.askProgress()
		}
		h.mu.Unlock()
	}
}

// route handles one upstream response.
func (h *hub) route(resp *pb.WatchResponse) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lastHeader = resp.Header
	switch {
	case resp.Created:
		h.created(resp)
	case resp.WatchId == -1 && !resp.Canceled && len(resp.Events) == 0:
		h.progressAnswered(resp)
	default:
		b := h.byID[resp.WatchId]
		if b == nil {
			if !resp.Canceled {
				// A watch we dropped while its create was in flight: cancel it now.
				h.cancel(resp.WatchId)
			}
			return
		}
		if b == h.clock {
			h.clockTicked(resp)
			return
		}
		if resp.Canceled {
			b.ended(resp)
			return
		}
		b.deliver(resp)
	}
}

// created handles the answer to the oldest upstream create.
func (h *hub) created(resp *pb.WatchResponse) {
	if len(h.creating) == 0 {
		h.w.logger.Error("upstream watch created without a pending create", zap.Int64("watch-id", resp.WatchId))
		return
	}
	b := h.creating[0]
	h.creating = h.creating[1:]
	if b == &h.probeMark {
		h.probed(resp)
		return
	}
	if h.byID[b.id] != b {
		// Dropped while the create was in flight.
		if !resp.Canceled {
			h.cancel(resp.WatchId)
		}
		return
	}
	if b == h.clock {
		b.created = !resp.Canceled
		if resp.Canceled {
			h.stopClock()
		} else if h.probeTarget == nil {
			h.probeTarget = b
		}
		return
	}
	if resp.Canceled {
		b.refused(resp)
		return
	}
	if h.probeTarget == nil {
		h.probeTarget = b
	}
	b.confirmedAt = h.progSent
	b.confirm(resp.Header)
	if len(b.bs.all) > 1 {
		// A progress answer brings every live broadcast of the range to the same revision: they merge then.
		h.askProgress()
	}
}

// progressAnswered handles an upstream progress response: every broadcast whose creation etcd had confirmed before
// the answered request was sent has delivered all events up to its revision (a broadcast created later may not be
// covered: etcd computed the answer before it held that watcher, though its created response can come first).
// Client streams whose watchers all ride such broadcasts, and that asked before that request was sent, get their
// answer now; those with a watcher catching up inside the proxy wait for the next round; those etcd itself would
// not answer (see clientStream.progress) get nothing, as from etcd.
func (h *hub) progressAnswered(resp *pb.WatchResponse) {
	h.askedProg = false
	h.progAnswered = min(h.progAnswered+1, h.progSent)
	rev := resp.Header.GetRevision()
	again := false
	for _, bs := range h.ranges {
		for b := range bs.all {
			b.progressOK = b.created && b.confirmedAt < h.progAnswered
			if b.progressOK {
				b.rev, b.synced = max(b.rev, rev), true
			} else if b.created && len(bs.all) > 1 {
				again = true // it may merge after the next answer
			}
		}
		if len(bs.all) > 1 {
			for _, b := range slices.Collect(maps.Keys(bs.all)) {
				if _, ok := bs.all[b]; ok { // not merged away by an earlier iteration
					bs.mergeInto(b)
				}
			}
		}
	}
	if h.tick {
		h.notifyProgress(resp.Header)
	}
	waiting := h.progress
	h.progress = nil
	for _, cs := range waiting {
		if cs.closed {
			continue
		}
		verdict := cs.progress(rev)
		if verdict == progressAnswer && cs.progAfter >= h.progAnswered {
			verdict = progressWait // the answer may be older than the client's request
		}
		switch verdict {
		case progressAnswer:
			cs.enqueueControl(&pb.WatchResponse{Header: resp.Header, WatchId: -1})
		case progressWait:
			h.progress = append(h.progress, cs)
		}
	}
	if len(h.progress) > 0 || again {
		h.askProgress()
	}
}

// requestProgress records that cs asked for progress. Called with h.mu held.
func (h *hub) requestProgress(cs *clientStream) {
	for _, c := range h.progress {
		if c == cs {
			return
		}
	}
	cs.progAfter = h.progSent
	h.progress = append(h.progress, cs)
	h.askProgress()
}

// currentForCreate returns etcd's current revision for a watcher being created. An error other than etcd's refusal
// of the caller's credentials (etcd unreachable, no leader) does not end the client's stream: the lookup is
// retried, as the upstream watch would be, until it succeeds, the client goes away or the hub closes.
func (h *hub) currentForCreate(ctx context.Context) (*pb.ResponseHeader, error) {
	backoff := retry.Min
	for {
		hdr, err := h.current(ctx)
		if err == nil {
			return hdr, nil
		}
		if _, ok := authRefusal(err); ok || ctx.Err() != nil {
			return nil, err
		}
		h.w.logger.Debug("reading etcd's revision for a new watcher failed; retrying", zap.Error(err))
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-h.ctx.Done():
			return nil, upstream.ErrClosed
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, retry.Max)
	}
}

// header returns the last header seen from etcd, for answers that need one when etcd cannot be asked. Called
// without h.mu held.
func (h *hub) header() *pb.ResponseHeader {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.lastHeader != nil {
		return h.lastHeader
	}
	return &pb.ResponseHeader{}
}

func rangeEndBytes(end string) []byte {
	if end == "" {
		return nil
	}
	return []byte(end)
}

// normalize applies etcd's rules to a create request's range: an empty key is "\x00", the smallest key; a range
// end of "\x00" means every key from key on.
func normalize(key, end []byte) (string, string) {
	if len(key) == 0 {
		key = []byte{0}
	}
	if bytes.Equal(end, []byte{0}) {
		return string(key), "\x00"
	}
	return string(key), string(end)
}

// resume re-attaches the watchers detached for lagging, once the stream has drained: each continues from its first
// undelivered revision, on a broadcast that has not passed it or on a catch-up broadcast of its own.
func (h *hub) resume(cs *clientStream) {
	h.mu.Lock()
	defer h.mu.Unlock()
	cs.qmu.Lock()
	busy := cs.queuedEvents > cs.queueLen/4
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

// attach hands w, which must receive every event from revision w.next on, to a broadcast of the range (see
// watcher.canRide), else to a new one. Called with h.mu held.
func (h *hub) attach(w *watcher) {
	bs := h.ranges[w.rk]
	if bs == nil {
		bs = &broadcasts{h: h, rk: w.rk, all: map[*broadcast]struct{}{}}
		h.ranges[w.rk] = bs
	}
	// The same range, with the strings of the first watcher of it: those decoded from this watcher's request go
	// (at W=10,000 watchers of one prefix, 0.4 MB of a live heap of 7 at the burst's peak).
	w.rk = bs.rk
	var best *broadcast
	// With auth on, a new watcher gets an upstream watch of its own, so that etcd checks the caller's permission
	// on the range exactly as it would; a progress round then lets it merge into the shared broadcast.
	if !(h.authed && !w.announced) {
		for b := range bs.all {
			if w.canRide(b) && (best == nil || len(b.watchers) > len(best.watchers)) {
				best = b
			}
		}
	}
	if best == nil {
		best = h.newBroadcast(bs, w)
	}
	w.b = best
	if !best.created {
		best.waiting = append(best.waiting, w)
		return
	}
	w.startAfter(best.rev, nil)
	best.watchers[w] = struct{}{}
	if !w.announced {
		w.announce()
	}
}

// newBroadcast starts a broadcast of bs for w. Called with h.mu held.
func (h *hub) newBroadcast(bs *broadcasts, w *watcher) *broadcast {
	b := &broadcast{bs: bs, id: h.nextID, rk: w.rk, watchers: map[*watcher]struct{}{}}
	h.nextID++
	switch {
	case w.announced:
		b.rev = w.next - 1
		b.start = max(b.rev, 1)
	case w.startRev == 0 || w.startRev > w.known:
		// From now, as etcd would hold the watcher: synced at once. A watcher from a future revision skips
		// what comes before it; had etcd passed that revision by the time it created the watch, the watcher
		// moves to a broadcast from its own start (broadcast.confirm).
	default:
		b.rev = w.next - 1
		b.start = w.next
	}
	bs.all[b] = struct{}{}
	h.byID[b.id] = b
	upstreamWatchers.Inc()
	if h.connected {
		h.createUpstream(b)
	}
	return b
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
