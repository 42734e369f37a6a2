package lease

import (
	"context"
	"errors"
	"io"
	"sync"
	"time"

	"github.com/etcdproxy/etcdproxy/overrides/internal/shared"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// group is the clients of one identity and the upstream stream they share. Its run goroutine owns the stream's
// send side; a receiver goroutine per stream owns its receive side. etcd answers the requests of a stream one by
// one, in order, so the reply at the head of the stream answers the oldest unanswered request.
type group struct {
	ctx      context.Context // cancelled when the last client leaves
	creds    shared.Creds
	upstream pb.LeaseClient
	logger   *zap.Logger
	submit   chan *request

	// mu protects pending.
	mu      sync.Mutex
	pending []*request // sent upstream, unanswered, oldest first
}

// retry bounds the wait between attempts to (re)open the upstream stream.
const (
	retryMin = 50 * time.Millisecond
	retryMax = 2 * time.Second
)

// Run keeps an upstream stream open while the group has clients, and sends their requests on it.
func (g *group) Run() {
	var resend []*request
	backoff := retryMin
	for g.ctx.Err() == nil {
		var err error
		resend, err = g.serve(resend)
		if g.ctx.Err() != nil {
			return
		}
		if err == nil {
			backoff = retryMin
			continue
		}
		g.logger.Debug("lease keepalive upstream stream ended; reopening", zap.Error(err))
		select {
		case <-g.ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, retryMax)
	}
}

// serve opens one upstream stream, re-sends the requests in resend, then forwards new requests until the stream
// fails. It returns the requests to re-send on the next stream and the failure; a nil error means the stream
// served at least one reply (so the next attempt needs no backoff).
func (g *group) serve(resend []*request) ([]*request, error) {
	ctx, cancel := context.WithCancel(g.ctx)
	defer cancel()
	md := g.creds.MD()
	md.Set(rpctypes.MetadataRequireLeaderKey, rpctypes.MetadataHasLeader)
	stream, err := g.upstream.LeaseKeepAlive(metadata.NewOutgoingContext(ctx, md))
	if err != nil {
		return resend, err
	}
	keepaliveUpstreamStreams.Inc()
	defer keepaliveUpstreamStreams.Dec()

	failed := make(chan error, 1)
	answered := make(chan struct{})
	go func() { failed <- g.receive(stream, answered) }()

	send := func(r *request) error {
		select {
		case <-r.c.done:
			return nil // the client is gone: nobody waits for this reply
		default:
		}
		g.mu.Lock()
		g.pending = append(g.pending, r)
		g.mu.Unlock()
		keepaliveRequests.Inc()
		return stream.Send(r.req)
	}
	for _, r := range resend {
		if err := send(r); err != nil {
			break // the receiver reports the stream's status
		}
	}
	for {
		select {
		case r := <-g.submit:
			if err := send(r); err != nil {
				// The receiver reports the stream's status; wait for it.
				return g.recover(<-failed, answered)
			}
		case err := <-failed:
			return g.recover(err, answered)
		case <-g.ctx.Done():
			return nil, g.ctx.Err()
		}
	}
}

// receive routes the replies of stream to the clients that asked, until the stream fails.
func (g *group) receive(stream grpc.BidiStreamingClient[pb.LeaseKeepAliveRequest, pb.LeaseKeepAliveResponse], answered chan struct{}) error {
	once := sync.OnceFunc(func() { close(answered) })
	for {
		resp, err := stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = status.Error(codes.Unavailable, "etcdproxy: upstream lease keepalive stream ended")
			}
			return err
		}
		once()
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
			return status.Error(codes.Internal, "etcdproxy: lease keepalive replies out of order")
		}
		select {
		case r.c.out <- reply{resp: resp, received: r.received}:
		case <-r.c.done:
		}
	}
}

// recover decides, after the upstream stream failed with err, which requests to re-send. An error that etcd
// returned for a request (permission denied, invalid token, ...) belongs to the oldest unanswered request: its
// client's stream ends with it. A failure of the stream itself belongs to nobody: every unanswered request is
// re-sent on the next stream.
func (g *group) recover(err error, answered chan struct{}) ([]*request, error) {
	g.mu.Lock()
	pending := g.pending
	g.pending = nil
	g.mu.Unlock()
	if !streamFailure(err) && len(pending) > 0 {
		select {
		case pending[0].c.fail <- err:
		default:
		}
		pending = pending[1:]
	}
	select {
	case <-answered:
		return pending, nil
	default:
		return pending, err
	}
}

// streamFailure reports whether err ended the stream for a reason of its own rather than because of one request.
func streamFailure(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.Canceled, codes.DeadlineExceeded, codes.Internal:
		return true
	}
	return false
}
