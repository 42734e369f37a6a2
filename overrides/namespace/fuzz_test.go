package namespace

import (
	"bytes"
	"context"
	"testing"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"google.golang.org/protobuf/proto"
)

// recorder is the KV server behind the namespace in FuzzNamespace: it keeps the last request it was given and
// answers with the keys of that request (as etcd would return them: namespaced), keeping its answer to check that
// the namespace does not change it (the read cache shares its answers between clients).
type recorder struct {
	pb.KVServer
	req  proto.Message
	resp proto.Message
	orig proto.Message // a copy of resp as it was sent
}

func (r *recorder) answer(req, resp proto.Message) {
	r.req, r.resp, r.orig = req, resp, proto.Clone(resp)
}

func echoKV(k []byte) *mvccpb.KeyValue {
	return &mvccpb.KeyValue{Key: k, Value: []byte("v"), ModRevision: 1}
}

func (r *recorder) Range(_ context.Context, req *pb.RangeRequest) (*pb.RangeResponse, error) {
	resp := echoRange(req)
	r.answer(req, resp)
	return resp, nil
}

func (r *recorder) Txn(_ context.Context, req *pb.TxnRequest) (*pb.TxnResponse, error) {
	resp := echoTxn(req)
	r.answer(req, resp)
	return resp, nil
}

func echoRange(req *pb.RangeRequest) *pb.RangeResponse {
	return &pb.RangeResponse{Kvs: []*mvccpb.KeyValue{echoKV(req.Key)}, Count: 1}
}

func echoTxn(req *pb.TxnRequest) *pb.TxnResponse {
	resp := &pb.TxnResponse{Succeeded: true}
	for _, op := range req.Success {
		var r *pb.ResponseOp
		switch o := op.GetRequest().(type) {
		case *pb.RequestOp_RequestRange:
			r = &pb.ResponseOp{Response: &pb.ResponseOp_ResponseRange{ResponseRange: echoRange(o.RequestRange)}}
		case *pb.RequestOp_RequestPut:
			r = &pb.ResponseOp{Response: &pb.ResponseOp_ResponsePut{ResponsePut: &pb.PutResponse{
				PrevKv: echoKV(o.RequestPut.Key)}}}
		case *pb.RequestOp_RequestDeleteRange:
			r = &pb.ResponseOp{Response: &pb.ResponseOp_ResponseDeleteRange{ResponseDeleteRange: &pb.DeleteRangeResponse{
				Deleted: 1, PrevKvs: []*mvccpb.KeyValue{echoKV(o.RequestDeleteRange.Key)}}}}
		case *pb.RequestOp_RequestTxn:
			r = &pb.ResponseOp{Response: &pb.ResponseOp_ResponseTxn{ResponseTxn: echoTxn(o.RequestTxn)}}
		default:
			r = &pb.ResponseOp{}
		}
		resp.Responses = append(resp.Responses, r)
	}
	return resp
}

// shape builds a Txn from fuzz bytes: compares, operations of every kind and nested Txns, on keys from a pool.
type shape struct {
	b    []byte
	keys [][]byte
}

func (s *shape) next() int {
	if len(s.b) == 0 {
		return 0
	}
	c := s.b[0]
	s.b = s.b[1:]
	return int(c)
}

func (s *shape) key() []byte { return s.keys[s.next()%len(s.keys)] }

func (s *shape) txn(depth int) *pb.TxnRequest {
	r := &pb.TxnRequest{}
	for i := s.next() % 4; i > 0; i-- {
		r.Compare = append(r.Compare, &pb.Compare{Key: s.key(), RangeEnd: s.key(), Target: pb.Compare_VERSION})
	}
	for _, ops := range []*[]*pb.RequestOp{&r.Success, &r.Failure} {
		for i := s.next() % 4; i > 0; i-- {
			var op *pb.RequestOp
			switch s.next() % 5 {
			case 0:
				op = &pb.RequestOp{Request: &pb.RequestOp_RequestRange{RequestRange: &pb.RangeRequest{Key: s.key(), RangeEnd: s.key()}}}
			case 1:
				op = &pb.RequestOp{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: s.key(), Value: []byte("x")}}}
			case 2:
				op = &pb.RequestOp{Request: &pb.RequestOp_RequestDeleteRange{RequestDeleteRange: &pb.DeleteRangeRequest{
					Key: s.key(), RangeEnd: s.key()}}}
			case 3:
				if depth < 3 {
					op = &pb.RequestOp{Request: &pb.RequestOp_RequestTxn{RequestTxn: s.txn(depth + 1)}}
				}
			}
			if op == nil {
				op = &pb.RequestOp{}
			}
			*ops = append(*ops, op)
		}
	}
	return r
}

