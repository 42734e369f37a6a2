package namespace_test

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/embedetcd"
	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/proxy"
	"go.etcd.io/etcd/api/v3/authpb"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	v3electionpb "go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	v3lockpb "go.etcd.io/etcd/server/v3/etcdserver/api/v3lock/v3lockpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

func TestMain(m *testing.M) { proxytest.VerifyTestMain(m) }

// result is one answer: a message or an error.
type result struct {
	m   proto.Message
	err error
}

func (r result) String() string {
	if r.err != nil {
		s, _ := status.FromError(r.err)
		return fmt.Sprintf("error %v: %s", s.Code(), s.Message())
	}
	if r.m == nil {
		return "<nil>"
	}
	return prototext.MarshalOptions{}.Format(r.m)
}

func one[M proto.Message](m M, err error) []result { return []result{{m, err}} }

// normalize clears what differs between two etcd clusters (cluster and member ids, raft term) in every response
// header of m; zeroRev clears the revision too (a read served by the proxy's cache carries its fill's header).
func normalize(m proto.Message, zeroRev bool) proto.Message {
	m = proto.Clone(m)
	var walk func(protoreflect.Message)
	walk = func(m protoreflect.Message) {
		if h, ok := m.Interface().(*pb.ResponseHeader); ok {
			h.ClusterId, h.MemberId, h.RaftTerm = 0, 0, 0
			if zeroRev {
				h.Revision = 0
			}
			return
		}
		m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
			switch {
			case fd.IsMap():
			case fd.IsList() && fd.Message() != nil:
				for i := 0; i < v.List().Len(); i++ {
					walk(v.List().Get(i).Message())
				}
			case fd.Message() != nil:
				walk(v.Message())
			}
			return true
		})
	}
	walk(m.ProtoReflect())
	return m
}

// step is one operation of the differential test, run on a connection to a namespaced proxy and on one straight
// to another etcd.
type step struct {
	name    string
	zeroRev bool
	do      func(ctx context.Context, cc *grpc.ClientConn) []result
}

const lease = 0x1234

func kv(cc *grpc.ClientConn) pb.KVClient { return pb.NewKVClient(cc) }

func put(k, v string) func(context.Context, *grpc.ClientConn) []result {
	return func(ctx context.Context, cc *grpc.ClientConn) []result {
		return one(kv(cc).Put(ctx, &pb.PutRequest{Key: []byte(k), Value: []byte(v), PrevKv: true}))
	}
}

func rng(k, end string, mod ...func(*pb.RangeRequest)) func(context.Context, *grpc.ClientConn) []result {
	return func(ctx context.Context, cc *grpc.ClientConn) []result {
		r := &pb.RangeRequest{Key: []byte(k), RangeEnd: []byte(end)}
		for _, m := range mod {
			m(r)
		}
		return one(kv(cc).Range(ctx, r))
	}
}

func del(k, end string) func(context.Context, *grpc.ClientConn) []result {
	return func(ctx context.Context, cc *grpc.ClientConn) []result {
		return one(kv(cc).DeleteRange(ctx, &pb.DeleteRangeRequest{Key: []byte(k), RangeEnd: []byte(end), PrevKv: true}))
	}
}

func txn(r *pb.TxnRequest) func(context.Context, *grpc.ClientConn) []result {
	return func(ctx context.Context, cc *grpc.ClientConn) []result {
		return one(kv(cc).Txn(ctx, proto.Clone(r).(*pb.TxnRequest)))
	}
}

func opRange(k, end string) *pb.RequestOp {
	return &pb.RequestOp{Request: &pb.RequestOp_RequestRange{RequestRange: &pb.RangeRequest{Key: []byte(k), RangeEnd: []byte(end)}}}
}

func opPut(k, v string) *pb.RequestOp {
	return &pb.RequestOp{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: []byte(k), Value: []byte(v), PrevKv: true}}}
}

func opDel(k, end string) *pb.RequestOp {
	return &pb.RequestOp{Request: &pb.RequestOp_RequestDeleteRange{RequestDeleteRange: &pb.DeleteRangeRequest{
		Key: []byte(k), RangeEnd: []byte(end), PrevKv: true}}}
}

func opTxn(r *pb.TxnRequest) *pb.RequestOp {
	return &pb.RequestOp{Request: &pb.RequestOp_RequestTxn{RequestTxn: r}}
}

