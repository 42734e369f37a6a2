package main

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/cmd/etcdproxy-bench/internal/floor"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

func serve(t *testing.T, srv *grpc.Server) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	return l.Addr().String()
}

func dial(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	cc, err := floor.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// TestRepeatedSerializableRangeSkipsEtcd: the first serializable Range of some request bytes goes to etcd, the
// next ones get etcd's bytes back without it; linearizable Ranges and other methods always go to etcd.
func TestRepeatedSerializableRangeSkipsEtcd(t *testing.T) {
	var calls atomic.Int64
	// A stand-in for etcd: answers any call with "from etcd:" and the method's request bytes.
	etcd := grpc.NewServer(grpc.ForceServerCodec(floor.Codec{}), grpc.UnknownServiceHandler(
		func(_ any, ss grpc.ServerStream) error {
			calls.Add(1)
			f := &floor.Frame{}
			if err := ss.RecvMsg(f); err != nil {
				return err
			}
			return ss.SendMsg(&floor.Frame{B: append([]byte("from etcd:"), f.B...)})
		}))
	up := dial(t, serve(t, etcd))
	client := dial(t, serve(t, floor.NewServer(up, func(s *grpc.Server) { register(s, up) })))

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	call := func(method string, m proto.Message) string {
		t.Helper()
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		out := &floor.Frame{}
		if err := client.Invoke(ctx, method, &floor.Frame{B: b}, out); err != nil {
			t.Fatalf("%s: %v", method, err)
		}
		return string(out.B)
	}
	ser := &pb.RangeRequest{Key: []byte("k"), Serializable: true}
	lin := &pb.RangeRequest{Key: []byte("k")}
	for range 3 {
		call(rangeMethod, ser)
	}
	if n := calls.Load(); n != 1 {
		t.Fatalf("3 identical serializable Ranges: etcd called %d times, want 1", n)
	}
	first, again := call(rangeMethod, ser), call(rangeMethod, ser)
	if first != again || first[:len("from etcd:")] != "from etcd:" {
		t.Fatalf("stored answer %q, then %q", first, again)
	}
	call(rangeMethod, lin)
	call(rangeMethod, lin)
	call("/etcdserverpb.KV/Put", &pb.PutRequest{Key: []byte("k")})
	if n := calls.Load(); n != 4 {
		t.Fatalf("after 2 linearizable Ranges and a Put: etcd called %d times, want 4", n)
	}
}

func TestSerializable(t *testing.T) {
	enc := func(m proto.Message) []byte {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, tc := range []struct {
		name string
		b    []byte
		want bool
	}{
		{"serializable", enc(&pb.RangeRequest{Key: []byte("a"), RangeEnd: []byte("b"), Limit: 3, Serializable: true, KeysOnly: true}), true},
		{"linearizable", enc(&pb.RangeRequest{Key: []byte("a"), Limit: 3, KeysOnly: true}), false},
		{"empty", nil, false},
		{"last occurrence wins", append(enc(&pb.RangeRequest{Serializable: true}), 7<<3, 0), false},
		{"truncated", enc(&pb.RangeRequest{Key: []byte("abc"), Serializable: true})[:3], false},
	} {
		if got := serializable(tc.b); got != tc.want {
			t.Errorf("%s: serializable = %v, want %v", tc.name, got, tc.want)
		}
	}
}
