// Package txn says what etcd does with a Txn request, for the overrides that treat reads and writes apart. It holds
// no state and touches nothing upstream.
package txn

import pb "go.etcd.io/etcd/api/v3/etcdserverpb"

// Local reports whether etcd serves r from the member's own store, without consensus: every operation of both
// branches is a serializable Range (a nested Txn makes it not read-only for etcd).
func Local(r *pb.TxnRequest) bool {
	for _, ops := range [][]*pb.RequestOp{r.Success, r.Failure} {
		for _, op := range ops {
			if rr := op.GetRequestRange(); rr == nil || !rr.Serializable {
				return false
			}
		}
	}
	return true
}

// Writes reports whether r may write: a Put or a DeleteRange in either branch, nested Txns included.
func Writes(r *pb.TxnRequest) bool {
	for _, ops := range [][]*pb.RequestOp{r.Success, r.Failure} {
		for _, op := range ops {
			switch {
			case op.GetRequestPut() != nil, op.GetRequestDeleteRange() != nil:
				return true
			case op.GetRequestTxn() != nil && Writes(op.GetRequestTxn()):
				return true
			}
		}
	}
	return false
}
