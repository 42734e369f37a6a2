package lease_test

import (
	"context"
	"errors"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/proxy"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// oneStream runs the proxy with every keepalive client on one shared upstream stream.
func oneStream(c *proxy.Config) { c.Overrides.Lease.Streams = 1 }

// TestKeepAliveClientNotReading: a client that keeps sending renewals and reads none of the replies fills its
// stream's flow-control window, after which a send to it blocks. Replies are sent from the goroutine that receives
// them on the shared upstream stream (group.deliver); another client on that stream must still get each of its
// replies promptly, and the stalled client's stream must end when its client goes away.
func TestKeepAliveClientNotReading(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{Proxy: oneStream})
	ctx := proxytest.Timeout(t, 90*time.Second)
	lease := pb.NewLeaseClient(e.Direct)
	stuckLease, err := lease.LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 600})
	if err != nil {
		t.Fatal(err)
	}
	goodLease, err := lease.LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 600})
	if err != nil {
		t.Fatal(err)
	}

	// The stalled client: its own connection with gRPC's smallest fixed windows (no BDP growth), so that the
	// replies it leaves unread stop the proxy's sends to it after about 128 KiB (its window, then the server
	// stream's write quota).
	const window = 64 << 10
	cc, err := grpc.NewClient(e.ProxyAddr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(window), grpc.WithInitialConnWindowSize(window))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	stuckCtx, stopStuck := context.WithCancel(ctx)
	defer stopStuck()
	stuck, err := pb.NewLeaseClient(cc).LeaseKeepAlive(stuckCtx)
	if err != nil {
		t.Fatal(err)
	}
	var sent atomic.Int64
	sending := make(chan struct{})
	go func() {
		defer close(sending)
		for range 100000 { // bounded: far more than the windows hold
			if stuck.Send(&pb.LeaseKeepAliveRequest{ID: stuckLease.ID}) != nil {
				return
			}
			sent.Add(1)
		}
	}()
	// Wait until the proxy reads no more of its requests (they stop going out): its replies are then held up.
	last, still := int64(-1), 0
	proxytest.Eventually(t, 60*time.Second, func() bool {
		n := sent.Load()
		if n == last {
			still++
		} else {
			last, still = n, 0
		}
		return still >= 5 // 5 polls in a row
	}, "the stalled client's requests never stopped going out")
	if n := sent.Load(); n < 1000 || n >= 100000 {
		t.Fatalf("the stalled client sent %d requests; its windows hold about 2,500 replies", n)
	}

	good, err := pb.NewLeaseClient(e.Via).LeaseKeepAlive(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		start := time.Now()
		if err := good.Send(&pb.LeaseKeepAliveRequest{ID: goodLease.ID}); err != nil {
			t.Fatal(err)
		}
		got := make(chan error, 1)
		go func() {
			r, err := good.Recv()
			if err == nil && (r.ID != goodLease.ID || r.TTL <= 0) {
				err = errors.New("a reply for another lease, or no TTL")
			}
			got <- err
		}()
		select {
		case err := <-got:
			if err != nil {
				t.Fatalf("renewal %d: %v", i, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("renewal %d of the reading client: no reply %v after it, while another client on its "+
				"upstream stream does not read", i, time.Since(start))
		}
	}
	if err := good.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := good.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("the reading client's stream ended with %v, want a clean end", err)
	}

	// The stalled client goes away: its stream ends at the proxy, and with it the upstream stream (goleak, at the
	// end of the package, finds any goroutine left blocked in a send to it).
	stopStuck()
	<-sending
	proxytest.Eventually(t, 10*time.Second, func() bool { return etcdKeepAliveStreams(t) == 0 },
		"the upstream keepalive stream outlived the stalled client")
}

// TestKeepAliveHalfCloseAfterBurst: a client sends a burst of renewals and half-closes at once; it gets a reply
// to each, in order, then a clean end of its stream, as from etcd. Replies sent from the upstream stream's
// goroutine (group.deliver) must wake the handler for the last one.
func TestKeepAliveHalfCloseAfterBurst(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{Proxy: oneStream})
	ctx := proxytest.Timeout(t, 60*time.Second)
	var ids []int64
	for range 5 {
		r, err := pb.NewLeaseClient(e.Direct).LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 600})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, r.ID)
	}
	for round := range 50 {
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		s, err := pb.NewLeaseClient(e.Via).LeaseKeepAlive(rctx)
		if err != nil {
			t.Fatal(err)
		}
		n := 1 + round%maxBurst
		for i := range n {
			if err := s.Send(&pb.LeaseKeepAliveRequest{ID: ids[i%len(ids)]}); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.CloseSend(); err != nil {
			t.Fatal(err)
		}
		for i := range n {
			r, err := s.Recv()
			if err != nil {
				t.Fatalf("round %d: reply %d of %d: %v", round, i+1, n, err)
			}
			if r.ID != ids[i%len(ids)] || r.TTL <= 0 {
				t.Fatalf("round %d: reply %d of %d is for lease %x TTL %d, want %x", round, i+1, n, r.ID, r.TTL,
					ids[i%len(ids)])
			}
		}
		if _, err := s.Recv(); !errors.Is(err, io.EOF) {
			t.Fatalf("round %d: after its %d replies the stream ended with %v, want a clean end", round, n, err)
		}
	}
}

// maxBurst is the largest burst TestKeepAliveHalfCloseAfterBurst sends: within the proxy's bound on a client's
// outstanding requests.
const maxBurst = 40
