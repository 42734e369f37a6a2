package lease_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"syscall"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/embedetcd"
	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/overrides/lease"
	"github.com/etcdproxy/etcdproxy/proxy"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/server/v3/embed"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestMain(m *testing.M) { proxytest.VerifyTestMain(m) }

// etcdKeepAliveStreams is the number of LeaseKeepAlive streams open on etcd (gRPC's server metrics, which the
// in-process members register).
func etcdKeepAliveStreams(t *testing.T) float64 {
	labels := []string{"grpc_service", "etcdserverpb.Lease", "grpc_method", "LeaseKeepAlive"}
	return proxytest.Gauge(t, "grpc_server_started_total", labels...) - proxytest.Gauge(t, "grpc_server_handled_total", labels...)
}

// TestKeepAliveShared: leases kept alive over many client streams share a few upstream streams (at most
// --lease-keepalive-streams, each opened only once a client stream is put on it), and every request gets its own
// prompt reply with etcd's TTL (etcd's grpc-proxy answers only at its next refresh, up to TTL/3 later). When the
// last client leaves, no upstream stream is left.
func TestKeepAliveShared(t *testing.T) {
	for _, tc := range []struct {
		name                string
		option              int // lease.Options.Streams
		streams, perStream  int // client streams, and leases on each
		wantUpstreamStreams float64
	}{
		{"default: 1000 leases over 10 client streams", 0, 10, 100, lease.DefaultStreams},
		{"one shared stream", 1, 10, 10, 1},
		{"fewer client streams than allowed", 16, 3, 10, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := proxytest.Start(t, proxytest.Options{Proxy: func(c *proxy.Config) { c.Overrides.Lease.Streams = tc.option }})
			keepAliveShared(t, e, tc.streams, tc.perStream, tc.wantUpstreamStreams)
		})
	}
}

func keepAliveShared(t *testing.T, e *proxytest.Env, streams, perStream int, wantUpstream float64) {
	ctx := proxytest.Timeout(t, 60*time.Second)
	const ttl = 60
	var ids []int64
	for i := 0; i < streams*perStream; i++ {
		r, err := pb.NewLeaseClient(e.Direct).LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: ttl})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, r.ID)
	}
	base := etcdKeepAliveStreams(t)
	errs := make(chan error, streams)
	kas := make([]pb.Lease_LeaseKeepAliveClient, streams)
	for s := 0; s < streams; s++ {
		ka, err := pb.NewLeaseClient(e.Via).LeaseKeepAlive(ctx)
		if err != nil {
			t.Fatal(err)
		}
		kas[s] = ka
		go func() {
			// Send one request and wait for its reply, lease after lease: each reply must come without the
			// client sending anything more. A 5s bound per reply is far under etcd's grpc-proxy's TTL/3 (20s).
			for _, id := range ids[s*perStream : (s+1)*perStream] {
				if err := ka.Send(&pb.LeaseKeepAliveRequest{ID: id}); err != nil {
					errs <- err
					return
				}
				got := make(chan error, 1)
				go func() {
					r, err := ka.Recv()
					if err == nil && (r.ID != id || r.TTL != ttl) {
						err = fmt.Errorf("reply %d TTL %d for lease %d, want TTL %d", r.ID, r.TTL, id, ttl)
					}
					got <- err
				}()
				select {
				case err := <-got:
					if err != nil {
						errs <- err
						return
					}
				case <-time.After(5 * time.Second):
					errs <- fmt.Errorf("no reply for lease %d within 5s", id)
					return
				}
			}
			errs <- nil
		}()
	}
	for s := 0; s < streams; s++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if got := etcdKeepAliveStreams(t) - base; got != wantUpstream {
		t.Errorf("etcd has %v keepalive streams for %d client streams, want %v", got, streams, wantUpstream)
	}
	for _, ka := range kas {
		if err := ka.CloseSend(); err != nil {
			t.Fatal(err)
		}
		if _, err := ka.Recv(); !errors.Is(err, io.EOF) {
			t.Errorf("after half-close with nothing outstanding the stream ended with %v, want a clean end", err)
		}
	}
	proxytest.Eventually(t, 5*time.Second, func() bool { return etcdKeepAliveStreams(t) == base },
		"an upstream keepalive stream outlived its last client")
}

