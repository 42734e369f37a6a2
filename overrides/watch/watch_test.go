package watch_test

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/embedetcd"
	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/overrides/watch"
	"github.com/etcdproxy/etcdproxy/proxy"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

func TestMain(m *testing.M) { proxytest.VerifyTestMain(m) }

// stream is a client Watch stream with a background reader.
type stream struct {
	t    *testing.T
	ws   pb.Watch_WatchClient
	resp chan *pb.WatchResponse
	err  chan error
}

func open(t *testing.T, ctx context.Context, cc *grpc.ClientConn, opts ...grpc.CallOption) *stream {
	t.Helper()
	ws, err := pb.NewWatchClient(cc).Watch(ctx, opts...)
	if err != nil {
		t.Fatal(err)
	}
	s := &stream{t: t, ws: ws, resp: make(chan *pb.WatchResponse, 100000), err: make(chan error, 1)}
	go func() {
		for {
			r, err := ws.Recv()
			if err != nil {
				s.err <- err
				return
			}
			s.resp <- r
		}
	}()
	return s
}

func (s *stream) send(req *pb.WatchRequest) {
	s.t.Helper()
	if err := s.ws.Send(req); err != nil {
		s.t.Fatal(err)
	}
}

func (s *stream) create(r *pb.WatchCreateRequest) {
	s.send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: r}})
}

func (s *stream) next() *pb.WatchResponse {
	s.t.Helper()
	select {
	case r := <-s.resp:
		return r
	case err := <-s.err:
		s.t.Fatalf("stream ended: %v", err)
	case <-time.After(10 * time.Second):
		s.t.Fatal("no watch response within 10s")
	}
	return nil
}

// quiet fails if a response arrives within d.
func (s *stream) quiet(d time.Duration) {
	s.t.Helper()
	select {
	case r := <-s.resp:
		s.t.Fatalf("unexpected response %v", r)
	case <-time.After(d):
	}
}

func upstreamWatchers(t *testing.T) float64 {
	return proxytest.Gauge(t, "etcd_debugging_mvcc_watcher_total")
}

// same compares two watch responses, ignoring nothing: direct etcd and the proxy serve the same member.
func same(t *testing.T, what string, direct, via *pb.WatchResponse) {
	t.Helper()
	if !proto.Equal(direct, via) {
		t.Errorf("%s:\n  direct: %s\n  proxy:  %s", what, brief(direct), brief(via))
	}
}

// brief describes a watch response without its values.
func brief(r *pb.WatchResponse) string {
	r = proto.Clone(r).(*pb.WatchResponse)
	for _, ev := range r.Events {
		ev.Kv.Value = []byte(fmt.Sprintf("<%d bytes>", len(ev.Kv.Value)))
		if ev.PrevKv != nil {
			ev.PrevKv.Value = []byte(fmt.Sprintf("<%d bytes>", len(ev.PrevKv.Value)))
		}
	}
	return fmt.Sprintf("%v (%d bytes)", r, proto.Size(r))
}

// TestCoalescing: 1000 watchers of one key share one upstream watcher, whether they arrive in a burst over 10
// streams or one at a time, and each gets the event.
func TestCoalescing(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 120*time.Second)
	base := upstreamWatchers(t)
	const streams, per = 10, 100

	// Burst: every create sent before any created response is read.
	var burst []*stream
	for i := 0; i < streams; i++ {
		s := open(t, ctx, e.Via)
		for j := 0; j < per; j++ {
			s.create(&pb.WatchCreateRequest{Key: []byte("hot")})
		}
		burst = append(burst, s)
	}
	for _, s := range burst {
		for j := 0; j < per; j++ {
			if r := s.next(); !r.Created || r.WatchId != int64(j) {
				t.Fatalf("created response %d: %v", j, r)
			}
		}
	}
	if got := upstreamWatchers(t) - base; got != 1 {
		t.Errorf("etcd has %v watchers for %d burst client watchers, want 1", got, streams*per)
	}

	// One at a time, on one stream.
	serial := open(t, ctx, e.Via)
	for j := 0; j < streams*per; j++ {
		serial.create(&pb.WatchCreateRequest{Key: []byte("hot")})
		if r := serial.next(); !r.Created {
			t.Fatalf("created: %v", r)
		}
	}
	if got := upstreamWatchers(t) - base; got != 1 {
		t.Errorf("etcd has %v watchers for %d client watchers, want 1", got, 2*streams*per)
	}

	rev := proxytest.Put(t, ctx, e.Direct, "hot", "v")
	for _, s := range append(burst, serial) {
		seen := map[int64]bool{}
		n := per
		if s == serial {
			n = streams * per
		}
		for j := 0; j < n; j++ {
			r := s.next()
			if len(r.Events) != 1 || r.Events[0].Kv.ModRevision != rev || seen[r.WatchId] {
				t.Fatalf("event response %v (seen before: %v)", r, seen[r.WatchId])
			}
			seen[r.WatchId] = true
		}
	}
}

