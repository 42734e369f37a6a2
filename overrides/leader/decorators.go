package leader

// KV and Lease replace nothing a client can see: they call the service they wrap and, when an RPC that must go
// through consensus succeeds (Put, DeleteRange, Txn, Compact, linearizable Range, LeaseGrant, LeaseRevoke), tell
// the Tracker that the cluster has a leader.

import (
	"context"

	"github.com/etcdproxy/etcdproxy/overrides/internal/txn"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
)

// KV marks the leader present after consensus KV calls.
type KV struct {
	pb.KVServer
	tracker *Tracker
}

// NewKV wraps base.
func NewKV(base pb.KVServer, t *Tracker) *KV { return &KV{KVServer: base, tracker: t} }

// mark marks the leader present when err is nil and consensus was involved.
func (k *KV) mark(err error, consensus bool) {
	if err == nil && consensus {
		k.tracker.MarkPresent()
	}
}

// Range forwards the call; a linearizable Range needs the leader's read index.
func (k *KV) Range(ctx context.Context, req *pb.RangeRequest) (*pb.RangeResponse, error) {
	resp, err := k.KVServer.Range(ctx, req)
	k.mark(err, !req.Serializable)
	return resp, err
}

// Put forwards the call.
func (k *KV) Put(ctx context.Context, req *pb.PutRequest) (*pb.PutResponse, error) {
	resp, err := k.KVServer.Put(ctx, req)
	k.mark(err, true)
	return resp, err
}

// DeleteRange forwards the call.
func (k *KV) DeleteRange(ctx context.Context, req *pb.DeleteRangeRequest) (*pb.DeleteRangeResponse, error) {
	resp, err := k.KVServer.DeleteRange(ctx, req)
	k.mark(err, true)
	return resp, err
}

// Txn forwards the call; like etcd, a Txn made only of serializable reads is served locally.
func (k *KV) Txn(ctx context.Context, req *pb.TxnRequest) (*pb.TxnResponse, error) {
	resp, err := k.KVServer.Txn(ctx, req)
	k.mark(err, !txn.Local(req))
	return resp, err
}

// Compact forwards the call.
func (k *KV) Compact(ctx context.Context, req *pb.CompactionRequest) (*pb.CompactionResponse, error) {
	resp, err := k.KVServer.Compact(ctx, req)
	k.mark(err, true)
	return resp, err
}

// Lease marks the leader present after LeaseGrant and LeaseRevoke.
type Lease struct {
	pb.LeaseServer
	tracker *Tracker
}

// NewLease wraps base.
func NewLease(base pb.LeaseServer, t *Tracker) *Lease { return &Lease{LeaseServer: base, tracker: t} }

// LeaseGrant forwards the call.
func (l *Lease) LeaseGrant(ctx context.Context, req *pb.LeaseGrantRequest) (*pb.LeaseGrantResponse, error) {
	resp, err := l.LeaseServer.LeaseGrant(ctx, req)
	if err == nil {
		l.tracker.MarkPresent()
	}
	return resp, err
}

// LeaseRevoke forwards the call.
func (l *Lease) LeaseRevoke(ctx context.Context, req *pb.LeaseRevokeRequest) (*pb.LeaseRevokeResponse, error) {
	resp, err := l.LeaseServer.LeaseRevoke(ctx, req)
	if err == nil {
		l.tracker.MarkPresent()
	}
	return resp, err
}