// intervals lists every [key, end) of a Txn in a fixed order: compares, then operations, nested Txns in place.
func intervals(r *pb.TxnRequest) (out [][2][]byte) {
	for _, c := range r.Compare {
		out = append(out, [2][]byte{c.Key, c.RangeEnd})
	}
	for _, ops := range [][]*pb.RequestOp{r.Success, r.Failure} {
		for _, op := range ops {
			switch o := op.GetRequest().(type) {
			case *pb.RequestOp_RequestRange:
				out = append(out, [2][]byte{o.RequestRange.Key, o.RequestRange.RangeEnd})
			case *pb.RequestOp_RequestPut:
				out = append(out, [2][]byte{o.RequestPut.Key, nil})
			case *pb.RequestOp_RequestDeleteRange:
				out = append(out, [2][]byte{o.RequestDeleteRange.Key, o.RequestDeleteRange.RangeEnd})
			case *pb.RequestOp_RequestTxn:
				out = append(out, intervals(o.RequestTxn)...)
			}
		}
	}
	return out
}

// responseKeys lists every key of a Txn response in order.
func responseKeys(r *pb.TxnResponse) (out [][]byte) {
	for _, op := range r.Responses {
		switch o := op.GetResponse().(type) {
		case *pb.ResponseOp_ResponseRange:
			for _, kv := range o.ResponseRange.Kvs {
				out = append(out, kv.Key)
			}
		case *pb.ResponseOp_ResponsePut:
			out = append(out, o.ResponsePut.PrevKv.Key)
		case *pb.ResponseOp_ResponseDeleteRange:
			for _, kv := range o.ResponseDeleteRange.PrevKvs {
				out = append(out, kv.Key)
			}
		case *pb.ResponseOp_ResponseTxn:
			out = append(out, responseKeys(o.ResponseTxn)...)
		}
	}
	return out
}

// in reports whether etcd's [k, e) holds x: a single key for an empty e, every key from k for "\x00".
func in(k, e, x []byte) bool {
	switch {
	case len(e) == 0:
		return bytes.Equal(x, k)
	case len(e) == 1 && e[0] == 0:
		return bytes.Compare(x, k) >= 0
	default:
		return bytes.Compare(x, k) >= 0 && bytes.Compare(x, e) < 0
	}
}

// checkInterval: the namespaced [nk, ne) of a client's [k, e) holds exactly the namespaced keys of [k, e), and
// no key outside the namespace; every key etcd is given starts with the prefix (the empty key, which etcd refuses,
// stays empty).
func checkInterval(t *testing.T, n prefix, k, e, nk, ne, probe []byte, what string) {
	t.Helper()
	if len(k) == 0 {
		if len(nk) != 0 {
			t.Fatalf("%s: empty key became %q", what, nk)
		}
		return // etcd refuses it, whatever the range end
	}
	if !bytes.HasPrefix(nk, n.p) {
		t.Fatalf("%s: key %q reached etcd as %q, outside %q", what, k, nk, n.p)
	}
	if len(ne) != 0 && !bytes.HasPrefix(ne, n.p) && !bytes.Equal(ne, n.end) {
		t.Fatalf("%s: range end %q reached etcd as %q, neither under %q nor its end %q", what, e, ne, n.p, n.end)
	}
	for _, x := range [][]byte{probe, k, e, append(append([]byte(nil), k...), 0), {0}, {0xff}} {
		if len(x) == 0 {
			continue
		}
		if got, want := in(nk, ne, n.join(x)), in(k, e, x); got != want {
			t.Fatalf("%s: [%q, %q) holds %q: %v, but namespaced [%q, %q) holds %q: %v", what, k, e, x, want, nk, ne,
				n.join(x), got)
		}
	}
	for _, y := range [][]byte{probe, n.p, n.end, append(append([]byte(nil), n.end...), probe...)} {
		if !n.inside(y) && in(nk, ne, y) {
			t.Fatalf("%s: namespaced [%q, %q) of [%q, %q) holds %q, outside %q", what, nk, ne, k, e, y, n.p)
		}
	}
}

