// Package lease overrides Lease.LeaseKeepAlive: client keepalive streams share upstream streams.
//
// Sharing: the clients of one identity share Options.Streams upstream streams at most (each client stream stays on
// one, picked in turn when it opens). etcd serves one stream's renewals one at a time, and a member that is not the
// leader forwards each to the leader and waits for its answer, so one stream carries at most one renewal per round
// trip to the leader: a few streams let etcd renew in parallel, and a burst of renewals does not queue behind one.
//
// Replaces: LeaseKeepAlive. Every other Lease RPC falls through to the service it wraps (LeaseGrant, LeaseRevoke,
// LeaseTimeToLive and LeaseLeases fail slow through the upstream connection's wait-for-ready; see proxy.Dial).
//
// Guarantees kept from etcd:
//   - Each client keepalive request is forwarded at once and gets its own reply, with the TTL etcd reports (-1 or 0
//     for an expired or revoked lease, as etcd answers). The proxy never renews a lease on its own, so a lease lives
//     no longer than its TTL after the last client heartbeat.
//   - A client that half-closes still gets the replies to what it sent, then its stream ends cleanly.
//   - An error etcd returns for a client's request ends that client's stream with etcd's status, after the replies
//     etcd sent before it; the client's later requests are not sent, as etcd reads nothing more. A failure of the
//     shared stream itself (member gone, no leader on that member, timeout) is not a client's: the proxy reopens
//     the upstream stream, possibly on another member, and re-sends the unanswered requests.
//   - A request is not held longer than etcd would hold it: one left unanswered for Options.RenewTimeout (etcd's own
//     bound on a renewal, 5 s + 2 × its election timeout) ends its client's stream as etcd ends it then, with
//     "etcdserver: no leader" while the proxy sees no leader, else "etcdserver: request timed out".
//   - An upstream stream that its member ended for want of a leader is reopened once the proxy sees a leader again,
//     not in a loop that etcd refuses meanwhile.
//   - Auth: etcd checks a renewal against the caller's token (put permission on the lease's keys), so streams are
//     shared only between callers with the same credentials (token and authorization metadata); with auth off,
//     all clients share the same upstream streams.
//   - Require-leader client streams end with etcd's no-leader error when the leader is lost (overrides/leader);
//     upstream streams are require-leader, so a member that loses the cluster does not hold them.
//
// It owns the shared upstream keepalive streams and the routing of their replies; it must not renew a lease on its own,
// nor touch the other Lease RPCs.
package lease

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/etcdproxy/etcdproxy/overrides/internal/upstream"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// maxOutstanding bounds the keepalive requests of one client stream that are sent upstream and not yet answered to
// the client. A client that sends more without reading replies is held back by gRPC flow control, as by etcd.
const maxOutstanding = 64

// DefaultStreams is Options.Streams when it is 0.
const DefaultStreams = 4

// DefaultRenewTimeout is Options.RenewTimeout when it is 0: etcd's bound on a renewal (its request timeout, 5 s +
// 2 × the election timeout) with etcd's default election timeout, 1 s.
const DefaultRenewTimeout = 7 * time.Second

// Options tune the override; the zero value is the default.
type Options struct {
	// Streams bounds the upstream keepalive streams that the clients of one identity share (--lease-keepalive-streams;
	// 0: DefaultStreams). A stream is opened only when a client is put on it, so a proxy with fewer client streams
	// has fewer.
	Streams int
	// RenewTimeout bounds how long a client's keepalive request waits through the proxy for etcd's answer
	// (--lease-renew-timeout; 0: DefaultRenewTimeout). etcd ends a keepalive stream whose renewal found no leader
	// within its request timeout; the proxy, which re-sends a request whose upstream stream failed (require-leader
	// streams fail as soon as their member loses the leader), ends the client's stream the same way once the
	// request has waited this long.
	RenewTimeout time.Duration
}

// Leader is what the override needs to know of the cluster's leader (leader.Tracker).
type Leader interface {
	// HasLeader reports whether the cluster has a leader, as far as the proxy knows.
	HasLeader() bool
	// Found returns a channel that is closed when the leader is found (at once if it is present).
	Found() <-chan struct{}
	// Loss returns a context that is cancelled when the leader is lost (done already if it is lost now).
	Loss() context.Context
}

// Lease is the LeaseKeepAlive override.
type Lease struct {
	pb.LeaseServer
	// groups are the shards: shard i keeps one upstream stream per client credentials, shared by the client
	// streams put on it.
	groups []*upstream.Pool[*group]
	next   atomic.Uint64 // the shard of the next client stream, modulo len(groups)
}

// New wraps base; upstream streams are opened on cc. ld tells which error ends a request that waited too long.
func New(base pb.LeaseServer, cc grpc.ClientConnInterface, ld Leader, lg *zap.Logger, opts Options) *Lease {
	client := pb.NewLeaseClient(cc)
	n := opts.Streams
	if n <= 0 {
		n = DefaultStreams
	}
	timeout := opts.RenewTimeout
	if timeout <= 0 {
		timeout = DefaultRenewTimeout
	}
	l := &Lease{LeaseServer: base, groups: make([]*upstream.Pool[*group], n)}
	for i := range l.groups {
		l.groups[i] = upstream.NewPool(func(ctx context.Context, c upstream.Creds) *group {
			return &group{ctx: ctx, creds: c, upstream: client, leader: ld, timeout: timeout, logger: lg}
		})
	}
	return l
}