// TestExpiryAfterLastHeartbeat: the proxy never renews a lease on its own, so it expires no later than its TTL
// after the last heartbeat a client sent (etcd's grpc-proxy: a 4s lease lived 7.5s after the last heartbeat).
func TestExpiryAfterLastHeartbeat(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 30*time.Second)
	const ttl = 3
	lease, err := pb.NewLeaseClient(e.Direct).LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	ka, err := pb.NewLeaseClient(e.Via).LeaseKeepAlive(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var last time.Time
	for i := 0; i < 3; i++ {
		last = time.Now()
		if err := ka.Send(&pb.LeaseKeepAliveRequest{ID: lease.ID}); err != nil {
			t.Fatal(err)
		}
		if _, err := ka.Recv(); err != nil {
			t.Fatal(err)
		}
	}
	// The client keeps its stream open but sends nothing more.
	proxytest.Eventually(t, 10*time.Second, func() bool {
		r, err := pb.NewLeaseClient(e.Direct).LeaseTimeToLive(ctx, &pb.LeaseTimeToLiveRequest{ID: lease.ID})
		return err == nil && r.TTL == -1
	}, "the lease never expired")
	lived := time.Since(last)
	// etcd revokes expired leases on a 500ms tick, through raft: allow 1.5s past the TTL.
	if limit := ttl*time.Second + 1500*time.Millisecond; lived > limit {
		t.Errorf("the lease lived %v after the last heartbeat, want at most %v", lived, limit)
	}
	t.Logf("a %ds lease expired %v after the last heartbeat", ttl, lived.Round(10*time.Millisecond))

	// A keepalive for the expired lease answers as etcd does.
	direct, err := pb.NewLeaseClient(e.Direct).LeaseKeepAlive(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []pb.Lease_LeaseKeepAliveClient{direct, ka} {
		if err := s.Send(&pb.LeaseKeepAliveRequest{ID: lease.ID}); err != nil {
			t.Fatal(err)
		}
	}
	d, err1 := direct.Recv()
	v, err2 := ka.Recv()
	if err1 != nil || err2 != nil || d.TTL != v.TTL || d.ID != v.ID || d.TTL > 0 {
		t.Errorf("keepalive of an expired lease: direct %v %v, proxy %v %v", d, err1, v, err2)
	}

	// Revoked while kept alive: the next keepalive answers as etcd does, and the stream stays open.
	live, err := pb.NewLeaseClient(e.Via).LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	if err := ka.Send(&pb.LeaseKeepAliveRequest{ID: live.ID}); err != nil {
		t.Fatal(err)
	}
	if r, err := ka.Recv(); err != nil || r.TTL != 60 {
		t.Fatalf("keepalive of a live lease: %v, %v", r, err)
	}
	if _, err := pb.NewLeaseClient(e.Direct).LeaseRevoke(ctx, &pb.LeaseRevokeRequest{ID: live.ID}); err != nil {
		t.Fatal(err)
	}
	for _, s := range []pb.Lease_LeaseKeepAliveClient{direct, ka} {
		if err := s.Send(&pb.LeaseKeepAliveRequest{ID: live.ID}); err != nil {
			t.Fatal(err)
		}
	}
	d, err1 = direct.Recv()
	v, err2 = ka.Recv()
	if err1 != nil || err2 != nil || d.TTL != v.TTL || d.ID != v.ID || d.TTL > 0 {
		t.Errorf("keepalive of a revoked lease: direct %v %v, proxy %v %v", d, err1, v, err2)
	}
}

// TestKeepAliveErrorStatus: when etcd refuses a renewal (here: a user without write permission on the lease's
// key), the client's stream ends with etcd's own status, not Canceled; other clients are not affected.
func TestKeepAliveErrorStatus(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 30*time.Second)
	proxytest.EnableAuth(t, ctx, e.Direct, "r", proxytest.User{Name: "bob", Password: "b", ReadFrom: "x"})
	must := func(_ any, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	token := func(cc *grpc.ClientConn, user, pw string) context.Context { return proxytest.As(t, ctx, cc, user, pw) }
	root := token(e.Direct, "root", "r")
	lease, err := pb.NewLeaseClient(e.Direct).LeaseGrant(root, &pb.LeaseGrantRequest{TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	must(pb.NewKVClient(e.Direct).Put(root, &pb.PutRequest{Key: []byte("x"), Value: []byte("v"), Lease: lease.ID}))

	renew := func(cctx context.Context, cc *grpc.ClientConn) error {
		s, err := pb.NewLeaseClient(cc).LeaseKeepAlive(cctx)
		if err != nil {
			return err
		}
		if err := s.Send(&pb.LeaseKeepAliveRequest{ID: lease.ID}); err != nil {
			return err
		}
		_, err = s.Recv()
		return err
	}
	rootVia := token(e.Via, "root", "r")
	if err := renew(rootVia, e.Via); err != nil {
		t.Fatalf("root renews through the proxy: %v", err)
	}
	direct, via := renew(token(e.Direct, "bob", "b"), e.Direct), renew(token(e.Via, "bob", "b"), e.Via)
	if direct == nil || status.Code(direct) != status.Code(via) || status.Convert(direct).Message() != status.Convert(via).Message() {
		t.Errorf("bob renews:\n  direct: %v\n  proxy:  %v", direct, via)
	}
	if err := renew(rootVia, e.Via); err != nil {
		t.Errorf("root renews after bob's refusal: %v", err)
	}
}

// TestLeaseGrantStorm: with etcd down, clients that loop on LeaseGrant with a 2s deadline make one attempt per
// deadline through the proxy, not thousands per second, and the proxy stays idle (fail slow).
func TestLeaseGrantStorm(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	cli := proxytest.Client(t, e.ProxyAddr)
	e.Cluster.Close()
	const window, deadline = 10 * time.Second, 2 * time.Second
	type result struct {
		name     string
		attempts int
		lastErr  error
	}
	results := make(chan result, 2)
	loop := func(name string, grant func(context.Context) error) {
		r := result{name: name}
		end := time.Now().Add(window)
		for time.Now().Before(end) && r.attempts < 10000 {
			ctx, cancel := context.WithTimeout(context.Background(), deadline)
			r.lastErr = grant(ctx)
			cancel()
			r.attempts++
		}
		results <- r
	}
	before := cpuTime(t)
	go loop("clientv3", func(ctx context.Context) error { _, err := cli.Grant(ctx, 10); return err })
	go loop("raw gRPC", func(ctx context.Context) error {
		_, err := pb.NewLeaseClient(e.Via).LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 10})
		return err
	})
	for i := 0; i < 2; i++ {
		r := <-results
		// One attempt per deadline, plus the one that straddles the window's end.
		if max := int(window/deadline) + 1; r.attempts > max {
			t.Errorf("%s: %d LeaseGrant attempts in %v with a %v deadline, want at most %d (last error %v)",
				r.name, r.attempts, window, deadline, max, r.lastErr)
		}
		if status.Code(r.lastErr) != codes.DeadlineExceeded && !errors.Is(r.lastErr, context.DeadlineExceeded) {
			t.Errorf("%s: LeaseGrant with etcd down ended with %v, want the deadline", r.name, r.lastErr)
		}
		t.Logf("%s: %d attempts in %v", r.name, r.attempts, window)
	}
	used := cpuTime(t) - before
	t.Logf("process CPU during the %v window: %v", window, used)
	// Clients, proxy and the race detector share this process; spinning would use the whole window or more.
	if used > window/5 {
		t.Errorf("the process used %v of CPU in a %v window with etcd down: something spins", used, window)
	}
}

func cpuTime(t *testing.T) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// TestKeepAliveSurvivesMemberRestarts: when the member holding the shared upstream stream goes away, the proxy
// reopens it elsewhere and re-sends what was unanswered: the client's stream stays open and every request gets
// its reply.
func TestKeepAliveSurvivesMemberRestarts(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{Members: 3})
	ctx := proxytest.Timeout(t, 90*time.Second)
	lease, err := pb.NewLeaseClient(e.Via).LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	ka, err := pb.NewLeaseClient(e.Via).LeaseKeepAlive(ctx)
	if err != nil {
		t.Fatal(err)
	}
	replies := make(chan error, 1000)
	go func() {
		for {
			r, err := ka.Recv()
			if err == nil && (r.ID != lease.ID || r.TTL <= 0) {
				err = fmt.Errorf("reply %v", r)
			}
			replies <- err
			if err != nil {
				return
			}
		}
	}()
	sent := 0
	renew := func() {
		t.Helper()
		if err := ka.Send(&pb.LeaseKeepAliveRequest{ID: lease.ID}); err != nil {
			t.Fatal(err)
		}
		sent++
	}
	for _, m := range e.Cluster.Members[:2] {
		renew()
		m.Stop()
		renew()
		if err := m.Restart(30 * time.Second); err != nil {
			t.Fatal(err)
		}
		renew()
	}
	for i := 0; i < sent; i++ {
		select {
		case err := <-replies:
			if err != nil {
				t.Fatalf("reply %d of %d: %v", i+1, sent, err)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("reply %d of %d did not come", i+1, sent)
		}
	}
}

// TestKeepAliveNoLeader: a renewal sent while the proxy's member has no leader waits as on etcd, and the client's
// stream then ends with etcd's error ("etcdserver: no leader"), not held open forever while the proxy re-sends the
// request on require-leader streams that the member refuses. The same renewal sent straight to the member is the
// reference, code and message; the proxy's bound is set to etcd's own (its request timeout, 5 s + 2 elections).
// Meanwhile the proxy does not keep opening upstream streams that the member refuses.
func TestKeepAliveNoLeader(t *testing.T) {
	const electionMs = 300
	bound := 5*time.Second + 2*electionMs*time.Millisecond
	e := proxytest.Start(t, proxytest.Options{
		Members:   3,
		Configure: func(c *embed.Config) { c.TickMs = 30; c.ElectionMs = electionMs },
		Upstream:  func(c *embedetcd.Cluster) []string { return c.Endpoints()[:1] },
		Proxy:     func(c *proxy.Config) { c.Overrides.Lease.RenewTimeout = bound },
	})
	ctx := proxytest.Timeout(t, 60*time.Second)
	lease, err := pb.NewLeaseClient(e.Direct).LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	open := func(cc *grpc.ClientConn) grpc.BidiStreamingClient[pb.LeaseKeepAliveRequest, pb.LeaseKeepAliveResponse] {
		t.Helper()
		s, err := pb.NewLeaseClient(cc).LeaseKeepAlive(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Send(&pb.LeaseKeepAliveRequest{ID: lease.ID}); err != nil {
			t.Fatal(err)
		}
		if r, err := s.Recv(); err != nil || r.TTL <= 0 {
			t.Fatalf("renewal with a leader: %v, %v", r, err)
		}
		return s
	}
	direct, via := open(e.Direct), open(e.Via)
	refused := func() float64 {
		return proxytest.Gauge(t, "grpc_server_handled_total", "grpc_service", "etcdserverpb.Lease",
			"grpc_method", "LeaseKeepAlive", "grpc_code", "Unavailable")
	}
	refusedBefore := refused()

	for _, m := range e.Cluster.Members[1:] {
		m.Stop()
	}
	// Renew once the member knows it has no leader (had it been the leader, it would have answered "not primary"
	// until it stepped down).
	proxytest.Eventually(t, 20*time.Second, func() bool {
		s, err := pb.NewMaintenanceClient(e.Direct).Status(ctx, &pb.StatusRequest{})
		return err == nil && s.Leader == 0
	}, "the remaining member still saw a leader 20s after the others stopped")
	renew := func(s grpc.BidiStreamingClient[pb.LeaseKeepAliveRequest, pb.LeaseKeepAliveResponse]) <-chan error {
		sent := time.Now()
		if err := s.Send(&pb.LeaseKeepAliveRequest{ID: lease.ID}); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			r, err := s.Recv()
			if err == nil {
				err = fmt.Errorf("reply %v", r)
			} else if waited := time.Since(sent); waited < bound {
				err = fmt.Errorf("%w, after %v only (bound %v)", err, waited, bound)
			}
			done <- err
		}()
		return done
	}
	directDone, viaDone := renew(direct), renew(via)
	wait := func(name string, done <-chan error) error {
		select {
		case err := <-done:
			return err
		case <-time.After(bound + 10*time.Second):
			t.Fatalf("%s: no answer %v after the renewal", name, bound+10*time.Second)
			return nil
		}
	}
	want, got := wait("direct", directDone), wait("proxy", viaDone)
	if status.Code(want) != codes.Unavailable || status.Convert(want).Message() != "etcdserver: no leader" {
		t.Fatalf("etcd itself answered %v; the test expects its no-leader error", want)
	}
	if status.Code(got) != status.Code(want) || status.Convert(got).Message() != status.Convert(want).Message() {
		t.Errorf("renewal without a leader:\n  direct: %v\n  proxy:  %v", want, got)
	}
	// etcd ended two LeaseKeepAlive streams for want of a leader: the direct client's and the proxy's upstream one.
	// The proxy does not try again until it sees a leader (a stream every backoff step would be about 8 here); one
	// more is allowed for a stream opened just before the proxy's tracker saw the loss.
	if n := refused() - refusedBefore; n > 3 {
		t.Errorf("etcd ended %v LeaseKeepAlive streams with Unavailable while it had no leader; want at most 3", n)
	}

	// With a leader again, a new client stream renews through the proxy (nothing of the ended one is left queued).
	if err := e.Cluster.Members[1].Restart(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	proxytest.Eventually(t, 20*time.Second, e.Proxy.HasLeader, "the proxy saw no leader 20s after a member restarted")
	open(e.Via)
}