// TestSemantics runs scripts against etcd directly and through the proxy, side by side on one member, and
// compares every response.
func TestSemantics(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 60*time.Second)
	for i := 1; i <= 5; i++ {
		proxytest.Put(t, ctx, e.Direct, "s/a", fmt.Sprint(i))
	}
	type pair struct{ d, v *stream }
	both := func() pair { return pair{open(t, ctx, e.Direct), open(t, ctx, e.Via)} }
	step := func(p pair, what string, r *pb.WatchCreateRequest) {
		t.Helper()
		p.d.create(r)
		p.v.create(r)
		same(t, what, p.d.next(), p.v.next())
	}
	// recvBoth receives n responses from each side. etcd serves the watchers of a stream that fire on the same
	// revision in no fixed order, so both sides are ordered by watch id (stably) before comparing.
	recvBoth := func(p pair, what string, n int) {
		t.Helper()
		var ds, vs []*pb.WatchResponse
		for i := 0; i < n; i++ {
			ds, vs = append(ds, p.d.next()), append(vs, p.v.next())
		}
		byID := func(rs []*pb.WatchResponse) {
			sort.SliceStable(rs, func(i, j int) bool { return rs[i].WatchId < rs[j].WatchId })
		}
		byID(ds)
		byID(vs)
		for i := range ds {
			same(t, fmt.Sprintf("%s, response %d", what, i), ds[i], vs[i])
		}
	}

	// Historical start, future start, client-chosen id and a duplicate, NODELETE, prev_kv, rev=0 after a put.
	p := both()
	step(p, "created from revision 3", &pb.WatchCreateRequest{Key: []byte("s/a"), StartRevision: 3, WatchId: 7})
	recvBoth(p, "events from revision 3", 1)
	step(p, "duplicate id", &pb.WatchCreateRequest{Key: []byte("s/a"), WatchId: 7})
	// etcd checks the range before the id (found by FuzzWatch).
	step(p, "duplicate id on an empty range", &pb.WatchCreateRequest{Key: []byte("s/b"), RangeEnd: []byte("s/a"), WatchId: 7})
	step(p, "duplicate id on a from-key range", &pb.WatchCreateRequest{Key: []byte("s/b"), RangeEnd: []byte{0}, WatchId: 7})
	step(p, "auto id after a chosen one", &pb.WatchCreateRequest{Key: []byte("s/"), RangeEnd: []byte("s0"),
		Filters: []pb.WatchCreateRequest_FilterType{pb.WatchCreateRequest_NODELETE}, PrevKv: true})
	cur := proxytest.Put(t, ctx, e.Direct, "s/a", "6")
	recvBoth(p, "a put", 2)
	step(p, "future start", &pb.WatchCreateRequest{Key: []byte("s/a"), StartRevision: cur + 2, WatchId: 9})
	// etcd answers no progress request while a watcher of the stream starts in the future.
	progressReq := &pb.WatchRequest{RequestUnion: &pb.WatchRequest_ProgressRequest{ProgressRequest: &pb.WatchProgressRequest{}}}
	p.d.send(progressReq)
	p.v.send(progressReq)
	p.d.quiet(100 * time.Millisecond)
	p.v.quiet(100 * time.Millisecond)
	proxytest.Put(t, ctx, e.Direct, "s/a", "7")
	recvBoth(p, "the put before the future start", 2)
	proxytest.Put(t, ctx, e.Direct, "s/a", "8")
	recvBoth(p, "the put at the future start", 3)
	if _, err := pb.NewKVClient(e.Direct).DeleteRange(ctx, &pb.DeleteRangeRequest{Key: []byte("s/a")}); err != nil {
		t.Fatal(err)
	}
	recvBoth(p, "a delete (NODELETE watcher skips it)", 2)
	p.d.quiet(100 * time.Millisecond)
	p.v.quiet(100 * time.Millisecond)

	// A watcher created with rev=0 right after a put does not see that put.
	q := both()
	proxytest.Put(t, ctx, e.Direct, "s/b", "before")
	step(q, "rev=0 after a put", &pb.WatchCreateRequest{Key: []byte("s/b")})
	proxytest.Put(t, ctx, e.Direct, "s/b", "after")
	recvBoth(q, "only the later put", 1)

	// Fragments: deleting 120 keys of 20 KiB in one request gives one response of 2.4 MiB with the previous
	// values, over etcd's 2 MiB limit (1.5 MiB max request bytes + 512 KiB), so etcd (and the proxy) split it.
	for i := 0; i < 120; i++ {
		proxytest.Put(t, ctx, e.Direct, fmt.Sprintf("f/%03d", i), string(bytes.Repeat([]byte{'o'}, 20<<10)))
	}
	f := both()
	step(f, "fragmenting watcher", &pb.WatchCreateRequest{Key: []byte("f/"), RangeEnd: []byte("f0"), Fragment: true, PrevKv: true})
	if _, err := pb.NewKVClient(e.Direct).DeleteRange(ctx, &pb.DeleteRangeRequest{Key: []byte("f/"), RangeEnd: []byte("f0")}); err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		d, v := f.d.next(), f.v.next()
		same(t, fmt.Sprintf("fragment %d", i), d, v)
		if !d.Fragment {
			break
		}
	}

	// Progress on the fragmenting stream, then cancel, then a progress request on a stream with no watcher left.
	progress := &pb.WatchRequest{RequestUnion: &pb.WatchRequest_ProgressRequest{ProgressRequest: &pb.WatchProgressRequest{}}}
	f.d.send(progress)
	f.v.send(progress)
	same(t, "progress", f.d.next(), f.v.next())
	f.d.send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CancelRequest{CancelRequest: &pb.WatchCancelRequest{WatchId: 0}}})
	f.v.send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CancelRequest{CancelRequest: &pb.WatchCancelRequest{WatchId: 0}}})
	same(t, "cancel", f.d.next(), f.v.next())
	progress = &pb.WatchRequest{RequestUnion: &pb.WatchRequest_ProgressRequest{ProgressRequest: &pb.WatchProgressRequest{}}}
	f.d.send(progress)
	f.v.send(progress)
	// etcd answers a progress request only through a watcher of the stream: with none, nothing comes.
	f.d.quiet(100 * time.Millisecond)
	f.v.quiet(100 * time.Millisecond)
	// Cancelling an unknown id gets no answer, from etcd or from the proxy.
	f.d.send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CancelRequest{CancelRequest: &pb.WatchCancelRequest{WatchId: 42}}})
	f.v.send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CancelRequest{CancelRequest: &pb.WatchCancelRequest{WatchId: 42}}})
	f.d.quiet(100 * time.Millisecond)
	f.v.quiet(100 * time.Millisecond)
}