func cmpValue(k, end, v string) *pb.Compare {
	return &pb.Compare{Key: []byte(k), RangeEnd: []byte(end), Target: pb.Compare_VALUE, Result: pb.Compare_EQUAL,
		TargetUnion: &pb.Compare_Value{Value: []byte(v)}}
}

func cmpVersion(k, end string, r pb.Compare_CompareResult, v int64) *pb.Compare {
	return &pb.Compare{Key: []byte(k), RangeEnd: []byte(end), Target: pb.Compare_VERSION, Result: r,
		TargetUnion: &pb.Compare_Version{Version: v}}
}

// watches are the watchers of the differential test, created before any write: every key, a prefix, the single
// empty key, everything from the empty key, and a range that holds keys before and after its end.
var watches = []*pb.WatchCreateRequest{
	{Key: []byte{0}, RangeEnd: []byte{0}, PrevKv: true},
	{Key: []byte("a"), RangeEnd: []byte("b"), PrevKv: true},
	{Key: nil},
	{Key: nil, RangeEnd: []byte{0}},
	{Key: []byte("b"), RangeEnd: []byte("c")},
	{Key: []byte("c"), RangeEnd: []byte("b")}, // key after its end: etcd's answer for an empty range
}

// differentialSteps run in order on both sides; revisions must match, so both sides start from a fresh etcd.
var differentialSteps = []step{
	{name: "put a", do: put("a", "1")},
	{name: "put b", do: put("b", "2")},
	{name: "put a/x", do: put("a/x", "3")},
	{name: "put \\x00", do: put("\x00", "zero")},
	{name: "put \\xff", do: put("\xff", "ff")},
	{name: "put \\xff\\xff", do: put("\xff\xff", "ffff")},
	{name: "put a again", do: put("a", "4")},
	{name: "put empty key", do: put("", "x")},
	{name: "put ignore_value with a value", do: func(ctx context.Context, cc *grpc.ClientConn) []result {
		return one(kv(cc).Put(ctx, &pb.PutRequest{Key: []byte("a"), Value: []byte("x"), IgnoreValue: true}))
	}},
	{name: "range empty key", do: rng("", "")},
	{name: "range empty key to the end", do: rng("", "\x00")},
	{name: "range empty key to b", do: rng("", "b")},
	{name: "range all", do: rng("\x00", "\x00")},
	{name: "range from a", do: rng("a", "\x00")},
	{name: "range from \\xff", do: rng("\xff", "\x00")},
	{name: "range prefix a", do: rng("a", "b")},
	{name: "range prefix \\xff (end \\x00)", do: rng("\xff", "\x00")},
	{name: "range key after end", do: rng("b", "a")},
	{name: "range key equal to end", do: rng("a", "a")},
	{name: "range single", do: rng("a/x", "")},
	{name: "range single missing", do: rng("zz", "")},
	{name: "range limit, descending", do: rng("\x00", "\x00", func(r *pb.RangeRequest) {
		r.Limit, r.SortOrder, r.SortTarget = 2, pb.RangeRequest_DESCEND, pb.RangeRequest_KEY
	})},
	{name: "range keys only", do: rng("a", "\x00", func(r *pb.RangeRequest) { r.KeysOnly = true })},
	{name: "range count only", do: rng("\x00", "\x00", func(r *pb.RangeRequest) { r.CountOnly = true })},
	{name: "range bad sort order", do: rng("a", "", func(r *pb.RangeRequest) { r.SortOrder = 9 })},
	{name: "range bad sort order, empty key", do: rng("", "", func(r *pb.RangeRequest) { r.SortOrder = 9 })},
	{name: "range serializable (miss)", zeroRev: true, do: rng("a", "b", func(r *pb.RangeRequest) { r.Serializable = true })},
	{name: "range serializable (hit)", zeroRev: true, do: rng("a", "b", func(r *pb.RangeRequest) { r.Serializable = true })},
	{name: "range stream", do: func(ctx context.Context, cc *grpc.ClientConn) []result {
		s, err := kv(cc).RangeStream(ctx, &pb.RangeRequest{Key: []byte{0}, RangeEnd: []byte{0}})
		if err != nil {
			return one[proto.Message](nil, err)
		}
		var rs []result
		for {
			r, err := s.Recv()
			if err != nil {
				if !strings.Contains(err.Error(), "EOF") {
					rs = append(rs, result{err: err})
				}
				return rs
			}
			rs = append(rs, result{m: r})
		}
	}},
	{name: "txn", do: txn(&pb.TxnRequest{
		Compare: []*pb.Compare{cmpValue("a", "", "4"), cmpVersion("a", "b", pb.Compare_GREATER, 0),
			cmpVersion("\x00", "\x00", pb.Compare_GREATER, 0)},
		Success: []*pb.RequestOp{opRange("\x00", "\x00"), opPut("c", "5"), opDel("a/", "a0"),
			opTxn(&pb.TxnRequest{
				Compare: []*pb.Compare{cmpVersion("c", "", pb.Compare_GREATER, 0)},
				Success: []*pb.RequestOp{opRange("c", ""), opPut("d", "6")},
				Failure: []*pb.RequestOp{opPut("e", "7")},
			})},
		Failure: []*pb.RequestOp{opPut("f", "8")},
	})},
	{name: "txn failure branch", do: txn(&pb.TxnRequest{
		Compare: []*pb.Compare{cmpVersion("zz", "", pb.Compare_GREATER, 0)},
		Success: []*pb.RequestOp{opPut("g", "9")},
		Failure: []*pb.RequestOp{opRange("a", "\x00"), opTxn(&pb.TxnRequest{
			Success: []*pb.RequestOp{opDel("d", ""), opRange("\x00", "\x00")}})},
	})},
	{name: "txn compare on the empty key", do: txn(&pb.TxnRequest{Compare: []*pb.Compare{cmpVersion("", "", pb.Compare_EQUAL, 0)}})},
	{name: "txn compare from the empty key", do: txn(&pb.TxnRequest{Compare: []*pb.Compare{cmpVersion("", "\x00", pb.Compare_EQUAL, 0)}})},
	{name: "txn empty key in a nested op", do: txn(&pb.TxnRequest{Success: []*pb.RequestOp{opPut("h", "1"),
		opTxn(&pb.TxnRequest{Failure: []*pb.RequestOp{opDel("", "")}})}})},
	{name: "txn duplicate put", do: txn(&pb.TxnRequest{Success: []*pb.RequestOp{opPut("h", "1"), opPut("h", "2")}})},
	{name: "txn put inside a deleted range", do: txn(&pb.TxnRequest{Success: []*pb.RequestOp{opDel("h", "i"), opPut("h0", "2")}})},
	{name: "txn empty op", do: txn(&pb.TxnRequest{Success: []*pb.RequestOp{{}}})},
	{name: "delete empty key", do: del("", "")},
	{name: "delete key after end", do: del("c", "b")},
	{name: "delete prefix \\xff", do: del("\xff", "\x00")},
	{name: "delete single", do: del("b", "")},
	{name: "lease grant", do: func(ctx context.Context, cc *grpc.ClientConn) []result {
		return one(pb.NewLeaseClient(cc).LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: lease, TTL: 1000}))
	}},
	{name: "put with lease", do: func(ctx context.Context, cc *grpc.ClientConn) []result {
		return one(kv(cc).Put(ctx, &pb.PutRequest{Key: []byte("l1"), Value: []byte("v"), Lease: lease}))
	}},
	{name: "lease time to live", do: func(ctx context.Context, cc *grpc.ClientConn) []result {
		r, err := pb.NewLeaseClient(cc).LeaseTimeToLive(ctx, &pb.LeaseTimeToLiveRequest{ID: lease, Keys: true})
		if r != nil {
			r.TTL = 0 // counts down
		}
		return one(r, err)
	}},
	{name: "election", do: func(ctx context.Context, cc *grpc.ClientConn) []result {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		e := v3electionpb.NewElectionClient(cc)
		var rs []result
		c, err := e.Campaign(ctx, &v3electionpb.CampaignRequest{Name: []byte("e"), Lease: lease, Value: []byte("v1")})
		rs = append(rs, result{c, err})
		if err != nil {
			return rs
		}
		rs = append(rs, one(e.Leader(ctx, &v3electionpb.LeaderRequest{Name: []byte("e")}))...)
		rs = append(rs, one(e.Leader(ctx, &v3electionpb.LeaderRequest{Name: []byte("nobody")}))...)
		ob, err := e.Observe(ctx, &v3electionpb.LeaderRequest{Name: []byte("e")})
		if err != nil {
			return append(rs, result{err: err})
		}
		rs = append(rs, one(ob.Recv())...)
		rs = append(rs, one(e.Proclaim(ctx, &v3electionpb.ProclaimRequest{Leader: c.Leader, Value: []byte("v2")}))...)
		rs = append(rs, one(ob.Recv())...)
		rs = append(rs, one(e.Proclaim(ctx, &v3electionpb.ProclaimRequest{Value: []byte("v3")}))...)
		rs = append(rs, one(e.Proclaim(ctx, &v3electionpb.ProclaimRequest{Value: []byte("v3"),
			Leader: &v3electionpb.LeaderKey{Name: []byte("e"), Lease: lease}}))...)
		rs = append(rs, one(e.Resign(ctx, &v3electionpb.ResignRequest{Leader: &v3electionpb.LeaderKey{Name: []byte("e"),
			Lease: lease}}))...)
		rs = append(rs, one(e.Resign(ctx, &v3electionpb.ResignRequest{}))...)
		rs = append(rs, one(e.Resign(ctx, &v3electionpb.ResignRequest{Leader: c.Leader}))...)
		return rs
	}},
	{name: "election with an empty name", do: func(ctx context.Context, cc *grpc.ClientConn) []result {
		e := v3electionpb.NewElectionClient(cc)
		c, err := e.Campaign(ctx, &v3electionpb.CampaignRequest{Lease: lease, Value: []byte("v")})
		rs := one(c, err)
		if err == nil {
			rs = append(rs, one(e.Leader(ctx, &v3electionpb.LeaderRequest{}))...)
			rs = append(rs, one(e.Resign(ctx, &v3electionpb.ResignRequest{Leader: c.Leader}))...)
		}
		return rs
	}},
	{name: "lock", do: func(ctx context.Context, cc *grpc.ClientConn) []result {
		l := v3lockpb.NewLockClient(cc)
		r, err := l.Lock(ctx, &v3lockpb.LockRequest{Name: []byte("m"), Lease: lease})
		rs := one(r, err)
		if err == nil {
			rs = append(rs, one(kv(cc).Range(ctx, &pb.RangeRequest{Key: r.Key}))...)
			rs = append(rs, one(l.Unlock(ctx, &v3lockpb.UnlockRequest{Key: r.Key}))...)
		}
		rs = append(rs, one(l.Unlock(ctx, &v3lockpb.UnlockRequest{}))...)
		return rs
	}},
	{name: "lease time to live after election and lock", do: func(ctx context.Context, cc *grpc.ClientConn) []result {
		r, err := pb.NewLeaseClient(cc).LeaseTimeToLive(ctx, &pb.LeaseTimeToLiveRequest{ID: lease, Keys: true})
		if r != nil {
			r.TTL = 0
			sort.Slice(r.Keys, func(i, j int) bool { return bytes.Compare(r.Keys[i], r.Keys[j]) < 0 })
		}
		return one(r, err)
	}},
	{name: "lease revoke", do: func(ctx context.Context, cc *grpc.ClientConn) []result {
		return one(pb.NewLeaseClient(cc).LeaseRevoke(ctx, &pb.LeaseRevokeRequest{ID: lease}))
	}},
	{name: "delete everything", do: del("\x00", "\x00")},
	{name: "range all, at the end", do: rng("\x00", "\x00")},
}

