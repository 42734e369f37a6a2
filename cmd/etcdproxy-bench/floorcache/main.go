// Command floorcache is a measuring stick, not a cache: the thinnest gRPC-Go server that answers a serializable
// Range from memory. The first time it sees a request's bytes it forwards the call to etcd (through the raw relay
// of floorrelay) and keeps etcd's encoded response; from then on the same request bytes get those response bytes,
// with no decoding, no lookup structure beyond one map, no invalidation, no revision or permission check. Its
// answers go stale at the first write: it is only run on the benchmark's cache-hit workload (a fixed key set,
// preloaded, read serializably, never written), where its cost is the floor of any gRPC-Go cache hit on the
// machine, and the report's etcdproxy/floor column divides etcdproxy's cache hits by it. Every other call, and
// every linearizable Range, is relayed as floorrelay relays it.
//
// It takes the arguments the benchmark gives a proxy: `floorcache start --endpoints=HOST:PORT --listen-addr=HOST:PORT
// [--data-dir=...]`, and `floorcache version`.
//
// It must not grow any of etcdproxy's logic: what it adds to floorrelay is the least a cache hit can cost.
package main

import (
	"context"
	"sync"

	"github.com/etcdproxy/etcdproxy/cmd/etcdproxy-bench/internal/floor"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/encoding/protowire"
)

func main() {
	floor.Main("floorcache", "answers repeated serializable Ranges with stored response bytes, never invalidated "+
		"(the floor of a gRPC-Go cache hit)", register)
}

const rangeMethod = "/etcdserverpb.KV/Range"

// maxEntries bounds the map, should the device be pointed at a workload it was not made for; past it, reads are
// relayed and not kept.
const maxEntries = 100_000

// store is the map of request bytes to etcd's response bytes.
type store struct {
	cc *grpc.ClientConn

	mu sync.RWMutex // mu protects m
	m  map[string][]byte
}

// register serves etcdserverpb.KV/Range from the store; KV's other methods have no handler here, so gRPC hands
// them to the relay (its unknown-method fallback), as it does every other service.
func register(srv *grpc.Server, cc *grpc.ClientConn) {
	s := &store{cc: cc, m: map[string][]byte{}}
	srv.RegisterService(&grpc.ServiceDesc{
		ServiceName: "etcdserverpb.KV",
		HandlerType: (*any)(nil),
		Methods:     []grpc.MethodDesc{{MethodName: "Range", Handler: s.rangeHandler}},
	}, s)
}

// rangeHandler is a unary handler, as generated code registers (etcdproxy's own Range is one), so that a hit takes
// the same gRPC path as etcdproxy's hit.
func (s *store) rangeHandler(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
	req := &floor.Frame{}
	if err := dec(req); err != nil {
		return nil, err
	}
	s.mu.RLock()
	resp, ok := s.m[string(req.B)]
	s.mu.RUnlock()
	if ok {
		return &floor.Frame{B: resp}, nil
	}
	md, _ := metadata.FromIncomingContext(ctx)
	out := &floor.Frame{}
	if err := s.cc.Invoke(metadata.NewOutgoingContext(ctx, md), rangeMethod, req, out); err != nil {
		return nil, err
	}
	if serializable(req.B) {
		s.mu.Lock()
		if len(s.m) < maxEntries {
			s.m[string(req.B)] = out.B
		}
		s.mu.Unlock()
	}
	return out, nil
}

// serializable reports whether an encoded RangeRequest asks for a serializable read (field 7, a bool): only those
// may be answered without etcd, even by a floor.
func serializable(b []byte) bool {
	const field = 7
	set := false
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return false
		}
		b = b[n:]
		if num == field && typ == protowire.VarintType {
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return false
			}
			set, b = v != 0, b[n:] // the last occurrence wins, as in proto decoding
			continue
		}
		if n = protowire.ConsumeFieldValue(num, typ, b); n < 0 {
			return false
		}
		b = b[n:]
	}
	return set
}