// TestSlowConsumer: a client that stops reading never stalls the others and, once it reads again, gets every
// event exactly once, in order.
func TestSlowConsumer(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{Proxy: func(c *proxy.Config) { c.Overrides.Watch = watch.Options{QueueLen: 8} }})
	ctx := proxytest.Timeout(t, 120*time.Second)
	slowCtx, stopSlow := context.WithCancel(ctx)
	defer stopSlow()
	// The slow client reads nothing until the writes are done: gRPC flow control fills, then the proxy's queue.
	slowWS, err := pb.NewWatchClient(e.Via).Watch(slowCtx)
	if err != nil {
		t.Fatal(err)
	}
	if err := slowWS.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{Key: []byte("slow")}}}); err != nil {
		t.Fatal(err)
	}
	if r, err := slowWS.Recv(); err != nil || !r.Created {
		t.Fatal(r, err)
	}
	fast := open(t, ctx, e.Via)
	fast.create(&pb.WatchCreateRequest{Key: []byte("slow")})
	if r := fast.next(); !r.Created {
		t.Fatal(r)
	}
	const n = 300
	value := string(bytes.Repeat([]byte{'v'}, 8<<10)) // 300 × 8 KiB: well past gRPC's flow-control window
	var revs []int64
	for i := 0; i < n; i++ {
		revs = append(revs, proxytest.Put(t, ctx, e.Direct, "slow", value))
		// The fast client keeps up, whatever the slow one does.
		r := fast.next()
		if len(r.Events) != 1 || r.Events[0].Kv.ModRevision != revs[i] {
			t.Fatalf("fast client, event %d: %v", i, r)
		}
	}
	got := 0
	for got < n {
		r, err := slowWS.Recv()
		if err != nil {
			t.Fatalf("slow client after %d events: %v", got, err)
		}
		for _, ev := range r.Events {
			if ev.Kv.ModRevision != revs[got] {
				t.Fatalf("slow client: event %d has revision %d, want %d (gap or duplicate)", got, ev.Kv.ModRevision, revs[got])
			}
			got++
		}
	}
	if d := proxytest.Gauge(t, "etcdproxy_watch_slow_consumer_detaches_total"); d == 0 {
		t.Error("the slow client was never detached: the test did not exercise catch-up")
	}
}