// Close ends every upstream stream and waits for them. Client streams still open then end with Unavailable.
func (l *Lease) Close() {
	for _, p := range l.groups {
		p.Close()
	}
}

// LeaseKeepAlive serves one client keepalive stream over a shared upstream stream.
func (l *Lease) LeaseKeepAlive(ss grpc.BidiStreamingServer[pb.LeaseKeepAliveRequest, pb.LeaseKeepAliveResponse]) error {
	creds := upstream.CredsOf(ss.Context())
	pool := l.groups[(l.next.Add(1)-1)%uint64(len(l.groups))]
	g, err := pool.Join(creds)
	if err != nil {
		return err
	}
	defer pool.Leave(creds)
	keepaliveClientStreams.Inc()
	defer keepaliveClientStreams.Dec()

	c := &client{
		ss:     ss,
		out:    make(chan reply, maxOutstanding),
		slots:  make(chan struct{}, maxOutstanding),
		kick:   make(chan struct{}, 1),
		failed: make(chan struct{}),
		done:   make(chan struct{}),
	}
	defer func() {
		// Under sendMu: once the handler returns, the stream is not the group's to send on.
		c.sendMu.Lock()
		close(c.done)
		c.sendMu.Unlock()
	}()
	received := make(chan error, 1)
	go func() { received <- c.receive(ss, g) }()

	halfClosed := false
	for {
		select {
		case r := <-c.out:
			if err := c.sendQueued(r); err != nil {
				return err
			}
			<-c.slots
			if halfClosed && len(c.slots) == 0 {
				return nil
			}
		case <-c.kick:
			if err := c.sendErr.Load(); err != nil {
				return *err
			}
			if halfClosed && len(c.slots) == 0 {
				return nil
			}
		case err := <-received:
			if err != nil {
				return err
			}
			halfClosed, received = true, nil
			c.halfClosed.Store(true) // before the count: a direct reply that frees the last slot after it kicks
			if len(c.slots) == 0 {
				return nil
			}
		case <-c.failed:
			// etcd answered the client's earlier requests before it refused this one, and ends its stream after the
			// replies: they are sent or in c.out already (the group routes replies in order, then the failure), so
			// they go first, as from etcd.
			for {
				select {
				case r := <-c.out:
					if err := c.sendQueued(r); err != nil {
						return err
					}
				default:
					return c.err
				}
			}
		case <-g.ctx.Done():
			return upstream.ErrClosed
		case <-ss.Context().Done():
			return ss.Context().Err()
		}
	}
}

// client is one client keepalive stream.
//
// A reply reaches the client in one of two ways. Directly: the group's goroutine that received it sends it on ss
// itself (group.deliver), when nothing else is sending to the client and none of its replies is queued; this saves
// the wake-up of the handler's goroutine, a tenth of the proxy's CPU per renewal. Or queued: through out, sent by
// the handler's goroutine (LeaseKeepAlive). Both send under sendMu, and a reply goes directly only while queued is
// 0, so replies reach the client in the order the group routes them.
type client struct {
	ss     grpc.BidiStreamingServer[pb.LeaseKeepAliveRequest, pb.LeaseKeepAliveResponse]
	sendMu sync.Mutex    // held while a reply is sent on ss; done is closed under it
	queued atomic.Int32  // replies put in out and not yet sent
	out    chan reply    // replies for the client; never full, see slots
	slots  chan struct{} // one token per outstanding request
	// kick wakes the handler after a direct reply that it may have to act on: one that failed (sendErr), or the
	// last one owed after the client half-closed (halfClosed).
	kick       chan struct{}
	sendErr    atomic.Pointer[error]
	halfClosed atomic.Bool
	slow       atomic.Bool // a direct reply took directWait: the client's replies are queued from then on
	// failed is closed by the client's group, under its mu, when etcd refused one of the client's requests, or one
	// of them waited Options.RenewTimeout unanswered; err, written before, is etcd's error (or the one etcd would
	// have returned). From then on none of the client's requests is sent: etcd would have ended
	// the stream and read nothing more from it.
	failed chan struct{}
	err    error
	done   chan struct{} // closed when the client's stream has ended
}

// ended reports whether nothing the client sent should reach etcd any more, nor any reply the client.
func (c *client) ended() bool {
	select {
	case <-c.failed:
		return true
	case <-c.done:
		return true
	default:
		return false
	}
}

type reply struct {
	resp     *pb.LeaseKeepAliveResponse
	received time.Time
}

// sendQueued sends r, taken from out, to the client.
func (c *client) sendQueued(r reply) error {
	c.sendMu.Lock()
	err := c.send(r)
	c.sendMu.Unlock()
	c.queued.Add(-1)
	return err
}

// send sends r to the client and records how long the request took through the proxy. sendMu is held.
func (c *client) send(r reply) error {
	if err := c.ss.Send(r.resp); err != nil {
		return err
	}
	keepaliveLatency.Observe(time.Since(r.received).Seconds())
	return nil
}

// request is a client's keepalive request on its way through a group.
type request struct {
	c        *client
	req      *pb.LeaseKeepAliveRequest
	received time.Time
}

// receive reads the client's requests and hands them to g until the client half-closes (nil) or fails.
func (c *client) receive(ss grpc.BidiStreamingServer[pb.LeaseKeepAliveRequest, pb.LeaseKeepAliveResponse], g *group) error {
	for {
		req, err := ss.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		select {
		case c.slots <- struct{}{}:
		case <-c.done:
			return nil
		}
		g.send(&request{c: c, req: req, received: time.Now()})
	}
}