// watchAll creates the watchers of watches on a new stream of cc and returns the stream once every one is created.
func watchAll(t *testing.T, ctx context.Context, cc *grpc.ClientConn) pb.Watch_WatchClient {
	t.Helper()
	ws, err := pb.NewWatchClient(cc).Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range watches {
		if err := ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: proto.Clone(w).(*pb.WatchCreateRequest)}}); err != nil {
			t.Fatal(err)
		}
		r, err := ws.Recv()
		if err != nil || !r.Created {
			t.Fatalf("watch %v: %v, %v", w, r, err)
		}
	}
	return ws
}

// collect reads ws until a progress answer at rev or later, and returns every event response before it, one line
// per watch id.
func collect(t *testing.T, ws pb.Watch_WatchClient, rev int64) map[int64][]string {
	t.Helper()
	if err := ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_ProgressRequest{ProgressRequest: &pb.WatchProgressRequest{}}}); err != nil {
		t.Fatal(err)
	}
	events := map[int64][]string{}
	for {
		r, err := ws.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if r.WatchId == clientv3.InvalidWatchID && len(r.Events) == 0 && !r.Created && !r.Canceled {
			if r.Header.Revision >= rev {
				return events
			}
			if err := ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_ProgressRequest{ProgressRequest: &pb.WatchProgressRequest{}}}); err != nil {
				t.Fatal(err)
			}
			continue
		}
		for _, ev := range r.Events {
			events[r.WatchId] = append(events[r.WatchId], prototext.MarshalOptions{}.Format(ev))
		}
	}
}

