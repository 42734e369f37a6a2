package leader_test

import (
	"context"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/embedetcd"
	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/overrides/leader"
	"github.com/etcdproxy/etcdproxy/proxy"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/server/v3/embed"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

func TestMain(m *testing.M) { proxytest.VerifyTestMain(m) }

// Short elections keep the test quick: etcd ends require-leader streams after 3 election timeouts without a
// leader, checked once per election timeout.
const electionMs = 300

// lossBound is how soon after the surviving member loses quorum the proxy must end require-leader streams:
// check-quorum (1 election timeout) + etcd's monitor (3 to 4 timeouts) + the proxy's reaction, with room for a
// loaded 2-core machine running the race detector.
const lossBound = 10*electionMs*time.Millisecond + 3*time.Second

func isNoLeader(err error) bool {
	st := status.Convert(err)
	want := status.Convert(rpctypes.ErrGRPCNoLeader)
	return st.Code() == want.Code() && st.Message() == want.Message()
}

// TestLeaderLoss: 3 members, the proxy talks to m0 only. Stopping m1 and m2 leaves m0 without a leader:
// require-leader streams through the proxy end with etcd's no-leader error, new ones are refused, plain streams
// stay open. After the others return, one successful Put marks the leader present at once, without waiting for
// the probe's retry (set to a minute here).
func TestLeaderLoss(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{
		Members:   3,
		Configure: func(c *embed.Config) { c.TickMs = 30; c.ElectionMs = electionMs },
		Upstream:  func(c *embedetcd.Cluster) []string { return c.Endpoints()[:1] },
		Proxy: func(c *proxy.Config) {
			c.Overrides.Leader = leader.Options{RetryMin: time.Minute, RetryMax: time.Minute}
		},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	requireLeader := metadata.AppendToOutgoingContext(ctx, rpctypes.MetadataRequireLeaderKey, rpctypes.MetadataHasLeader)

	watch := func(cctx context.Context) <-chan error {
		w, err := pb.NewWatchClient(e.Via).Watch(cctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := w.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{Key: []byte("k")}}}); err != nil {
			t.Fatal(err)
		}
		if r, err := w.Recv(); err != nil || !r.Created {
			t.Fatalf("watch not created: %v, %v", r, err)
		}
		ended := make(chan error, 1)
		go func() {
			for {
				if _, err := w.Recv(); err != nil {
					ended <- err
					return
				}
			}
		}()
		return ended
	}
	rlWatch, plainWatch := watch(requireLeader), watch(ctx)
	lease, err := pb.NewLeaseClient(e.Via).LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	ka, err := pb.NewLeaseClient(e.Via).LeaseKeepAlive(requireLeader)
	if err != nil {
		t.Fatal(err)
	}
	if err := ka.Send(&pb.LeaseKeepAliveRequest{ID: lease.ID}); err != nil {
		t.Fatal(err)
	}
	if _, err := ka.Recv(); err != nil {
		t.Fatal(err)
	}

	e.Cluster.Members[1].Stop()
	e.Cluster.Members[2].Stop()
	lostAt := time.Now()
	select {
	case err := <-rlWatch:
		if !isNoLeader(err) {
			t.Errorf("require-leader watch ended with %v, want etcd's no-leader error", err)
		}
	case <-time.After(lossBound):
		t.Fatalf("require-leader watch still open %v after quorum loss", lossBound)
	}
	if _, err := ka.Recv(); !isNoLeader(err) {
		t.Errorf("require-leader keepalive ended with %v, want etcd's no-leader error", err)
	}
	t.Logf("require-leader streams ended %v after quorum loss", time.Since(lostAt).Round(time.Millisecond))
	proxytest.Eventually(t, lossBound, func() bool { return !e.Proxy.HasLeader() }, "the proxy still reports a leader")

	// While the leader is lost: new require-leader streams and unary calls are refused; plain streams stay.
	w, err := pb.NewWatchClient(e.Via).Watch(requireLeader)
	if err == nil {
		_, err = w.Recv()
	}
	if !isNoLeader(err) {
		t.Errorf("a new require-leader watch got %v, want etcd's no-leader error", err)
	}
	if _, err := pb.NewKVClient(e.Via).Range(requireLeader, &pb.RangeRequest{Key: []byte("k"), Serializable: true}); !isNoLeader(err) {
		t.Errorf("a require-leader Range got %v, want etcd's no-leader error", err)
	}
	select {
	case err := <-plainWatch:
		t.Fatalf("a plain watch ended with %v on leader loss", err)
	default:
	}

	// Recovery: bring the members back, then a Put through the proxy marks the leader present at once.
	for _, m := range e.Cluster.Members[1:] {
		if err := m.Restart(30 * time.Second); err != nil {
			t.Fatal(err)
		}
	}
	if e.Proxy.HasLeader() {
		t.Fatal("the proxy saw the leader before any consensus RPC: the probe retry is set to a minute, so this test would not show what it claims")
	}
	proxytest.Eventually(t, 30*time.Second, func() bool {
		pctx, pcancel := context.WithTimeout(ctx, time.Second)
		defer pcancel()
		_, err := pb.NewKVClient(e.Via).Put(pctx, &pb.PutRequest{Key: []byte("k"), Value: []byte("back")})
		return err == nil
	}, "Put never succeeded after recovery")
	if !e.Proxy.HasLeader() {
		t.Error("a successful Put did not mark the leader present")
	}
	if _, err := pb.NewKVClient(e.Via).Range(requireLeader, &pb.RangeRequest{Key: []byte("k")}); err != nil {
		t.Errorf("a require-leader Range after recovery: %v", err)
	}
	select {
	case err := <-plainWatch:
		if status.Code(err) != codes.OK {
			t.Errorf("the plain watch ended with %v", err)
		}
	default:
	}
}

// TestProbeHoldsNoWatcher: the probe's stream stays open (the proxy sees the leader) but holds no watcher in etcd:
// etcd counts the clients' watchers only, as without the proxy (etcd's TestV3WatchCancellation counts them).
// (The read cache is off: its invalidation watch, which proxytest runs from the start, is a watcher of its own.)
func TestProbeHoldsNoWatcher(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{Proxy: func(c *proxy.Config) { c.Overrides.KVCache.MaxBytes = 0 }})
	proxytest.Eventually(t, 10*time.Second, e.Proxy.HasLeader, "the proxy never saw the leader")
	const watchers, streams = "etcd_debugging_mvcc_watcher_total", "etcd_debugging_mvcc_watch_stream_total"
	proxytest.Eventually(t, 5*time.Second, func() bool { return proxytest.Gauge(t, watchers) == 0 },
		"etcd counts %v watchers with no client watching, want 0", proxytest.Gauge(t, watchers))
	if n := proxytest.Gauge(t, streams); n < 1 {
		t.Fatalf("etcd counts %v watch streams: the probe's is not open", n)
	}
	time.Sleep(500 * time.Millisecond)
	if n := proxytest.Gauge(t, watchers); n != 0 || !e.Proxy.HasLeader() {
		t.Fatalf("after 500 ms: %v watchers, leader seen %v; want 0 and true", n, e.Proxy.HasLeader())
	}
}
