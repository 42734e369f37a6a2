package txn

import (
	"testing"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
)

func TestClassification(t *testing.T) {
	rng := func(serializable bool) *pb.RequestOp {
		return &pb.RequestOp{Request: &pb.RequestOp_RequestRange{RequestRange: &pb.RangeRequest{Key: []byte("k"), Serializable: serializable}}}
	}
	put := &pb.RequestOp{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: []byte("k")}}}
	del := &pb.RequestOp{Request: &pb.RequestOp_RequestDeleteRange{RequestDeleteRange: &pb.DeleteRangeRequest{Key: []byte("k")}}}
	nested := func(r *pb.TxnRequest) *pb.RequestOp {
		return &pb.RequestOp{Request: &pb.RequestOp_RequestTxn{RequestTxn: r}}
	}
	for _, c := range []struct {
		name          string
		r             *pb.TxnRequest
		local, writes bool
	}{
		{"empty", &pb.TxnRequest{}, true, false},
		{"serializable ranges", &pb.TxnRequest{Success: []*pb.RequestOp{rng(true)}, Failure: []*pb.RequestOp{rng(true)}}, true, false},
		{"a linearizable range", &pb.TxnRequest{Success: []*pb.RequestOp{rng(true), rng(false)}}, false, false},
		{"a put in failure", &pb.TxnRequest{Success: []*pb.RequestOp{rng(true)}, Failure: []*pb.RequestOp{put}}, false, true},
		{"a delete", &pb.TxnRequest{Success: []*pb.RequestOp{del}}, false, true},
		{"a nested read-only txn", &pb.TxnRequest{Success: []*pb.RequestOp{nested(&pb.TxnRequest{Success: []*pb.RequestOp{rng(true)}})}}, false, false},
		{"a nested write", &pb.TxnRequest{Failure: []*pb.RequestOp{nested(&pb.TxnRequest{Failure: []*pb.RequestOp{put}})}}, false, true},
	} {
		if got := Local(c.r); got != c.local {
			t.Errorf("%s: Local = %v, want %v", c.name, got, c.local)
		}
		if got := Writes(c.r); got != c.writes {
			t.Errorf("%s: Writes = %v, want %v", c.name, got, c.writes)
		}
	}
}