// TestDifferential: the same operations through a proxy with --namespace=/t1/ and straight at another etcd give
// the same answers (errors included), and the same watch events; and no key outside /t1/ ever reaches the
// namespaced proxy's etcd (a watch there over the whole keyspace, from revision 1).
func TestDifferential(t *testing.T) {
	const prefix = "/t1/"
	nsEnv := proxytest.Start(t, proxytest.Options{Proxy: func(c *proxy.Config) {
		c.Overrides.Namespace = prefix
		c.Overrides.KVCache.AuthPoll = -1
	}})
	plain := proxytest.Start(t, proxytest.Options{Proxy: func(c *proxy.Config) { c.Overrides.KVCache.AuthPoll = -1 }})
	ctx := proxytest.Timeout(t, 60*time.Second)
	sides := []*grpc.ClientConn{nsEnv.Via, plain.Direct}
	var streams []pb.Watch_WatchClient
	for _, cc := range sides {
		streams = append(streams, watchAll(t, ctx, cc))
	}
	for _, s := range differentialSteps {
		var got [2][]string
		for i, cc := range sides {
			for _, r := range s.do(ctx, cc) {
				if r.m != nil {
					r.m = normalize(r.m, s.zeroRev)
				}
				got[i] = append(got[i], r.String())
			}
		}
		if strings.Join(got[0], "\n") != strings.Join(got[1], "\n") {
			t.Errorf("%s:\nthrough the namespaced proxy:\n%s\nstraight at etcd:\n%s", s.name,
				strings.Join(got[0], "\n"), strings.Join(got[1], "\n"))
		}
	}
	rev := revision(t, ctx, plain.Direct)
	if nsRev := revision(t, ctx, nsEnv.Direct); nsRev != rev {
		t.Errorf("etcd behind the namespaced proxy is at revision %d, the other at %d", nsRev, rev)
	}
	nsEvents, plainEvents := collect(t, streams[0], rev), collect(t, streams[1], rev)
	for id := int64(0); id < int64(len(watches)); id++ {
		a, b := strings.Join(nsEvents[id], "\n"), strings.Join(plainEvents[id], "\n")
		if a != b {
			t.Errorf("watch %d (%v):\nthrough the namespaced proxy:\n%s\nstraight at etcd:\n%s", id, watches[id], a, b)
		}
	}
	if len(plainEvents[0]) == 0 {
		t.Errorf("the watch of every key saw no event")
	}
	assertConfined(t, ctx, nsEnv.Direct, rev, prefix)

	// The one known difference (overrides/README.md): etcd's check that a Txn puts no key it also deletes misses
	// a delete to the end of the keyspace ("\x00"), so etcd takes this Txn; namespaced, the delete ends at the
	// namespace's end, and etcd's check refuses it.
	tx := &pb.TxnRequest{Success: []*pb.RequestOp{opDel("p", "\x00"), opPut("q", "2")}}
	if _, err := kv(plain.Direct).Txn(ctx, tx); err != nil {
		t.Errorf("straight at etcd: delete to the end and put: %v; etcd took it when this was written", err)
	}
	if _, err := kv(nsEnv.Via).Txn(ctx, tx); err == nil || !strings.Contains(err.Error(), "duplicate key given in txn request") {
		t.Errorf("namespaced: delete to the end and put: %v; want etcd's duplicate key error", err)
	}
}

