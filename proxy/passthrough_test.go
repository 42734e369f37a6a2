package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/proxy"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

func TestMain(m *testing.M) { proxytest.VerifyTestMain(m) }

// sameError fails unless direct and via carry the same gRPC code and message.
func sameError(t *testing.T, what string, direct, via error) {
	t.Helper()
	d, v := status.Convert(direct), status.Convert(via)
	if direct == nil {
		t.Errorf("%s: etcd answered without an error; the case does not test what it says", what)
	}
	if d.Code() != v.Code() || d.Message() != v.Message() {
		t.Errorf("%s:\n  direct: %v %q\n  proxy:  %v %q", what, d.Code(), d.Message(), v.Code(), v.Message())
	}
}

// TestErrorsUnchanged sends requests that etcd refuses, directly and through the proxy: the client must see the
// same gRPC code and message.
func TestErrorsUnchanged(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 30*time.Second)
	direct := pb.NewKVClient(e.Direct)
	for i := 0; i < 5; i++ {
		if _, err := direct.Put(ctx, &pb.PutRequest{Key: []byte("k"), Value: []byte{byte(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := direct.Compact(ctx, &pb.CompactionRequest{Revision: 4, Physical: true}); err != nil {
		t.Fatal(err)
	}
	tooMany := &pb.TxnRequest{}
	for i := 0; i < 129; i++ {
		tooMany.Success = append(tooMany.Success, &pb.RequestOp{Request: &pb.RequestOp_RequestRange{
			RequestRange: &pb.RangeRequest{Key: []byte(fmt.Sprint(i))}}})
	}
	put := func(k string) *pb.RequestOp {
		return &pb.RequestOp{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: []byte(k)}}}
	}
	cases := []struct {
		name string
		call func(cc *grpc.ClientConn) error
	}{
		{"compacted revision", func(cc *grpc.ClientConn) error {
			_, err := pb.NewKVClient(cc).Range(ctx, &pb.RangeRequest{Key: []byte("k"), Revision: 2})
			return err
		}},
		{"future revision", func(cc *grpc.ClientConn) error {
			_, err := pb.NewKVClient(cc).Range(ctx, &pb.RangeRequest{Key: []byte("k"), Revision: 1000})
			return err
		}},
		{"compact a future revision", func(cc *grpc.ClientConn) error {
			_, err := pb.NewKVClient(cc).Compact(ctx, &pb.CompactionRequest{Revision: 1000})
			return err
		}},
		{"compact a compacted revision", func(cc *grpc.ClientConn) error {
			_, err := pb.NewKVClient(cc).Compact(ctx, &pb.CompactionRequest{Revision: 2})
			return err
		}},
		{"empty key", func(cc *grpc.ClientConn) error {
			_, err := pb.NewKVClient(cc).Put(ctx, &pb.PutRequest{Value: []byte("v")})
			return err
		}},
		{"ignore_value on a missing key", func(cc *grpc.ClientConn) error {
			_, err := pb.NewKVClient(cc).Put(ctx, &pb.PutRequest{Key: []byte("missing"), IgnoreValue: true})
			return err
		}},
		{"put with a lease that does not exist", func(cc *grpc.ClientConn) error {
			_, err := pb.NewKVClient(cc).Put(ctx, &pb.PutRequest{Key: []byte("k"), Lease: 12345})
			return err
		}},
		{"too many operations in a txn", func(cc *grpc.ClientConn) error {
			_, err := pb.NewKVClient(cc).Txn(ctx, tooMany)
			return err
		}},
		{"duplicate key in a txn", func(cc *grpc.ClientConn) error {
			_, err := pb.NewKVClient(cc).Txn(ctx, &pb.TxnRequest{Success: []*pb.RequestOp{put("d"), put("d")}})
			return err
		}},
		// etcd's grpc-proxy panics on this one and takes every client down with it.
		{"empty RequestOp in a txn", func(cc *grpc.ClientConn) error {
			_, err := pb.NewKVClient(cc).Txn(ctx, &pb.TxnRequest{Success: []*pb.RequestOp{{}}})
			return err
		}},
		{"empty RequestOp in a nested txn", func(cc *grpc.ClientConn) error {
			_, err := pb.NewKVClient(cc).Txn(ctx, &pb.TxnRequest{Failure: []*pb.RequestOp{{Request: &pb.RequestOp_RequestTxn{
				RequestTxn: &pb.TxnRequest{Success: []*pb.RequestOp{{}}}}}},
				Compare: []*pb.Compare{{Key: []byte("nope"), Target: pb.Compare_VERSION, Result: pb.Compare_GREATER}}})
			return err
		}},
		// Between etcd's --max-request-bytes (1.5 MiB) and its gRPC limit: etcd's own error. etcd's grpc-proxy, with
		// its 1.5 MiB send limit, answers a client-side ResourceExhausted instead.
		{"request too large", func(cc *grpc.ClientConn) error {
			_, err := pb.NewKVClient(cc).Put(ctx, &pb.PutRequest{Key: []byte("big"), Value: bytes.Repeat([]byte("x"), 1600*1024)})
			return err
		}},
		{"request over etcd's gRPC limit", func(cc *grpc.ClientConn) error {
			_, err := pb.NewKVClient(cc).Put(ctx, &pb.PutRequest{Key: []byte("big"), Value: bytes.Repeat([]byte("x"), 3<<20)})
			return err
		}},
		{"revoke a lease that does not exist", func(cc *grpc.ClientConn) error {
			_, err := pb.NewLeaseClient(cc).LeaseRevoke(ctx, &pb.LeaseRevokeRequest{ID: 999})
			return err
		}},
		{"grant a lease with a TTL over the maximum", func(cc *grpc.ClientConn) error {
			_, err := pb.NewLeaseClient(cc).LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 1 << 40})
			return err
		}},
		{"grant a lease id that exists", func(cc *grpc.ClientConn) error {
			_, err := pb.NewLeaseClient(cc).LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: 777, TTL: 60})
			return err
		}},
		{"remove a member that does not exist", func(cc *grpc.ClientConn) error {
			_, err := pb.NewClusterClient(cc).MemberRemove(ctx, &pb.MemberRemoveRequest{ID: 1})
			return err
		}},
		{"authenticate while auth is disabled", func(cc *grpc.ClientConn) error {
			_, err := pb.NewAuthClient(cc).Authenticate(ctx, &pb.AuthenticateRequest{Name: "root", Password: "x"})
			return err
		}},
		{"enable auth without a root user", func(cc *grpc.ClientConn) error {
			_, err := pb.NewAuthClient(cc).AuthEnable(ctx, &pb.AuthEnableRequest{})
			return err
		}},
	}
	if _, err := pb.NewLeaseClient(e.Direct).LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: 777, TTL: 60}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range cases {
		sameError(t, tc.name, tc.call(e.Direct), tc.call(e.Via))
	}
}

