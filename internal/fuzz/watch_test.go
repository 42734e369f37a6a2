package fuzz_test

// FuzzWatch sends a sequence of watch requests built from fuzz bytes on one Watch stream through the proxy and on
// one straight to etcd (the same cluster: the target writes nothing, so both streams see the same store), in
// lockstep, and compares the control responses each request gets: created and canceled flags, cancel reasons,
// watch ids, compact revisions, headers. Events and progress answers are not compared: when etcd sends them depends
// on its sync loop, not on the requests.

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	gocmp "github.com/google/go-cmp/cmp"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
)

// maxWatchOps bounds the requests of one input.
const maxWatchOps = 24

// watchKeys are the keys and range ends a script picks from (or it spells one out): around and inside the keys of
// the history, the whole keyspace, and the big values (fragmented responses).
var watchKeys = [][]byte{nil, {0}, []byte("a"), []byte("b"), []byte("big/"), []byte("big0"), []byte("c/"),
	[]byte("c0"), []byte("d"), []byte("zz"), {0xff}}

// watchHistory is the store FuzzWatch watches: written once at start, compacted at compacted.
type watchHistory struct{ compacted, current int64 }

// startWatchEnv writes a history with puts, deletes, a compaction and two values of 1 MiB after it (a watch from an
// old revision over them gets a response of 2 MiB: fragmented if it asks for fragments).
func startWatchEnv(tb testing.TB) (*fuzzEnv, watchHistory) {
	tb.Helper()
	e := startEnv(tb)
	ctx := proxytest.Timeout(tb, 30*time.Second)
	kv := pb.NewKVClient(e.Direct)
	var h watchHistory
	must := func(r interface{ GetHeader() *pb.ResponseHeader }, err error) {
		tb.Helper()
		if err != nil {
			tb.Fatal(err)
		}
		h.current = r.GetHeader().Revision
	}
	put := func(k string, v []byte) { must(kv.Put(ctx, &pb.PutRequest{Key: []byte(k), Value: v})) }
	del := func(k string) { must(kv.DeleteRange(ctx, &pb.DeleteRangeRequest{Key: []byte(k)})) }
	put("a", []byte("1"))
	put("b", []byte("1"))
	put("c/1", []byte("1"))
	put("c/2", []byte("1"))
	del("b")
	h.compacted = h.current
	put("a", []byte("2"))
	if _, err := kv.Compact(ctx, &pb.CompactionRequest{Revision: h.compacted, Physical: true}); err != nil {
		tb.Fatal(err)
	}
	put("big/1", bytes.Repeat([]byte("x"), 1<<20))
	put("big/2", bytes.Repeat([]byte("y"), 1<<20))
	del("c/1")
	put("d", []byte("1"))
	put("a", []byte("3"))
	return e, h
}

// FuzzWatch: every watch request gets the same control responses through the proxy as from etcd, and the streams
// end alike; the proxy never panics and answers each request within stepTimeout.
func FuzzWatch(f *testing.F) {
	e, h := startWatchEnv(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		ctx, cancel := context.WithCancel(context.Background())
		w := &watchRun{h: h, live: map[int64]bool{}, owed: map[int64]bool{},
			viaProxy: openWatch(ctx, t, e.Via), direct: openWatch(ctx, t, e.Direct)}
		defer func() {
			cancel()
			<-w.viaProxy.done
			<-w.direct.done
		}()
		w.run(t, &script{b: b})
		e.checkNoPanic(t)
	})
}

// run sends the requests of s, then settles the compacted responses still owed and sends a last create: whatever
// control responses the proxy still owes, or sent in excess, come before its created response.
func (w *watchRun) run(t *testing.T, s *script) {
	t.Helper()
	for i := 0; i < maxWatchOps && s.more(); i++ {
		if !w.step(t, w.request(s)) {
			return
		}
	}
	for _, id := range slices.Sorted(maps.Keys(w.owed)) {
		if !w.settleCompacted(t, id) {
			return
		}
	}
	if !w.step(t, &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{
		Key: []byte("\xff\xff\xfflast")}}}) {
		return
	}
	if diff := gocmp.Diff(w.viaProxy.compacted, w.direct.compacted, protocmp.Transform()); diff != "" {
		t.Fatalf("compacted responses no watch was owed differ (-proxy +etcd):\n%s\nafter:\n%s", diff, w.history())
	}
}

// watchSide is one Watch stream and its control responses.
type watchSide struct {
	stream pb.Watch_WatchClient
	in     chan received[*pb.WatchResponse]
	done   <-chan struct{}
	// compacted holds the compacted responses received and not compared yet, by watch id: etcd sends them from
	// its sync loop (every 100 ms), in no fixed order with the responses to the requests that follow.
	compacted map[int64][]*pb.WatchResponse
}