// revision is the current revision of the etcd behind cc.
func revision(t *testing.T, ctx context.Context, cc *grpc.ClientConn) int64 {
	t.Helper()
	r, err := kv(cc).Range(ctx, &pb.RangeRequest{Key: []byte("any"), CountOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	return r.Header.Revision
}

// assertConfined watches every key of the etcd behind direct from revision 1 to rev and fails for a key that
// does not start with one of prefixes.
func assertConfined(t *testing.T, ctx context.Context, direct *grpc.ClientConn, rev int64, prefixes ...string) {
	t.Helper()
	// A raw stream, drained to its end before returning: nothing of it outlives the test (goleak).
	ctx, cancel := context.WithCancel(ctx)
	ws, err := pb.NewWatchClient(direct).Watch(ctx)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	defer func() {
		cancel()
		for {
			if _, err := ws.Recv(); err != nil {
				return
			}
		}
	}()
	if err := ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{
		Key: []byte{0}, RangeEnd: []byte{0}, StartRevision: 1}}}); err != nil {
		t.Fatal(err)
	}
	for {
		r, err := ws.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if r.Canceled {
			t.Fatalf("the keyspace watch was cancelled: %s", r.CancelReason)
		}
		for _, ev := range r.Events {
			ok := false
			for _, p := range prefixes {
				ok = ok || strings.HasPrefix(string(ev.Kv.Key), p)
			}
			if !ok {
				t.Errorf("etcd saw key %q at revision %d, outside %q", ev.Kv.Key, ev.Kv.ModRevision, prefixes)
			}
			if ev.Kv.ModRevision >= rev {
				return
			}
		}
	}
}