// TestHalfClose: a client that half-closes its stream keeps receiving, as with etcd (etcd's grpc-proxy ends the
// watch stream instead).
func TestHalfClose(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 20*time.Second)

	lease, err := pb.NewLeaseClient(e.Via).LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 30})
	if err != nil {
		t.Fatal(err)
	}
	ka, err := pb.NewLeaseClient(e.Via).LeaseKeepAlive(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := ka.Send(&pb.LeaseKeepAliveRequest{ID: lease.ID}); err != nil {
		t.Fatal(err)
	}
	if err := ka.CloseSend(); err != nil {
		t.Fatal(err)
	}
	r, err := ka.Recv()
	if err != nil || r.ID != lease.ID || r.TTL != 30 {
		t.Fatalf("keepalive after half-close: %v, %v", r, err)
	}

	w, err := pb.NewWatchClient(e.Via).Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{Key: []byte("hc")}}}); err != nil {
		t.Fatal(err)
	}
	if created, err := w.Recv(); err != nil || !created.Created {
		t.Fatalf("created: %v, %v", created, err)
	}
	if err := w.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := pb.NewKVClient(e.Direct).Put(ctx, &pb.PutRequest{Key: []byte("hc"), Value: []byte("v")}); err != nil {
		t.Fatal(err)
	}
	ev, err := w.Recv()
	if err != nil || len(ev.Events) != 1 || string(ev.Events[0].Kv.Key) != "hc" {
		t.Fatalf("event after half-close: %v, %v", ev, err)
	}
}