// TestMemberRestarts: 100 watchers over 10 streams see every revision exactly once, in order, while the etcd
// members restart one after another under a stream of writes.
func TestMemberRestarts(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{Members: 3})
	ctx := proxytest.Timeout(t, 120*time.Second)
	const per = 10
	ss := openWatchers(t, ctx, e.Via, "r/", 10, per)
	stop := make(chan struct{})
	written := writeUntil(ctx, proxytest.Client(t, e.Cluster.Members[2].ClientURL), "r/", stop)
	for _, m := range e.Cluster.Members[:2] {
		m.Stop()
		if err := m.Restart(30 * time.Second); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	want := written()
	seesEveryWrite(t, ss, per, want)
	t.Logf("%d writes acknowledged during restarts; every watcher saw each of them once, in order", len(want))
}

// openWatchers opens streams client streams on cc, each with per watchers of the keys under prefix.
func openWatchers(t *testing.T, ctx context.Context, cc *grpc.ClientConn, prefix string, streams, per int) []*stream {
	t.Helper()
	var ss []*stream
	for i := 0; i < streams; i++ {
		s := open(t, ctx, cc)
		for j := 0; j < per; j++ {
			s.create(&pb.WatchCreateRequest{Key: []byte(prefix), RangeEnd: []byte(clientv3.GetPrefixRangeEnd(prefix))})
			if r := s.next(); !r.Created {
				t.Fatal(r)
			}
		}
		ss = append(ss, s)
	}
	return ss
}

// writeUntil writes keys under prefix through writer, one every 5 ms (a paced load), until stop is closed. The
// returned function waits for the writer to finish and returns the revisions of the writes etcd acknowledged
// (during a fault some fail; the acknowledged ones must all be seen).
func writeUntil(ctx context.Context, writer *clientv3.Client, prefix string, stop <-chan struct{}) func() []int64 {
	var revs []int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-ctx.Done():
				return
			case <-time.After(5 * time.Millisecond):
			}
			pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			r, err := writer.Put(pctx, fmt.Sprint(prefix, i%7), fmt.Sprint(i))
			cancel()
			if err == nil {
				revs = append(revs, r.Header.Revision)
			}
		}
	}()
	return func() []int64 {
		<-done
		return revs
	}
}