// TestPrefixOfAnother: proxies with namespaces /t1/ and /t10/ on one etcd (the prefix end of /t1/ is /t10) never
// see each other's keys, in any keyed service: KV, Watch, LeaseTimeToLive, Election, Lock.
func TestPrefixOfAnother(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{Proxy: func(c *proxy.Config) { c.Overrides.Namespace = "/t1/" }})
	ctx := proxytest.Timeout(t, 30*time.Second)
	sides := map[string]*grpc.ClientConn{"/t1/": e.Via, "/t10/": e.AnotherProxy(t, func(c *proxy.Config) { c.Overrides.Namespace = "/t10/" })}
	watchers := map[string]pb.Watch_WatchClient{}
	for p, cc := range sides {
		ws, err := pb.NewWatchClient(cc).Watch(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{
			Key: []byte{0}, RangeEnd: []byte{0}}}}); err != nil {
			t.Fatal(err)
		}
		if r, err := ws.Recv(); err != nil || !r.Created {
			t.Fatalf("%s: watch: %v, %v", p, r, err)
		}
		watchers[p] = ws
	}
	if _, err := pb.NewLeaseClient(e.Direct).LeaseGrant(ctx, &pb.LeaseGrantRequest{ID: lease, TTL: 1000}); err != nil {
		t.Fatal(err)
	}
	locks := map[string][]byte{}
	for p, cc := range sides {
		for _, k := range []string{"a", "0", "0/a", "\xff"} {
			if _, err := kv(cc).Put(ctx, &pb.PutRequest{Key: []byte(k), Value: []byte(p), Lease: lease}); err != nil {
				t.Fatal(err)
			}
		}
		// The same election and lock names on both: each namespace has its own, so neither waits.
		c, err := v3electionpb.NewElectionClient(cc).Campaign(ctx, &v3electionpb.CampaignRequest{Name: []byte("e"),
			Lease: lease, Value: []byte(p)})
		if err != nil {
			t.Fatalf("%s: campaign: %v", p, err)
		}
		if want := fmt.Sprintf("e/%x", lease); string(c.Leader.Key) != want || string(c.Leader.Name) != "e" {
			t.Errorf("%s: campaign leader key %q name %q, want %q, e", p, c.Leader.Key, c.Leader.Name, want)
		}
		l, err := v3lockpb.NewLockClient(cc).Lock(ctx, &v3lockpb.LockRequest{Name: []byte("m"), Lease: lease})
		if err != nil {
			t.Fatalf("%s: lock: %v", p, err)
		}
		if want := fmt.Sprintf("m/%x", lease); string(l.Key) != want {
			t.Errorf("%s: lock key %q, want %q", p, l.Key, want)
		}
		locks[p] = l.Key
	}
	rev := revision(t, ctx, e.Direct)
	for p, cc := range sides {
		r, err := kv(cc).Range(ctx, &pb.RangeRequest{Key: []byte{0}, RangeEnd: []byte{0}})
		if err != nil {
			t.Fatal(err)
		}
		var keys []string
		for _, kv := range r.Kvs {
			keys = append(keys, string(kv.Key))
			if string(kv.Value) != p && !strings.HasPrefix(string(kv.Key), "e/") && !strings.HasPrefix(string(kv.Key), "m/") {
				t.Errorf("%s: key %q has value %q, written through the other proxy", p, kv.Key, kv.Value)
			}
		}
		want := []string{"0", "0/a", "a", fmt.Sprintf("e/%x", lease), fmt.Sprintf("m/%x", lease), "\xff"}
		if strings.Join(keys, " ") != strings.Join(want, " ") {
			t.Errorf("%s: every key: %q, want %q", p, keys, want)
		}
		ttl, err := pb.NewLeaseClient(cc).LeaseTimeToLive(ctx, &pb.LeaseTimeToLiveRequest{ID: lease, Keys: true})
		if err != nil {
			t.Fatal(err)
		}
		keys = keys[:0]
		for _, k := range ttl.Keys {
			keys = append(keys, string(k))
		}
		sort.Strings(keys)
		if strings.Join(keys, " ") != strings.Join(want, " ") {
			t.Errorf("%s: lease keys %q, want %q", p, keys, want)
		}
		leader, err := v3electionpb.NewElectionClient(cc).Leader(ctx, &v3electionpb.LeaderRequest{Name: []byte("e")})
		if err != nil || string(leader.Kv.Value) != p || string(leader.Kv.Key) != want[3] {
			t.Errorf("%s: leader %v, %v; want key %q value %q", p, leader, err, want[3], p)
		}
		for _, ev := range collectEvents(t, watchers[p], rev) {
			if string(ev.Kv.Value) != p && !strings.HasPrefix(string(ev.Kv.Key), "e/") && !strings.HasPrefix(string(ev.Kv.Key), "m/") {
				t.Errorf("%s: watch event for %q = %q, written through the other proxy", p, ev.Kv.Key, ev.Kv.Value)
			}
		}
		if _, err := v3lockpb.NewLockClient(cc).Unlock(ctx, &v3lockpb.UnlockRequest{Key: locks[p]}); err != nil {
			t.Fatal(err)
		}
	}
	assertConfined(t, ctx, e.Direct, revision(t, ctx, e.Direct), "/t1/", "/t10/")
}

