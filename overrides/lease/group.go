package lease

import (
	"context"
	"errors"
	"io"
	"sync"
	"time"

	"github.com/etcdproxy/etcdproxy/overrides/internal/upstream"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// group is the clients of one identity and the upstream stream they share. Clients send on the stream
// themselves (send, serialized by sendMu); the group's Run goroutine opens the stream, receives on it and routes
// each reply (receive, deliver; a client that does not read hands the receiving to another goroutine). etcd answers the requests of a stream one by one, in order, so the reply at the head of the stream
// answers the oldest unanswered request.
type group struct {
	ctx      context.Context // cancelled when the last client leaves
	creds    upstream.Creds
	upstream pb.LeaseClient
	leader   Leader
	timeout  time.Duration // Options.RenewTimeout
	logger   *zap.Logger

	// sendMu serializes sends on the stream, so that the order of pending is the order on the wire. It is taken
	// before mu, never after.
	sendMu sync.Mutex
	// mu protects stream, pending, queued and the expiry timer.
	mu      sync.Mutex
	stream  grpc.BidiStreamingClient[pb.LeaseKeepAliveRequest, pb.LeaseKeepAliveResponse] // nil between streams
	pending []*request                                                                    // sent, unanswered, oldest first
	queued  []*request                                                                    // waiting for a stream
	// expiry fires at expiryAt (zero: not armed), the earliest moment an outstanding request has waited timeout.
	expiry   *time.Timer
	expiryAt time.Time
}

// retry bounds the wait between attempts to (re)open the upstream stream.
const (
	retryMin = 50 * time.Millisecond
	retryMax = 2 * time.Second
)

// send forwards a client's request on the current stream, or queues it for the next one. A send that fails leaves
// the request pending: the stream's failure, seen by Run, decides what becomes of it.
func (g *group) send(r *request) {
	g.sendMu.Lock()
	defer g.sendMu.Unlock()
	g.sendLocked(r)
}

// sendLocked is send with sendMu held. A request of a client whose stream has ended, or that etcd has refused a
// request of, is dropped.
func (g *group) sendLocked(r *request) {
	g.mu.Lock()
	if r.c.ended() {
		g.mu.Unlock()
		return
	}
	g.armLocked(r.received.Add(g.timeout))
	st := g.stream
	if st == nil {
		g.queued = append(g.queued, r)
		g.mu.Unlock()
		return
	}
	g.pending = append(g.pending, r)
	g.mu.Unlock()
	keepaliveRequests.Inc()
	_ = st.Send(r.req)
}

// Run keeps an upstream stream open while the group has clients.
func (g *group) Run() {
	upstream.Keep(g.ctx, upstream.Backoff{Min: retryMin, Max: retryMax}, g.serve, func(err error) {
		g.logger.Debug("lease keepalive upstream stream ended; reopening", zap.Error(err))
		if noLeader(err) {
			g.awaitLeader()
		}
	})
	// A send after this, from a client not gone yet, may arm the timer again: expire then returns at once.
	g.mu.Lock()
	if g.expiry != nil {
		g.expiry.Stop()
	}
	g.mu.Unlock()
}

// noLeaderGrace is how long a stream that its member ended for want of a leader waits for the leader tracker to
// see the loss too. The tracker's probe is a require-leader stream like the group's, ended by the same check of
// etcd when both are on the member; when it is on another member that has a leader, the loss is never seen, and the
// group reopens its stream after this grace (on the next endpoint).
const noLeaderGrace = time.Second

// awaitLeader holds the next attempt after the upstream stream ended with etcd's no-leader error: while the tracker
// sees no leader, etcd would refuse every require-leader stream (each counted by etcd as a failed LeaseKeepAlive),
// so the group waits until the leader is found. The clients' requests wait meanwhile, under their bound (expire).
func (g *group) awaitLeader() {
	grace := time.NewTimer(noLeaderGrace)
	defer grace.Stop()
	select {
	case <-g.leader.Loss().Done():
	case <-grace.C:
		return
	case <-g.ctx.Done():
		return
	}
	select {
	case <-g.leader.Found():
	case <-g.ctx.Done():
	}
}

// noLeader reports whether err is etcd's no-leader error.
func noLeader(err error) bool {
	s := status.Convert(err)
	return s.Code() == codes.Unavailable && s.Message() == rpctypes.ErrNoLeader.Error()
}

// armLocked makes the expiry timer fire at at, unless it fires earlier already. g.mu is held.
func (g *group) armLocked(at time.Time) {
	if !g.expiryAt.IsZero() && !at.Before(g.expiryAt) {
		return
	}
	g.expiryAt = at
	if g.expiry == nil {
		g.expiry = time.AfterFunc(time.Until(at), g.expire)
		return
	}
	g.expiry.Reset(time.Until(at))
}

// expire ends the stream of every client with a request that has waited g.timeout for etcd's answer (sent on a
// stream that did not answer it, or queued while no stream could be opened), as etcd ends a keepalive stream whose
// renewal it could not complete within its request timeout: with "etcdserver: no leader" if the proxy sees no
// leader, else "etcdserver: request timed out". The replies etcd sent the client before go first (see
// Lease.LeaseKeepAlive), and none of the client's later requests is sent. Then the timer is armed for the next
// request to reach its bound.
func (g *group) expire() {
	err := rpctypes.ErrGRPCTimeout
	if !g.leader.HasLeader() {
		err = rpctypes.ErrGRPCNoLeader
	}
	now := time.Now()
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.ctx.Err() != nil {
		return
	}
	g.expiryAt = time.Time{}
	var next time.Time
	for _, list := range [][]*request{g.pending, g.queued} {
		for _, r := range list {
			if r.c.ended() {
				continue
			}
			at := r.received.Add(g.timeout)
			if !at.After(now) {
				r.c.err = err
				close(r.c.failed)
				keepaliveExpired.Inc()
			} else if next.IsZero() || at.Before(next) {
				next = at
			}
		}
	}
	// A pending request of an ended client stays until etcd answers it (its reply goes nowhere): the order of
	// pending is the stream's. A queued one is dropped now.
	kept := g.queued[:0]
	for _, r := range g.queued {
		if !r.c.ended() {
			kept = append(kept, r)
		}
	}
	clear(g.queued[len(kept):])
	g.queued = kept
	if !next.IsZero() {
		g.armLocked(next)
	}
}

// serve opens one upstream stream, sends the queued requests on it, and routes its replies until it fails. It
// reports whether the stream answered anything (then the next attempt needs no backoff).
func (g *group) serve() (bool, error) {
	ctx, cancel := context.WithCancel(g.ctx)
	defer cancel()
	stream, err := g.upstream.LeaseKeepAlive(g.creds.Outgoing(ctx, true))
	if err != nil {
		return false, err
	}
	keepaliveUpstreamStreams.Inc()
	defer keepaliveUpstreamStreams.Dec()

	// The queued requests go first, before sendMu is let go: a client's later request must not overtake its
	// earlier ones (etcd answers a client's requests in the order it sent them).
	g.sendMu.Lock()
	g.mu.Lock()
	g.stream = stream
	queued := g.queued
	g.queued = nil
	g.mu.Unlock()
	for _, r := range queued {
		g.sendLocked(r)
	}
	g.sendMu.Unlock()

	results := make(chan received, 1)
	g.receive(stream, false, results)
	res := <-results
	answered, err := res.answered, res.err

	g.sendMu.Lock()
	g.mu.Lock()
	g.stream = nil
	pending := g.pending
	g.pending = nil
	g.queued = append(pending, g.queued...)
	g.mu.Unlock()
	g.sendMu.Unlock()
	g.recover(err)
	return answered, err
}

// received is how an upstream stream ended: whether it answered anything, and its error.
type received struct {
	answered bool
	err      error
}

// directWait bounds how long the goroutine receiving on an upstream stream may spend sending one reply to its
// client (deliver) before another goroutine takes over the receiving: a send blocks only when the client does not
// read (gRPC's flow control), and the other clients of the stream must not wait for that client.
const directWait = 20 * time.Millisecond

// receive routes the replies of stream to the clients that asked, until the stream fails; then it puts how the
// stream ended in results. A goroutine that gives the receiving up to another (deliver) returns without a result:
// one goroutine at a time receives on the stream, and the last one reports.
func (g *group) receive(stream grpc.BidiStreamingClient[pb.LeaseKeepAliveRequest, pb.LeaseKeepAliveResponse],
	answered bool, results chan<- received) {
	var watchdog *time.Timer // this goroutine's; fires when one of its sends has taken directWait
	defer func() {
		if watchdog != nil {
			watchdog.Stop()
		}
	}()
	for {
		resp, err := stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = status.Error(codes.Unavailable, "etcdproxy: upstream lease keepalive stream ended")
			}
			results <- received{answered, err}
			return
		}
		answered = true
		g.mu.Lock()
		var r *request
		if len(g.pending) > 0 {
			r, g.pending = g.pending[0], g.pending[1:]
		}
		g.mu.Unlock()
		if r == nil || r.req.ID != resp.ID {
			// etcd answers in order; anything else is a broken invariant. Reset the stream rather than misroute.
			g.logger.Error("lease keepalive reply does not match the oldest request; resetting the upstream stream",
				zap.Int64("reply-id", resp.ID))
			if r != nil {
				g.mu.Lock()
				g.pending = append([]*request{r}, g.pending...)
				g.mu.Unlock()
			}
			results <- received{answered, status.Error(codes.Internal, "etcdproxy: lease keepalive replies out of order")}
			return
		}
		if watchdog == nil {
			watchdog = time.AfterFunc(time.Hour, func() { g.receive(stream, true, results) })
			watchdog.Stop()
		}
		if !g.deliver(r.c, reply{resp: resp, received: r.received}, watchdog) {
			return // another goroutine receives now
		}
	}
}