// FuzzNamespace: for random prefixes, keys, range ends, compares and Txn shapes, every key etcd is given starts
// with the prefix, each namespaced range holds exactly the namespaced keys of the client's range and nothing outside
// the namespace, every key returned is stripped, and etcd's answers are left as they were. Watch ranges and
// LeaseTimeToLive keys too. The seed corpus (testdata/fuzz/FuzzNamespace) runs with every go test.
func FuzzNamespace(f *testing.F) {
	f.Add("/t1/", []byte("a"), []byte{0}, []byte("b"), []byte{3, 1, 2, 0, 1, 4, 3, 2, 1, 2, 3, 1, 2})
	f.Add("/t1", []byte("0"), []byte("1"), []byte("0/x"), []byte{1, 2, 3, 2, 0, 1, 2, 3})
	f.Add("\xff\xff", []byte("\xff"), []byte{0}, []byte("\xff\xff"), []byte{2, 0, 3, 1, 3, 1, 2})
	f.Fuzz(func(t *testing.T, p string, key, end, probe, txnShape []byte) {
		if p == "" {
			t.Skip("no namespace")
		}
		n := newPrefix(p)
		rec := &recorder{}
		k := NewKV(rec, p)
		ctx := context.Background()

		// Range.
		req := &pb.RangeRequest{Key: bytes.Clone(key), RangeEnd: bytes.Clone(end)}
		resp, err := k.Range(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		sent := rec.req.(*pb.RangeRequest)
		checkInterval(t, n, key, end, sent.Key, sent.RangeEnd, probe, "range")
		if !bytes.Equal(resp.Kvs[0].Key, key) {
			t.Fatalf("range answered key %q for %q", resp.Kvs[0].Key, key)
		}
		if !proto.Equal(rec.resp, rec.orig) {
			t.Fatalf("the namespace changed etcd's answer: %v, was %v", rec.resp, rec.orig)
		}

		// Txn.
		s := &shape{b: txnShape, keys: [][]byte{key, end, probe, nil, {0}, {0xff}, append(bytes.Clone(key), 0)}}
		treq := s.txn(0)
		orig := proto.Clone(treq).(*pb.TxnRequest)
		tresp, err := k.Txn(ctx, treq)
		if err != nil {
			t.Fatal(err)
		}
		want, got := intervals(orig), intervals(rec.req.(*pb.TxnRequest))
		if len(want) != len(got) {
			t.Fatalf("txn: %d keys sent, client gave %d", len(got), len(want))
		}
		for i := range want {
			checkInterval(t, n, want[i][0], want[i][1], got[i][0], got[i][1], probe, "txn")
		}
		if !proto.Equal(rec.resp, rec.orig) {
			t.Fatalf("the namespace changed etcd's txn answer")
		}
		etcdKeys, clientKeys := responseKeys(rec.resp.(*pb.TxnResponse)), responseKeys(tresp)
		if len(etcdKeys) != len(clientKeys) {
			t.Fatalf("txn: %d keys returned, etcd gave %d", len(clientKeys), len(etcdKeys))
		}
		for i := range etcdKeys {
			if len(etcdKeys[i]) > 0 && !bytes.Equal(n.join(clientKeys[i]), etcdKeys[i]) {
				t.Fatalf("txn: etcd's key %q returned as %q", etcdKeys[i], clientKeys[i])
			}
		}

		// Watch: etcd takes the empty key as "\x00".
		wk, we := n.watchInterval(bytes.Clone(key), bytes.Clone(end))
		ck := key
		if len(ck) == 0 {
			ck = []byte{0}
		}
		checkInterval(t, n, ck, end, wk, we, probe, "watch")
		wresp := &pb.WatchResponse{Events: []*mvccpb.Event{{Kv: echoKV(wk), PrevKv: echoKV(wk)}}}
		worig := proto.Clone(wresp)
		stripped := n.watchResponse(wresp)
		if !bytes.Equal(stripped.Events[0].Kv.Key, ck) || !bytes.Equal(stripped.Events[0].PrevKv.Key, ck) {
			t.Fatalf("watch event key %q returned as %q", wk, stripped.Events[0].Kv.Key)
		}
		if !proto.Equal(wresp, worig) {
			t.Fatalf("the namespace changed etcd's watch response")
		}

		// LeaseTimeToLive: keys outside the namespace are left out, the others stripped.
		lease := NewLease(leaseKeys{keys: [][]byte{n.join(probe), probe, n.p, n.end}}, p)
		ttl, err := lease.LeaseTimeToLive(ctx, &pb.LeaseTimeToLiveRequest{Keys: true})
		if err != nil {
			t.Fatal(err)
		}
		var wantKeys [][]byte
		if len(probe) > 0 {
			wantKeys = append(wantKeys, probe)
		}
		if n.inside(probe) {
			wantKeys = append(wantKeys, n.strip(probe))
		}
		if len(ttl.Keys) != len(wantKeys) {
			t.Fatalf("lease keys %q, want %q", ttl.Keys, wantKeys)
		}
		for i := range wantKeys {
			if !bytes.Equal(ttl.Keys[i], wantKeys[i]) {
				t.Fatalf("lease keys %q, want %q", ttl.Keys, wantKeys)
			}
		}
	})
}

// leaseKeys answers LeaseTimeToLive with its keys.
type leaseKeys struct {
	pb.LeaseServer
	keys [][]byte
}

func (l leaseKeys) LeaseTimeToLive(context.Context, *pb.LeaseTimeToLiveRequest) (*pb.LeaseTimeToLiveResponse, error) {
	return &pb.LeaseTimeToLiveResponse{Keys: l.keys}, nil
}