// collectEvents reads ws's events until a progress answer at rev or later.
func collectEvents(t *testing.T, ws pb.Watch_WatchClient, rev int64) []*mvccpb.Event {
	t.Helper()
	if err := ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_ProgressRequest{ProgressRequest: &pb.WatchProgressRequest{}}}); err != nil {
		t.Fatal(err)
	}
	var evs []*mvccpb.Event
	for {
		r, err := ws.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if r.WatchId == clientv3.InvalidWatchID && len(r.Events) == 0 {
			if r.Header.Revision >= rev {
				return evs
			}
			if err := ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_ProgressRequest{ProgressRequest: &pb.WatchProgressRequest{}}}); err != nil {
				t.Fatal(err)
			}
			continue
		}
		evs = append(evs, r.Events...)
	}
}

// TestConfinedUser: with auth on, a user whose only permission is read-write on the namespace (/t1/ to its end,
// /t10) uses every keyed service through the namespaced proxy as a client of a whole etcd would: each request
// the proxy sends for it stays inside that permission. The proxy's own user (--user) has the same confinement: its
// leader probe, under the namespace, works with it.
func TestConfinedUser(t *testing.T) {
	const pw = "pw"
	e := proxytest.Start(t, proxytest.Options{
		Configure: func(c *embed.Config) { c.BcryptCost = 4 },
		BeforeProxy: func(c *embedetcd.Cluster) {
			cc := proxytest.Conn(t, c.Members[0].ClientURL)
			ctx := proxytest.Timeout(t, 10*time.Second)
			proxytest.EnableAuth(t, ctx, cc, pw, proxytest.User{Name: "u", Password: pw}, proxytest.User{Name: "p", Password: pw})
			root := proxytest.As(t, ctx, cc, "root", pw)
			auth := pb.NewAuthClient(cc)
			for _, call := range []func() error{
				func() error {
					_, err := auth.RoleAdd(root, &pb.AuthRoleAddRequest{Name: "t1"})
					return err
				},
				func() error {
					_, err := auth.RoleGrantPermission(root, &pb.AuthRoleGrantPermissionRequest{Name: "t1",
						Perm: &authpb.Permission{PermType: authpb.READWRITE, Key: []byte("/t1/"), RangeEnd: []byte("/t10")}})
					return err
				},
				func() error {
					_, err := auth.UserGrantRole(root, &pb.AuthUserGrantRoleRequest{User: "u", Role: "t1"})
					return err
				},
				func() error {
					_, err := auth.UserGrantRole(root, &pb.AuthUserGrantRoleRequest{User: "p", Role: "t1"})
					return err
				},
			} {
				if err := call(); err != nil {
					t.Fatal(err)
				}
			}
		},
		User: "p", Password: pw,
		// The read cache off: its invalidation watch needs read permission on every key, which p lacks.
		Proxy: func(c *proxy.Config) { c.Overrides.Namespace, c.Overrides.KVCache.MaxBytes = "/t1/", 0 },
	})
	ctx := proxytest.As(t, proxytest.Timeout(t, 30*time.Second), e.Via, "u", pw)
	ws, err := pb.NewWatchClient(e.Via).Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{
		Key: []byte{0}, RangeEnd: []byte{0}, PrevKv: true}}}); err != nil {
		t.Fatal(err)
	}
	if r, err := ws.Recv(); err != nil || !r.Created || r.Canceled {
		t.Fatalf("watch every key: %v, %v", r, err)
	}
	must := func(what string) func(any, error) {
		return func(_ any, err error) {
			t.Helper()
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
		}
	}
	c := kv(e.Via)
	p, err := c.Put(ctx, &pb.PutRequest{Key: []byte("a"), Value: []byte("1")})
	must("put")(p, err)
	r, err := c.Range(ctx, &pb.RangeRequest{Key: []byte{0}, RangeEnd: []byte{0}, Serializable: true})
	must("range every key")(r, err)
	if len(r.Kvs) != 1 || string(r.Kvs[0].Key) != "a" {
		t.Errorf("range every key: %v", r)
	}
	must("txn")(c.Txn(ctx, &pb.TxnRequest{Compare: []*pb.Compare{cmpVersion("\x00", "\x00", pb.Compare_GREATER, 0)},
		Success: []*pb.RequestOp{opDel("a", "\x00"), opRange("\x00", "\x00")}}))
	l, err := pb.NewLeaseClient(e.Via).LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 100})
	must("lease grant")(l, err)
	camp, err := v3electionpb.NewElectionClient(e.Via).Campaign(ctx, &v3electionpb.CampaignRequest{Name: []byte("e"),
		Lease: l.ID, Value: []byte("v")})
	must("campaign")(camp, err)
	must("leader")(v3electionpb.NewElectionClient(e.Via).Leader(ctx, &v3electionpb.LeaderRequest{Name: []byte("e")}))
	must("resign")(v3electionpb.NewElectionClient(e.Via).Resign(ctx, &v3electionpb.ResignRequest{Leader: camp.Leader}))
	lk, err := v3lockpb.NewLockClient(e.Via).Lock(ctx, &v3lockpb.LockRequest{Name: []byte("m"), Lease: l.ID})
	must("lock")(lk, err)
	must("unlock")(v3lockpb.NewLockClient(e.Via).Unlock(ctx, &v3lockpb.UnlockRequest{Key: lk.Key}))
	ttl, err := pb.NewLeaseClient(e.Via).LeaseTimeToLive(ctx, &pb.LeaseTimeToLiveRequest{ID: l.ID, Keys: true})
	must("lease time to live")(ttl, err)
	evs := 0
	for evs < 2 { // the put and the delete, at least
		r, err := ws.Recv()
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range r.Events {
			evs++
			if strings.HasPrefix(string(ev.Kv.Key), "/t1/") {
				t.Errorf("watch event key %q not stripped", ev.Kv.Key)
			}
		}
	}
	if !e.Proxy.HasLeader() {
		t.Errorf("the proxy has no leader")
	}
}