// deliver gives the client its reply: directly, when nothing else is sending to it and none of its replies is
// queued; else through its queue. A direct send that takes directWait (the client is not reading) starts another
// goroutine receiving on the stream (watchdog's function); deliver then reports false, and its goroutine, once the
// send returns, receives no more. That client's replies are queued from then on, so that it holds up the others
// once at most.
func (g *group) deliver(c *client, r reply, watchdog *time.Timer) (receiving bool) {
	if !c.sendMu.TryLock() {
		g.enqueue(c, r)
		return true
	}
	if c.queued.Load() != 0 || c.slow.Load() || c.ended() || c.sendErr.Load() != nil {
		c.sendMu.Unlock()
		g.enqueue(c, r)
		return true
	}
	watchdog.Reset(directWait)
	err := c.send(r)
	receiving = watchdog.Stop()
	if !receiving {
		c.slow.Store(true) // its replies are queued from now on: no other wait for it
	}
	c.sendMu.Unlock()
	if err != nil {
		c.sendErr.Store(&err)
	}
	<-c.slots
	if err != nil || c.halfClosed.Load() {
		select {
		case c.kick <- struct{}{}:
		default:
		}
	}
	return receiving
}

// enqueue puts r in the client's queue, for its handler to send, unless the client's stream has ended.
func (g *group) enqueue(c *client, r reply) {
	c.queued.Add(1)
	select {
	case c.out <- r:
	case <-c.done:
		c.queued.Add(-1)
	}
}

// recover decides, after the upstream stream failed with err, what becomes of the requests it left unanswered
// (now at the head of queued). An error that etcd returned for a request (permission denied, invalid token, ...)
// belongs to the oldest of them: its client's stream ends with it, after the replies etcd sent before it, and no
// other request of that client is sent (etcd would have read nothing more from the stream). A failure of the
// stream itself belongs to nobody: every unanswered request is re-sent on the next stream.
func (g *group) recover(err error) {
	if streamFailure(err) {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.queued) == 0 {
		return
	}
	c := g.queued[0].c
	if c.ended() {
		// The client's stream has ended: nobody waits for the error.
		g.queued = g.queued[1:]
		return
	}
	c.err = err
	close(c.failed)
	kept := g.queued[:0]
	for _, r := range g.queued {
		if r.c != c {
			kept = append(kept, r)
		}
	}
	clear(g.queued[len(kept):])
	g.queued = kept
}

// streamFailure reports whether err ended the stream for a reason of its own rather than because of one request.
func streamFailure(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.Canceled, codes.DeadlineExceeded, codes.Internal:
		return true
	}
	return false
}
