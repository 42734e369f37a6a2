package fuzz_test

// FuzzLeaseKeepAlive sends a sequence of keepalive requests built from fuzz bytes on one LeaseKeepAlive stream
// through the proxy and on one straight to etcd (the same cluster), reading the replies after some requests and at
// the end, then half-closes both streams: the replies must be etcd's, in order (TTL 0 for a lease that does not
// exist), and the streams must end alike.

import (
	"context"
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
)

const (
	// maxKeepAlives bounds the requests of one input: past 64 unanswered ones the proxy stops reading a stream.
	maxKeepAlives = 100
	// Leases of FuzzLeaseKeepAlive's cluster: two granted for longer than any run, one revoked.
	kaLive, kaLive2, kaRevoked = 0x3001, 0x3002, 0x3003
)

func startKeepAliveEnv(tb testing.TB) *fuzzEnv {
	tb.Helper()
	e := startEnv(tb)
	ctx := proxytest.Timeout(tb, 30*time.Second)
	lc := pb.NewLeaseClient(e.Direct)
	for id, ttl := range map[int64]int64{kaLive: 3600, kaLive2: 7200, kaRevoked: 3600} {
		if _, err := lc.LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: id, TTL: ttl}); err != nil {
			tb.Fatal(err)
		}
	}
	if _, err := lc.LeaseRevoke(ctx, &pb.LeaseRevokeRequest{ID: kaRevoked}); err != nil {
		tb.Fatal(err)
	}
	return e
}

// FuzzLeaseKeepAlive: every keepalive request gets etcd's reply through the proxy, in etcd's order, and after a
// half-close both streams end with the same status once every request is answered; the proxy never panics and
// answers within stepTimeout.
func FuzzLeaseKeepAlive(f *testing.F) {
	e := startKeepAliveEnv(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		ctx, cancel := context.WithCancel(context.Background())
		k := &keepAliveRun{viaProxy: openKeepAlive(ctx, t, e.Via), direct: openKeepAlive(ctx, t, e.Direct)}
		defer func() {
			cancel()
			<-k.viaProxy.done
			<-k.direct.done
		}()
		k.run(t, &script{b: b})
		e.checkNoPanic(t)
	})
}

// keepAliveSide is one LeaseKeepAlive stream and its replies.
type keepAliveSide struct {
	stream pb.Lease_LeaseKeepAliveClient
	in     chan received[*pb.LeaseKeepAliveResponse]
	done   <-chan struct{}
}

func openKeepAlive(ctx context.Context, t *testing.T, cc *grpc.ClientConn) *keepAliveSide {
	t.Helper()
	stream, err := pb.NewLeaseClient(cc).LeaseKeepAlive(ctx)
	if err != nil {
		t.Fatalf("opening a keepalive stream: %v", err)
	}
	s := &keepAliveSide{stream: stream, in: make(chan received[*pb.LeaseKeepAliveResponse], maxKeepAlives+1)}
	s.done = recvLoop(ctx, stream.Recv, func(*pb.LeaseKeepAliveResponse) bool { return true }, s.in)
	return s
}

// keepAliveRun is the state of one input: the ids sent so far (for failure messages), how many are unanswered.
type keepAliveRun struct {
	viaProxy, direct *keepAliveSide
	sent             []int64
	pending          int
}

// run sends the requests of s, each byte an id (a lease that exists, the revoked one, 0, -1, the extremes, any)
// and, with bit 3 set, a read of every reply owed so far; then it half-closes both streams and reads the rest.
func (k *keepAliveRun) run(t *testing.T, s *script) {
	t.Helper()
	for i := 0; i < maxKeepAlives && s.more(); i++ {
		op := s.byte()
		id := [...]int64{kaLive, kaLive2, kaRevoked, 0, -1, math.MinInt64, math.MaxInt64}[min(op%8, 6)]
		if op%8 == 7 {
			id = s.int64()
		}
		k.sent = append(k.sent, id)
		for _, side := range []*keepAliveSide{k.viaProxy, k.direct} {
			_ = side.stream.Send(&pb.LeaseKeepAliveRequest{ID: id}) // a stream that ended: its end is compared below
		}
		k.pending++
		if op&8 != 0 && !k.receive(t) {
			return
		}
	}
	for _, side := range []*keepAliveSide{k.viaProxy, k.direct} {
		if err := side.stream.CloseSend(); err != nil {
			t.Fatalf("half-closing a keepalive stream: %v", err)
		}
	}
	if k.receive(t) {
		k.end(t)
	}
}

// receive reads the replies owed on both streams and fails t if they differ; it reports whether both streams are
// open.
func (k *keepAliveRun) receive(t *testing.T) bool {
	t.Helper()
	for ; k.pending > 0; k.pending-- {
		d, ok := next(k.direct.in)
		if !ok {
			t.Fatalf("etcd did not answer keepalive %d of %v within %v", len(k.sent)-k.pending, k.sent, stepTimeout)
		}
		p, ok := next(k.viaProxy.in)
		if !ok {
			t.Fatalf("the proxy hung: no reply to keepalive %d of %v within %v, where etcd answered %v",
				len(k.sent)-k.pending, k.sent, stepTimeout, d.msg)
		}
		if diff := sameStatus(p.err, d.err); diff != "" {
			t.Fatalf("keepalive %d of %v: %s", len(k.sent)-k.pending, k.sent, diff)
		}
		if d.err != nil {
			return false
		}
		if diff := cmpMessages(asMessages([]*pb.LeaseKeepAliveResponse{p.msg}), asMessages([]*pb.LeaseKeepAliveResponse{d.msg})); diff != "" {
			t.Fatalf("keepalive %d of %v: replies differ (-proxy +etcd):\n%s", len(k.sent)-k.pending, k.sent, diff)
		}
	}
	return true
}

// end waits for both streams to end after the half-close, and compares how: etcd ends its stream once it has read
// the half-close, every request answered.
func (k *keepAliveRun) end(t *testing.T) {
	t.Helper()
	what := func(r received[*pb.LeaseKeepAliveResponse], ok bool) string {
		switch {
		case !ok:
			return fmt.Sprintf("no end within %v", stepTimeout)
		case r.err == nil:
			return fmt.Sprintf("a reply to no request: %v", r.msg)
		}
		return ""
	}
	d, dok := next(k.direct.in)
	if w := what(d, dok); w != "" {
		t.Fatalf("etcd's stream after a half-close, after %v: %s", k.sent, w)
	}
	p, pok := next(k.viaProxy.in)
	if w := what(p, pok); w != "" {
		t.Fatalf("the proxy's stream after a half-close, after %v: %s (etcd's ended: %v)", k.sent, w, d.err)
	}
	if diff := sameStatus(p.err, d.err); diff != "" {
		t.Fatalf("the streams ended differently after %v: %s", k.sent, diff)
	}
}