// TestCancelReachesEtcd: watch streams that clients cancel are cancelled upstream, so etcd's watcher count returns
// to where it was.
func TestCancelReachesEtcd(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	const watcherTotal = "etcd_debugging_mvcc_watcher_total"
	base := proxytest.Gauge(t, watcherTotal)
	const n = 10
	var cancels []context.CancelFunc
	for i := 0; i < n; i++ {
		ctx, cancel := context.WithCancel(proxytest.Timeout(t, 20*time.Second))
		cancels = append(cancels, cancel)
		w, err := pb.NewWatchClient(e.Via).Watch(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := w.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{Key: []byte(fmt.Sprint("c", i))}}}); err != nil {
			t.Fatal(err)
		}
		if r, err := w.Recv(); err != nil || !r.Created {
			t.Fatal(r, err)
		}
	}
	if got := proxytest.Gauge(t, watcherTotal); got != base+n {
		t.Fatalf("etcd counts %v watchers, want %v", got, base+n)
	}
	for _, cancel := range cancels {
		cancel()
	}
	proxytest.Eventually(t, 5*time.Second, func() bool { return proxytest.Gauge(t, watcherTotal) == base },
		"etcd still counts %v watchers 5s after the clients cancelled, want %v", proxytest.Gauge(t, watcherTotal), base)
}

// TestShutdownEndsStreams: Shutdown does not wait out its timeout for watch and keepalive streams; they end with
// Unavailable so that clients reconnect elsewhere.
func TestShutdownEndsStreams(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 20*time.Second)
	w, err := pb.NewWatchClient(e.Via).Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{Key: []byte("s")}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Recv(); err != nil {
		t.Fatal(err)
	}
	ka, err := pb.NewLeaseClient(e.Via).LeaseKeepAlive(ctx)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	e.Proxy.Shutdown(sctx)
	if d := time.Since(start); d > time.Second {
		t.Errorf("Shutdown took %v with open streams, want under 1s", d)
	}
	for name, recv := range map[string]func() error{
		"watch":     func() error { _, err := w.Recv(); return err },
		"keepalive": func() error { _, err := ka.Recv(); return err },
	} {
		if err := recv(); status.Code(err) != codes.Unavailable {
			t.Errorf("%s stream ended with %v, want Unavailable", name, err)
		}
	}
}

// TestMaxConcurrentStreams: --max-concurrent-streams is applied to the server (etcd's grpc-proxy ignores it).
func TestMaxConcurrentStreams(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{Proxy: func(c *proxy.Config) { c.MaxConcurrentStreams = 2 }})
	ctx := proxytest.Timeout(t, 20*time.Second)
	// open opens a watch stream and creates a watcher on it, in the background: gRPC holds back a stream over the
	// limit until one ends. The returned channel reports when the watcher is created.
	open := func() (context.CancelFunc, <-chan error) {
		sctx, cancel := context.WithCancel(ctx)
		created := make(chan error, 1)
		go func() {
			w, err := pb.NewWatchClient(e.Via).Watch(sctx)
			if err == nil {
				err = w.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{Key: []byte("m")}}})
			}
			if err == nil {
				_, err = w.Recv()
			}
			created <- err
		}()
		return cancel, created
	}
	cancel1, c1 := open()
	cancel2, c2 := open()
	defer cancel2()
	for i, c := range []<-chan error{c1, c2} {
		if err := <-c; err != nil {
			t.Fatalf("stream %d: %v", i+1, err)
		}
	}
	cancel3, c3 := open()
	defer cancel3()
	select {
	case err := <-c3:
		t.Fatalf("a third stream was served on one connection with max-concurrent-streams 2 (err %v)", err)
	case <-time.After(300 * time.Millisecond):
	}
	cancel1()
	select {
	case err := <-c3:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the third stream was not served after the first closed")
	}
}