func openWatch(ctx context.Context, t *testing.T, cc *grpc.ClientConn) *watchSide {
	t.Helper()
	stream, err := pb.NewWatchClient(cc).Watch(ctx)
	if err != nil {
		t.Fatalf("opening a watch stream: %v", err)
	}
	s := &watchSide{stream: stream, in: make(chan received[*pb.WatchResponse], 64),
		compacted: map[int64][]*pb.WatchResponse{}}
	control := func(r *pb.WatchResponse) bool { return r.Created || r.Canceled }
	s.done = recvLoop(ctx, stream.Recv, control, s.in)
	return s
}

// watchRun is the state of one input: the requests so far (for failure messages) and the watch ids etcd holds.
type watchRun struct {
	h                watchHistory
	viaProxy, direct *watchSide
	sent             []string
	live             map[int64]bool // watch ids etcd created on the stream and the client has not cancelled
	owed             map[int64]bool // live ids created from a compacted start whose compacted response is not compared yet
}

func (w *watchRun) history() string { return strings.Join(w.sent, "\n") }

// request builds the next request of s: mostly creates, then cancels, progress requests and empty requests (no
// request in the union: etcd ignores them).
func (w *watchRun) request(s *script) *pb.WatchRequest {
	switch s.byte() % 8 {
	case 0, 1, 2, 3:
		return &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: w.create(s)}}
	case 4, 5:
		return &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CancelRequest{CancelRequest: &pb.WatchCancelRequest{
			WatchId: w.watchID(s)}}}
	case 6:
		return &pb.WatchRequest{RequestUnion: &pb.WatchRequest_ProgressRequest{ProgressRequest: &pb.WatchProgressRequest{}}}
	default:
		return &pb.WatchRequest{}
	}
}

func (w *watchRun) create(s *script) *pb.WatchCreateRequest {
	c := &pb.WatchCreateRequest{Key: watchKey(s), RangeEnd: watchKey(s), StartRevision: w.revision(s), WatchId: w.watchID(s)}
	flags := s.byte()
	c.PrevKv, c.Fragment, c.ProgressNotify = flags&1 != 0, flags&2 != 0, flags&4 != 0
	if flags&8 != 0 {
		c.Filters = append(c.Filters, pb.WatchCreateRequest_NOPUT)
	}
	if flags&16 != 0 {
		c.Filters = append(c.Filters, pb.WatchCreateRequest_NODELETE)
	}
	if flags&32 != 0 {
		c.Filters = append(c.Filters, pb.WatchCreateRequest_FilterType(2+flags>>6)) // no such filter: etcd ignores it
	}
	return c
}

func watchKey(s *script) []byte {
	if i := s.byte() % (len(watchKeys) + 1); i < len(watchKeys) {
		return watchKeys[i]
	}
	return s.bytes()
}

// revision picks a start revision: now, around the compaction and the current revision, small, negative, any.
func (w *watchRun) revision(s *script) int64 {
	switch s.byte() % 8 {
	case 0:
		return 0
	case 1:
		return w.h.compacted - 1
	case 2:
		return w.h.compacted
	case 3:
		return w.h.current
	case 4:
		return w.h.current + 1
	case 5:
		return -1
	case 6:
		return int64(s.byte() % 16)
	default:
		return s.int64()
	}
}

// watchID picks a watch id to create or cancel: 0 (for a create: etcd picks one), small ones (etcd's own picks),
// -1 (what etcd answers for a refused watch), one etcd holds, or any.
func (w *watchRun) watchID(s *script) int64 {
	switch s.byte() % 6 {
	case 0, 1:
		return 0
	case 2:
		return int64(s.byte() % 8)
	case 3:
		return -1
	case 4:
		i := s.byte()
		ids := make([]int64, 0, len(w.live))
		for id := range w.live {
			ids = append(ids, id)
		}
		if len(ids) == 0 {
			return 0
		}
		slices.Sort(ids)
		return ids[i%len(ids)]
	default:
		return s.int64()
	}
}

