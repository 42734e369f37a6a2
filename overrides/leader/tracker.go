// Package leader tracks whether the etcd cluster behind the proxy has a leader, and acts on it for clients that
// ask for one (metadata hasleader=true, clientv3.WithRequireLeader).
//
// Loss is detected by a probe: a Watch stream opened upstream with require-leader metadata. etcd ends such a stream
// with its no-leader error once the member it reaches has had no leader for a few election timeouts; the stream
// also breaks when the member goes away. Either way the tracker marks the leader lost and reopens the probe with a
// bounded backoff; a reopened probe that etcd accepts marks the leader present again. The probe creates no watcher
// that needs permission: etcd monitors require-leader streams themselves, so the tracker works with auth enabled and
// without credentials of its own.
//
// Presence is also learned off the probe's path (a note of etcd grpc-proxy's leader tracking, which updates the
// status from the watch path only): every RPC that goes through consensus and succeeds calls MarkPresent, so recovery is seen at once rather
// than at the probe's next retry.
//
// It owns the probe, the leader's presence and the require-leader interceptors; it must not refuse or end a call whose
// client did not ask for a leader.
package leader

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/etcdproxy/etcdproxy/overrides/internal/upstream"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// Options tune a Tracker; the zero value is the production setting.
type Options struct {
	// RetryMin and RetryMax bound the backoff between probe attempts; 0 means 50ms and 2s.
	RetryMin, RetryMax time.Duration
	// ProbePrefix is put before the probe's key: the namespace (--namespace), so that a user confined to it may
	// watch the key. (The probe works without that permission too.)
	ProbePrefix string
}

// Tracker knows whether the cluster has a leader.
type Tracker struct {
	logger  *zap.Logger
	watch   pb.WatchClient
	opts    Options
	present atomic.Bool // read on every consensus RPC; written under mu

	// mu protects loss, signalLoss and found.
	mu sync.Mutex
	// loss is cancelled when the leader is lost; a fresh context replaces it when the leader returns.
	loss       context.Context
	signalLoss context.CancelFunc
	// found is closed when the leader is found; a fresh channel replaces it when the leader is lost.
	found chan struct{}

	cancel context.CancelFunc
	done   chan struct{}
	// decided is closed at the tracker's first verdict: the first probe accepted (or any MarkPresent), or failed.
	decided    chan struct{}
	decideOnce sync.Once
}

// probeKey is the key the probe watches: in etcd's reserved-looking space, never written by the proxy.
var probeKey = []byte("\x00etcdproxy/leader-probe")

// NewTracker starts tracking the leader of the cluster behind cc. Until the first probe is accepted the leader
// counts as lost. Close stops the tracker.
func NewTracker(cc grpc.ClientConnInterface, lg *zap.Logger, opts Options) *Tracker {
	if opts.RetryMin <= 0 {
		opts.RetryMin = 50 * time.Millisecond
	}
	if opts.RetryMax <= 0 {
		opts.RetryMax = 2 * time.Second
	}
	ctx, cancel := context.WithCancel(context.Background())
	t := &Tracker{logger: lg, watch: pb.NewWatchClient(cc), opts: opts, cancel: cancel, done: make(chan struct{}),
		decided: make(chan struct{})}
	t.loss, t.signalLoss = context.WithCancel(context.Background())
	t.signalLoss()
	t.found = make(chan struct{})
	leaderPresent.Set(0)
	go t.probe(ctx)
	return t
}

// Close stops the probe and waits for it.
func (t *Tracker) Close() {
	t.cancel()
	<-t.done
}

// HasLeader reports whether the cluster has a leader, as far as the proxy knows.
func (t *Tracker) HasLeader() bool { return t.present.Load() }

// Loss returns a context that is cancelled when the leader is lost; if it is lost now, the context is done
// already. Select on its Done channel, or tie a stream to it with context.AfterFunc.
func (t *Tracker) Loss() context.Context {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.loss
}

// Found returns a channel that is closed when the leader is found; if it is present now, the channel is closed
// already.
func (t *Tracker) Found() <-chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.found
}

// Decided returns a channel that is closed once the tracker knows whether the cluster has a leader: its first probe
// was accepted or failed (or an RPC that needs a leader succeeded). Before that HasLeader says false without
// having looked, so a long-lived upstream stream that would be opened differently without a leader (the watch
// hub's) waits for it: opened plain and re-opened require-leader a moment later, it would re-create its watches
// from a past revision, and etcd batches the events of a catch-up (etcd's TestV3WatchFromCurrentRevision
// expects one response per revision from a watcher created from now). The wait is the probe's first round trip.
func (t *Tracker) Decided() <-chan struct{} { return t.decided }

func (t *Tracker) decide() { t.decideOnce.Do(func() { close(t.decided) }) }

// MarkPresent records that the cluster has a leader: an RPC that needs one has just succeeded. It costs one atomic
// load when the leader is already known to be present.
func (t *Tracker) MarkPresent() {
	if t.present.Load() {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.present.Load() {
		return
	}
	t.loss, t.signalLoss = context.WithCancel(context.Background())
	close(t.found)
	t.present.Store(true)
	t.decide() // after present: a waiter on Decided sees the leader
	leaderPresent.Set(1)
	leaderChanges.Inc()
	t.logger.Info("etcd cluster has a leader")
}

func (t *Tracker) markLost(err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	defer t.decide()
	if !t.present.Load() {
		return
	}
	t.present.Store(false)
	t.signalLoss()
	t.found = make(chan struct{})
	leaderPresent.Set(0)
	leaderLosses.Inc()
	t.logger.Warn("etcd cluster has no leader, or the proxy cannot reach one", zap.Error(err))
}

// probe keeps a require-leader watch stream open upstream until ctx ends.
func (t *Tracker) probe(ctx context.Context) {
	defer close(t.done)
	upstream.Keep(ctx, upstream.Backoff{Min: t.opts.RetryMin, Max: t.opts.RetryMax},
		func() (bool, error) { return t.probeOnce(ctx) }, t.markLost)
}

// probeOnce opens one probe stream; once etcd accepts it, the leader is present. It returns when the stream ends,
// and whether etcd had accepted it: then the next probe is opened at once (the end is news: a dropped connection,
// a member restarted, the leader lost), as a client reopens its stream; one that etcd refused is retried with
// backoff.
func (t *Tracker) probeOnce(ctx context.Context) (accepted bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ws, err := t.watch.Watch(upstream.Creds{}.Outgoing(ctx, true), grpc.WaitForReady(true))
	if err != nil {
		return false, err
	}
	// A watcher on a key nobody writes: its creation (or etcd's refusal of it, e.g. for lack of permission) is
	// etcd's proof that it accepted the require-leader stream; what matters afterwards is how the stream ends.
	// The watcher is cancelled at once: etcd watches the require-leader stream, not its watchers, so the probe
	// costs etcd no watcher (etcd_debugging_mvcc_watcher_total counts the clients' only, as without the proxy).
	err = ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{
		CreateRequest: &pb.WatchCreateRequest{Key: append([]byte(t.opts.ProbePrefix), probeKey...)}}})
	if err != nil {
		_, err = ws.Recv()
		return false, err
	}
	created, err := ws.Recv()
	if err != nil {
		return false, err
	}
	t.MarkPresent()
	if created.Created && !created.Canceled {
		if err := ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CancelRequest{
			CancelRequest: &pb.WatchCancelRequest{WatchId: created.WatchId}}}); err != nil {
			_, err = ws.Recv()
			return true, err
		}
	}
	for {
		if _, err := ws.Recv(); err != nil {
			return true, err
		}
	}
}