// TestRangeStreamAndMemberPromote: the two RPCs etcd's grpc-proxy does not implement.
func TestRangeStreamAndMemberPromote(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 20*time.Second)
	for i := 0; i < 3; i++ {
		if _, err := pb.NewKVClient(e.Via).Put(ctx, &pb.PutRequest{Key: []byte(fmt.Sprint("rs", i)), Value: []byte("v")}); err != nil {
			t.Fatal(err)
		}
	}
	s, err := pb.NewKVClient(e.Via).RangeStream(ctx, &pb.RangeRequest{Key: []byte("rs"), RangeEnd: []byte("rt")})
	if err != nil {
		t.Fatal(err)
	}
	var keys int
	for {
		r, err := s.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("RangeStream through the proxy: %v", err)
		}
		keys += len(r.GetRangeResponse().GetKvs())
	}
	if keys != 3 {
		t.Errorf("RangeStream gave %d keys, want 3", keys)
	}
	added, err := pb.NewClusterClient(e.Via).MemberAdd(ctx, &pb.MemberAddRequest{PeerURLs: []string{"http://127.0.0.1:1"}, IsLearner: true})
	if err != nil {
		t.Fatal(err)
	}
	_, via := pb.NewClusterClient(e.Via).MemberPromote(ctx, &pb.MemberPromoteRequest{ID: added.Member.ID})
	_, direct := pb.NewClusterClient(e.Direct).MemberPromote(ctx, &pb.MemberPromoteRequest{ID: added.Member.ID})
	sameError(t, "MemberPromote of a learner that has not caught up", direct, via)
	if status.Code(via) == codes.Unimplemented {
		t.Error("MemberPromote is unimplemented")
	}
}

// TestHealth: /health and grpc.health.v1 on the proxy's own port follow the leader; /metrics is served there too.
func TestHealth(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 20*time.Second)
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + e.ProxyAddr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/health"); code != 200 || body != "{\"health\":\"true\",\"reason\":\"\"}\n" {
		t.Errorf("/health = %d %q", code, body)
	}
	// The proxy's own metrics, Go's and the process's; none of etcd's (etcd_*, os_fd_*, its gRPC server's), which
	// the etcd server packages in the binary (here: the embedded member in this test process) register in the same
	// default registry.
	for _, path := range []string{"/metrics", "/proxy/metrics"} {
		code, body := get(path)
		if code != 200 || !strings.Contains(body, "etcdproxy_leader_present 1") || !strings.Contains(body, "\ngo_goroutines ") {
			t.Errorf("%s = %d, leader gauge or go_goroutines missing", path, code)
		}
		for _, line := range strings.Split(body, "\n") {
			name, _, _ := strings.Cut(strings.TrimPrefix(strings.TrimPrefix(line, "# HELP "), "# TYPE "), " ")
			name, _, _ = strings.Cut(name, "{")
			own := name == ""
			for _, p := range []string{"etcdproxy_", "go_", "process_", "promhttp_"} {
				own = own || strings.HasPrefix(name, p)
			}
			if !own {
				t.Errorf("%s serves a metric that is not the proxy's: %s", path, line)
				break
			}
		}
	}
	hc := healthpb.NewHealthClient(e.Via)
	proxytest.Eventually(t, 5*time.Second, func() bool {
		r, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
		return err == nil && r.Status == healthpb.HealthCheckResponse_SERVING
	}, "grpc.health.v1 never reported SERVING")

	e.Cluster.Close()
	proxytest.Eventually(t, 20*time.Second, func() bool { code, _ := get("/health"); return code == 503 },
		"/health still 200 with etcd down")
	r, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || r.Status != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("grpc.health.v1 with etcd down: %v, %v", r, err)
	}
}
