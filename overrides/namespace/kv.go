package namespace

import (
	"context"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
)

// KV confines the KV service to the namespace. Compact has no keys and falls through.
type KV struct {
	pb.KVServer
	ns prefix
}

// NewKV wraps base in the namespace prefix.
func NewKV(base pb.KVServer, prefix string) *KV { return &KV{KVServer: base, ns: newPrefix(prefix)} }

// Range prefixes the range and strips the keys of the answer.
func (k *KV) Range(ctx context.Context, req *pb.RangeRequest) (*pb.RangeResponse, error) {
	k.ns.rangeRequest(req)
	resp, err := k.KVServer.Range(ctx, req)
	if err != nil {
		return nil, err
	}
	return k.ns.rangeResponse(resp), nil
}

// RangeStream prefixes the range and strips the keys of every part of the answer.
func (k *KV) RangeStream(req *pb.RangeRequest, stream grpc.ServerStreamingServer[pb.RangeStreamResponse]) error {
	k.ns.rangeRequest(req)
	return k.KVServer.RangeStream(req, &rangeStream{ServerStreamingServer: stream, ns: k.ns})
}

type rangeStream struct {
	grpc.ServerStreamingServer[pb.RangeStreamResponse]
	ns prefix
}

func (s *rangeStream) Send(resp *pb.RangeStreamResponse) error {
	if resp.RangeResponse != nil && len(resp.RangeResponse.Kvs) > 0 {
		c := shallow(resp)
		c.RangeResponse = s.ns.rangeResponse(resp.RangeResponse)
		resp = c
	}
	return s.ServerStreamingServer.Send(resp)
}

// Put prefixes the key and strips the previous key-value.
func (k *KV) Put(ctx context.Context, req *pb.PutRequest) (*pb.PutResponse, error) {
	k.ns.putRequest(req)
	resp, err := k.KVServer.Put(ctx, req)
	if err != nil {
		return nil, err
	}
	return k.ns.putResponse(resp), nil
}

// DeleteRange prefixes the range and strips the previous key-values.
func (k *KV) DeleteRange(ctx context.Context, req *pb.DeleteRangeRequest) (*pb.DeleteRangeResponse, error) {
	k.ns.deleteRequest(req)
	resp, err := k.KVServer.DeleteRange(ctx, req)
	if err != nil {
		return nil, err
	}
	return k.ns.deleteResponse(resp), nil
}

// Txn prefixes every compare and operation, nested Txns included, and strips every response.
func (k *KV) Txn(ctx context.Context, req *pb.TxnRequest) (*pb.TxnResponse, error) {
	k.ns.txnRequest(req)
	resp, err := k.KVServer.Txn(ctx, req)
	if err != nil {
		return nil, err
	}
	return k.ns.txnResponse(resp), nil
}

func (n prefix) rangeRequest(r *pb.RangeRequest) {
	if r != nil {
		r.Key, r.RangeEnd = n.interval(r.Key, r.RangeEnd)
	}
}

func (n prefix) putRequest(r *pb.PutRequest) {
	if r != nil {
		r.Key = n.key(r.Key)
	}
}

func (n prefix) deleteRequest(r *pb.DeleteRangeRequest) {
	if r != nil {
		r.Key, r.RangeEnd = n.interval(r.Key, r.RangeEnd)
	}
}

func (n prefix) txnRequest(r *pb.TxnRequest) {
	if r == nil {
		return
	}
	for _, c := range r.Compare {
		if c != nil {
			c.Key, c.RangeEnd = n.interval(c.Key, c.RangeEnd)
		}
	}
	for _, ops := range [][]*pb.RequestOp{r.Success, r.Failure} {
		for _, op := range ops {
			switch o := op.GetRequest().(type) {
			case *pb.RequestOp_RequestRange:
				n.rangeRequest(o.RequestRange)
			case *pb.RequestOp_RequestPut:
				n.putRequest(o.RequestPut)
			case *pb.RequestOp_RequestDeleteRange:
				n.deleteRequest(o.RequestDeleteRange)
			case *pb.RequestOp_RequestTxn:
				n.txnRequest(o.RequestTxn)
			}
		}
	}
}

func (n prefix) rangeResponse(r *pb.RangeResponse) *pb.RangeResponse {
	if r == nil || len(r.Kvs) == 0 {
		return r
	}
	c := shallow(r)
	c.Kvs = n.kvs(r.Kvs)
	return c
}

func (n prefix) putResponse(r *pb.PutResponse) *pb.PutResponse {
	if r == nil || r.PrevKv == nil {
		return r
	}
	c := shallow(r)
	c.PrevKv = n.kv(r.PrevKv)
	return c
}

func (n prefix) deleteResponse(r *pb.DeleteRangeResponse) *pb.DeleteRangeResponse {
	if r == nil || len(r.PrevKvs) == 0 {
		return r
	}
	c := shallow(r)
	c.PrevKvs = n.kvs(r.PrevKvs)
	return c
}

func (n prefix) txnResponse(r *pb.TxnResponse) *pb.TxnResponse {
	if r == nil || len(r.Responses) == 0 {
		return r
	}
	c := shallow(r)
	c.Responses = make([]*pb.ResponseOp, len(r.Responses))
	for i, op := range r.Responses {
		switch o := op.GetResponse().(type) {
		case *pb.ResponseOp_ResponseRange:
			op = shallow(op)
			op.Response = &pb.ResponseOp_ResponseRange{ResponseRange: n.rangeResponse(o.ResponseRange)}
		case *pb.ResponseOp_ResponsePut:
			op = shallow(op)
			op.Response = &pb.ResponseOp_ResponsePut{ResponsePut: n.putResponse(o.ResponsePut)}
		case *pb.ResponseOp_ResponseDeleteRange:
			op = shallow(op)
			op.Response = &pb.ResponseOp_ResponseDeleteRange{ResponseDeleteRange: n.deleteResponse(o.ResponseDeleteRange)}
		case *pb.ResponseOp_ResponseTxn:
			op = shallow(op)
			op.Response = &pb.ResponseOp_ResponseTxn{ResponseTxn: n.txnResponse(o.ResponseTxn)}
		}
		c.Responses[i] = op
	}
	return c
}