// step sends req on both streams and compares the control responses it gets, as many as etcd's rules say: a
// create gets its created response (created and canceled at once if refused) and, from a compacted start, a
// compacted one, compared when due (settleCompacted); a cancel of a watch etcd holds gets a canceled response, of
// any other id none; a progress request or an empty one none (its answer is not a control response). It reports
// whether both streams are open.
func (w *watchRun) step(t *testing.T, req *pb.WatchRequest) bool {
	t.Helper()
	if c := req.GetCancelRequest(); c != nil && w.owed[c.WatchId] && !w.settleCompacted(t, c.WatchId) {
		return false
	}
	w.sent = append(w.sent, prototext(req))
	for _, s := range []*watchSide{w.viaProxy, w.direct} {
		// A stream that ended refuses sends; how it ended is what the comparison below receives.
		_ = s.stream.Send(proto.Clone(req).(*pb.WatchRequest))
	}
	switch r := req.RequestUnion.(type) {
	case *pb.WatchRequest_CreateRequest:
		got, ok := w.exchange(t, func(_ *watchSide, got []*pb.WatchResponse) bool {
			return len(got) > 0 && got[len(got)-1].Created
		})
		if !ok {
			return false
		}
		if c := got[len(got)-1]; !c.Canceled {
			w.live[c.WatchId] = true
			if start := r.CreateRequest.StartRevision; start > 0 && start < w.h.compacted {
				w.owed[c.WatchId] = true
			}
		}
		return true
	case *pb.WatchRequest_CancelRequest:
		if !w.live[r.CancelRequest.WatchId] {
			return true
		}
		delete(w.live, r.CancelRequest.WatchId)
		_, ok := w.exchange(t, func(_ *watchSide, got []*pb.WatchResponse) bool { return len(got) > 0 })
		return ok
	}
	return true
}

// settleCompacted waits for the compacted response owed to watch id on both streams and compares them. It runs
// before the watch is cancelled: etcd sends no compacted response to a watch cancelled before its sync loop saw it,
// so only a wait makes the answer to the cancel certain.
func (w *watchRun) settleCompacted(t *testing.T, id int64) bool {
	t.Helper()
	delete(w.owed, id)
	_, ok := w.exchange(t, func(s *watchSide, _ []*pb.WatchResponse) bool { return len(s.compacted[id]) > 0 })
	if diff := gocmp.Diff(w.viaProxy.compacted[id], w.direct.compacted[id], protocmp.Transform()); diff != "" {
		t.Fatalf("compacted responses of watch %d differ (-proxy +etcd):\n%s\nafter:\n%s", id, diff, w.history())
	}
	delete(w.viaProxy.compacted, id)
	delete(w.direct.compacted, id)
	return ok
}

// exchange receives control responses on each stream until done holds for that stream or it ends, and fails t
// if what they received differs. It returns what etcd sent and reports whether both streams are still open.
func (w *watchRun) exchange(t *testing.T, done func(*watchSide, []*pb.WatchResponse) bool) ([]*pb.WatchResponse, bool) {
	t.Helper()
	direct, derr, ok := collect(w.direct, done)
	if !ok {
		t.Fatalf("etcd sent no control response within %v (FuzzWatch's model of etcd is wrong), after:\n%s",
			stepTimeout, w.history())
	}
	viaProxy, perr, ok := collect(w.viaProxy, done)
	if !ok {
		t.Fatalf("the proxy hung: no control response within %v, where etcd sent %v, after:\n%s", stepTimeout,
			direct, w.history())
	}
	if diff := sameStatus(perr, derr); diff != "" {
		t.Fatalf("the streams ended differently: %s, after:\n%s", diff, w.history())
	}
	if diff := cmpMessages(asMessages(viaProxy), asMessages(direct)); diff != "" {
		t.Fatalf("control responses differ (-proxy +etcd):\n%s\nafter:\n%s", diff, w.history())
	}
	return direct, derr == nil && perr == nil
}

// collect receives control responses from s until done holds (it is asked first, and after each response) or the
// stream ends (err). Compacted responses go to s.compacted; the others are returned. ok is false if neither
// happened within stepTimeout of a response.
func collect(s *watchSide, done func(*watchSide, []*pb.WatchResponse) bool) (got []*pb.WatchResponse, err error, ok bool) {
	for !done(s, got) {
		r, ok := next(s.in)
		if !ok {
			return got, nil, false
		}
		if r.err != nil {
			return got, r.err, true
		}
		if m := r.msg; !m.Created && m.Canceled && m.CompactRevision != 0 {
			s.compacted[m.WatchId] = append(s.compacted[m.WatchId], m)
		} else {
			got = append(got, m)
		}
	}
	return got, nil, true
}

func asMessages[T proto.Message](ms []T) []proto.Message {
	out := make([]proto.Message, len(ms))
	for i, m := range ms {
		out[i] = m
	}
	return out
}

// prototext is a request as a failure message shows it.
func prototext(m proto.Message) string { return fmt.Sprintf("  %v", m) }
