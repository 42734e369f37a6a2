// Package watch overrides Watch.Watch with a coalescer: client watchers of the same range share one upstream
// watch.
//
// Replaces: Watch.Watch (the only Watch RPC). Terms, one type and one file each (etcd grpc-proxy's names in
// brackets): a broadcast (WatchBroadcast; broadcast.go) is one upstream watch; client watchers (watcher.go) attach
// to a broadcast of their range; broadcasts (WatchBroadcasts) holds the broadcasts of one range and merges one into
// another once both have delivered the same revision; a hub (WatchRanges; hub.go) holds all ranges of one
// identity and the upstream stream they share; a clientStream (WatchProxyStream; client.go) is one client's Watch
// stream and allocates its watchers. progress.go is progress notification, revision.go etcd's current revision.
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
//
// It owns the upstream watch streams it shares and every client Watch stream; it must not hand a client watcher
// anything etcd would not have sent it (an event out of order, a duplicate, an event of another identity's watch).
package watch

import (
	"context"

	"github.com/etcdproxy/etcdproxy/internal/encoded"
	"github.com/etcdproxy/etcdproxy/overrides/internal/upstream"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.uber.org/zap"
	"google.golang.org/grpc"
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
	hubs     *upstream.Pool[*hub] // one per client credentials
}

// Leader is what the coalescer needs to know of the cluster's leader (leader.Tracker).
type Leader interface {
	// HasLeader reports whether the cluster has a leader, as far as the proxy knows.
	HasLeader() bool
	// Found returns a channel that is closed when the leader is found (at once if it is present).
	Found() <-chan struct{}
	// Decided returns a channel that is closed once HasLeader has looked (the tracker's first verdict).
	Decided() <-chan struct{}
	// Loss returns a context that is cancelled when the leader is lost (done already if it is lost now).
	Loss() context.Context
}

// New wraps base; upstream watches are made on cc. Upstream streams are require-leader while ld says the cluster
// has a leader, and plain while it has none (see hub.serve).
func New(base pb.WatchServer, cc grpc.ClientConnInterface, ld Leader, lg *zap.Logger, opts Options) *Watch {
	if opts.QueueLen <= 0 {
		opts.QueueLen = 1024
	}
	w := &Watch{WatchServer: base, cc: cc, upstream: pb.NewWatchClient(cc), leader: ld, logger: lg, opts: opts}
	w.hubs = upstream.NewPool(func(ctx context.Context, c upstream.Creds) *hub { return newHub(ctx, w, c) })
	return w
}

// Close ends every upstream stream and waits for them; client streams still open end with Unavailable.
func (w *Watch) Close() { w.hubs.Close() }

// Watch serves one client Watch stream.
func (w *Watch) Watch(ss grpc.BidiStreamingServer[pb.WatchRequest, pb.WatchResponse]) error {
	creds := upstream.CredsOf(ss.Context())
	h, err := w.hubs.Join(creds)
	if err != nil {
		return err
	}
	defer w.hubs.Leave(creds)
	clientStreams.Inc()
	defer clientStreams.Dec()
	cs := &clientStream{h: h, ss: ss, queueLen: w.opts.QueueLen, watchers: map[int64]*watcher{},
		notify: make(chan struct{}, 1), room: make(chan struct{}, 1), resolved: make(chan struct{}, 1),
		aborted: make(chan struct{})}
	defer cs.close()

	slot := encoded.SlotOf(ss.Context()) // nil outside the proxy's server: every response is encoded by gRPC
	// The responses of shared entries are made in one message, again for each: nothing on the send path keeps a
	// message past its Send (gRPC encodes it, or takes the offered parts, before Send returns; the call log
	// formats it then, --namespace sends a copy). A fan-out to W watchers used to allocate W responses here.
	var reused pb.WatchResponse
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
			return upstream.ErrClosed
		case <-ss.Context().Done():
			return ss.Context().Err()
		case <-cs.aborted:
			return errCredentialsLost
		}
		for _, it := range cs.take() {
			if it.events {
				clientEventResponses.Inc()
			}
			resp := it.response(&reused)
			if it.enc != nil && slot != nil {
				it.enc.offer(slot, resp, it.id)
			}
			if err := ss.Send(resp); err != nil {
				return err
			}
		}
		if cs.lagged.Load() {
			h.resume(cs)
		}
	}
}