// seesEveryWrite reads the streams ss, each with per watchers, until every watcher has reached the last revision of
// want, and fails on anything but events, on a revision out of order or seen twice, and on a revision of want a
// watcher never saw.
func seesEveryWrite(t *testing.T, ss []*stream, per int, want []int64) {
	t.Helper()
	last := want[len(want)-1]
	for i, s := range ss {
		lastSeen := map[int64]int64{}      // watch id -> last revision seen
		seen := map[int64]map[int64]bool{} // watch id -> revisions seen
		for len(lastSeen) < per || !allAt(lastSeen, last) {
			r := s.next()
			if r.Created || r.Canceled {
				t.Fatalf("stream %d got %v: an upstream reconnect must not reach clients", i, r)
			}
			for _, ev := range r.Events {
				if prev := lastSeen[r.WatchId]; ev.Kv.ModRevision <= prev {
					t.Fatalf("stream %d watcher %d: revision %d after %d (duplicate or out of order)", i, r.WatchId, ev.Kv.ModRevision, prev)
				}
				lastSeen[r.WatchId] = ev.Kv.ModRevision
				if seen[r.WatchId] == nil {
					seen[r.WatchId] = map[int64]bool{}
				}
				seen[r.WatchId][ev.Kv.ModRevision] = true
			}
		}
		for id, revs := range seen {
			for _, rev := range want {
				if !revs[rev] {
					t.Fatalf("stream %d watcher %d never saw the acknowledged write at revision %d (a gap)", i, id, rev)
				}
			}
		}
	}
}

func allAt(seen map[int64]int64, rev int64) bool {
	for _, r := range seen {
		if r < rev {
			return false
		}
	}
	return true
}

// TestAuthChecksEveryWatcher: with auth on, etcd checks each new watcher against the caller's permissions, even
// when the proxy already watches the range for the same caller; a revoked permission refuses the next watcher, as
// etcd does. Coalescing still happens once etcd has accepted the watcher.
func TestAuthChecksEveryWatcher(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 60*time.Second)
	proxytest.EnableAuth(t, ctx, e.Direct, "r", proxytest.User{Name: "al", Password: "a", ReadFrom: "a", ReadTo: "b"})
	must := func(_ any, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	as := func(cc *grpc.ClientConn, user, pw string) context.Context { return proxytest.As(t, ctx, cc, user, pw) }
	alDirect, alVia, root := as(e.Direct, "al", "a"), as(e.Via, "al", "a"), as(e.Direct, "root", "r")
	d, v := open(t, alDirect, e.Direct), open(t, alVia, e.Via)
	for i := 0; i < 3; i++ {
		d.create(&pb.WatchCreateRequest{Key: []byte("a1")})
		v.create(&pb.WatchCreateRequest{Key: []byte("a1")})
		dr, vr := d.next(), v.next()
		if !vr.Created || vr.Canceled || dr.WatchId != vr.WatchId {
			t.Fatalf("watcher %d: direct %v, proxy %v", i, dr, vr)
		}
	}
	proxytest.Eventually(t, 10*time.Second, func() bool {
		return proxytest.Gauge(t, "etcdproxy_watch_upstream_watchers") == 1
	}, "the 3 watchers of one caller and range were never coalesced (%v upstream watchers)",
		proxytest.Gauge(t, "etcdproxy_watch_upstream_watchers"))

	must(pb.NewAuthClient(e.Direct).RoleRevokePermission(root, &pb.AuthRoleRevokePermissionRequest{
		Role: "al-reader", Key: []byte("a"), RangeEnd: []byte("b")}))
	d.create(&pb.WatchCreateRequest{Key: []byte("a1")})
	v.create(&pb.WatchCreateRequest{Key: []byte("a1")})
	dr, vr := d.next(), v.next()
	if !dr.Canceled || dr.Canceled != vr.Canceled || dr.CancelReason != vr.CancelReason || dr.WatchId != vr.WatchId {
		t.Errorf("a watcher after the permission was revoked:\n  direct: %v\n  proxy:  %v", dr, vr)
	}
}

// TestTenThousandOnOneStream: 10000 watchers created on one stream in a burst share one upstream watcher and each
// gets the event.
func TestTenThousandOnOneStream(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 120*time.Second)
	base := upstreamWatchers(t)
	s := open(t, ctx, e.Via)
	const n = 10000
	for i := 0; i < n; i++ {
		s.create(&pb.WatchCreateRequest{Key: []byte("ten")})
	}
	for i := 0; i < n; i++ {
		if r := s.next(); !r.Created {
			t.Fatalf("response %d: %v", i, r)
		}
	}
	if got := upstreamWatchers(t) - base; got != 1 {
		t.Errorf("etcd has %v watchers for %d client watchers on one stream, want 1", got, n)
	}
	rev := proxytest.Put(t, ctx, e.Direct, "ten", "v")
	seen := make(map[int64]bool, n)
	for i := 0; i < n; i++ {
		r := s.next()
		if len(r.Events) != 1 || r.Events[0].Kv.ModRevision != rev || seen[r.WatchId] {
			t.Fatalf("event %d: %v", i, r)
		}
		seen[r.WatchId] = true
	}
}

// TestDisconnectDuringFanOut: clients that go away in the middle of a stream of events take their watchers with
// them at once, the others keep receiving everything, and etcd's watcher count returns to where it was.
func TestDisconnectDuringFanOut(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 60*time.Second)
	base := upstreamWatchers(t)
	stay := open(t, ctx, e.Via)
	stay.create(&pb.WatchCreateRequest{Key: []byte("d/"), RangeEnd: []byte("d0")})
	stay.next()
	var cancels []context.CancelFunc
	for i := 0; i < 5; i++ {
		cctx, cancel := context.WithCancel(ctx)
		cancels = append(cancels, cancel)
		s := open(t, cctx, e.Via)
		s.create(&pb.WatchCreateRequest{Key: []byte("d/"), RangeEnd: []byte("d0")})
		s.create(&pb.WatchCreateRequest{Key: []byte(fmt.Sprint("d/", i))}) // a range of its own
		s.next()
		s.next()
	}
	var revs []int64
	for i := 0; i < 50; i++ {
		revs = append(revs, proxytest.Put(t, ctx, e.Direct, fmt.Sprint("d/", i%5), "v"))
		if i == 20 {
			for _, cancel := range cancels {
				cancel()
			}
		}
	}
	got := 0
	for got < len(revs) {
		for _, ev := range stay.next().Events {
			if ev.Kv.ModRevision != revs[got] {
				t.Fatalf("event %d: revision %d, want %d", got, ev.Kv.ModRevision, revs[got])
			}
			got++
		}
	}
	proxytest.Eventually(t, 5*time.Second, func() bool { return upstreamWatchers(t)-base == 1 },
		"etcd counts %v watchers after the clients left, want 1 (the staying client's)", upstreamWatchers(t)-base)
}

// TestCompactionDuringCatchUp: a slow client's watcher catching up from a revision that a compaction has since
// removed ends with etcd's compacted response, as etcd ends a slow watcher; the fast client is not affected.
func TestCompactionDuringCatchUp(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{Proxy: func(c *proxy.Config) { c.Overrides.Watch = watch.Options{QueueLen: 4} }})
	ctx := proxytest.Timeout(t, 60*time.Second)
	slowCtx, stopSlow := context.WithCancel(ctx)
	defer stopSlow()
	slowWS, err := pb.NewWatchClient(e.Via).Watch(slowCtx)
	if err != nil {
		t.Fatal(err)
	}
	if err := slowWS.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{Key: []byte("cc")}}}); err != nil {
		t.Fatal(err)
	}
	if r, err := slowWS.Recv(); err != nil || !r.Created {
		t.Fatal(r, err)
	}
	fast := open(t, ctx, e.Via)
	fast.create(&pb.WatchCreateRequest{Key: []byte("cc")})
	fast.next()
	value := string(bytes.Repeat([]byte{'v'}, 8<<10))
	var last int64
	for i := 0; i < 200; i++ {
		last = proxytest.Put(t, ctx, e.Direct, "cc", value)
		if r := fast.next(); r.Events[0].Kv.ModRevision != last {
			t.Fatalf("fast client: %v", r)
		}
	}
	proxytest.Eventually(t, 5*time.Second, func() bool {
		return proxytest.Gauge(t, "etcdproxy_watch_slow_consumer_detaches_total") > 0
	}, "the slow client was never detached")
	if _, err := pb.NewKVClient(e.Direct).Compact(ctx, &pb.CompactionRequest{Revision: last, Physical: true}); err != nil {
		t.Fatal(err)
	}
	var prev int64
	for {
		r, err := slowWS.Recv()
		if err != nil {
			t.Fatalf("slow client stream ended: %v", err)
		}
		for _, ev := range r.Events {
			if ev.Kv.ModRevision <= prev {
				t.Fatalf("slow client: revision %d after %d", ev.Kv.ModRevision, prev)
			}
			prev = ev.Kv.ModRevision
		}
		if r.Canceled {
			if r.CompactRevision != last {
				t.Errorf("slow client ended with %v, want compact_revision %d", r, last)
			}
			break
		}
		if prev == last {
			t.Fatal("the slow client caught up past the compaction: the test did not exercise catch-up")
		}
	}
}

// TestPartitionedMember: a member cut off from its peers loses the cluster; the upstream watch it serves is
// require-leader, so etcd ends it there and the proxy moves it to a healthy member. 100 watchers see every write
// acknowledged by the majority exactly once, in order, with no extra created, while first m0 and then m1 are
// partitioned and healed.
func TestPartitionedMember(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{
		Members:   3,
		Configure: func(c *embed.Config) { c.TickMs = 30; c.ElectionMs = 300 },
		// The proxy talks to m0 and m1 only, so its upstream stream is on a member that gets partitioned.
		Upstream: func(c *embedetcd.Cluster) []string { return c.Endpoints()[:2] },
	})
	ctx := proxytest.Timeout(t, 120*time.Second)
	const per = 10
	ss := openWatchers(t, ctx, e.Via, "p/", 10, per)
	stop := make(chan struct{})
	written := writeUntil(ctx, proxytest.Client(t, e.Cluster.Members[2].ClientURL), "p/", stop)
	cut := func(m int, heal bool) {
		a := e.Cluster.Members[m].Etcd().Server
		for i, other := range e.Cluster.Members {
			if i == m {
				continue
			}
			b := other.Etcd().Server
			if heal {
				a.MendPeer(b.MemberID())
				b.MendPeer(a.MemberID())
			} else {
				a.CutPeer(b.MemberID())
				b.CutPeer(a.MemberID())
			}
		}
	}
	reconnects := proxytest.Gauge(t, "etcdproxy_watch_upstream_reconnects_total")
	for _, m := range []int{0, 1} {
		cut(m, false)
		// The cut-off member notices within a few election timeouts; give etcd's require-leader monitor time to
		// act (3 election timeouts, checked once per timeout) before healing.
		isolated := e.Cluster.Members[m].Etcd().Server
		proxytest.Eventually(t, 10*time.Second, func() bool { return isolated.Leader() == 0 },
			"member %d still sees a leader after being cut off", m)
		// Hold the partition for 2s: etcd's monitor ends require-leader streams after 3 election timeouts
		// without a leader (0.9s here). This is the length of the fault, not a wait for a state.
		time.Sleep(2 * time.Second)
		cut(m, true)
	}
	close(stop)
	want := written()
	seesEveryWrite(t, ss, per, want)
	moved := proxytest.Gauge(t, "etcdproxy_watch_upstream_reconnects_total") - reconnects
	if moved == 0 {
		t.Error("the upstream watch stream never moved: the partitions did not reach it")
	}
	t.Logf("%d writes acknowledged; upstream watch stream moved %v times", len(want), moved)
}
