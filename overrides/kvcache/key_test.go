package kvcache

import (
	"bytes"
	"context"
	"math"
	"math/rand/v2"
	"testing"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
)

// TestCacheKey: the cache key is the caller's token and authorization metadata, each ended by a zero byte, and the
// request's deterministic encoding (as it was built before appendRequest), with and without credentials, long
// ones included, and for requests with fields this etcd does not know.
func TestCacheKey(t *testing.T) {
	unknown := &pb.RangeRequest{Key: []byte("k"), Serializable: true}
	unknown.ProtoReflect().SetUnknown([]byte{0xa0, 0x06, 0x01}) // field 100, varint 1
	long := string(bytes.Repeat([]byte("t"), 300))
	for _, md := range []metadata.MD{nil, metadata.Pairs("token", "tok"), metadata.Pairs("authorization", "auth"),
		metadata.Pairs("token", long, "authorization", "auth", "user-agent", "x")} {
		for _, r := range []*pb.RangeRequest{{}, {Key: []byte("k"), RangeEnd: []byte("\x00"), Serializable: true, Limit: 3},
			unknown} {
			ctx := metadata.NewIncomingContext(context.Background(), md)
			key, creds, ok := cacheKey(ctx, r)
			enc, err := proto.MarshalOptions{Deterministic: true}.Marshal(r)
			if err != nil {
				t.Fatal(err)
			}
			want := creds.Token + "\x00" + creds.Authorization + "\x00" + string(enc)
			if !ok || key != want || creds.Token != first(md, "token") || creds.Authorization != first(md, "authorization") {
				t.Errorf("metadata %v, request %v: key %q (%v), creds %+v; want %q", md, r, key, ok, creds, want)
			}
		}
	}
}

func first(md metadata.MD, k string) string {
	if v := md.Get(k); len(v) > 0 {
		return v[0]
	}
	return ""
}

// TestRequestKey: appendRequest writes what proto's deterministic encoding makes of a RangeRequest, for random
// requests (zero, small, large and negative numbers, nil, empty and long keys); a RangeRequest field it does not
// write fails the test, so that a new field cannot fall out of the cache key.
func TestRequestKey(t *testing.T) {
	if n := (&pb.RangeRequest{}).ProtoReflect().Descriptor().Fields().Len(); n != requestFields {
		t.Fatalf("RangeRequest has %d fields, appendRequest writes %d: write the new ones", n, requestFields)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	num := func() int64 {
		switch rng.IntN(5) {
		case 0:
			return 0
		case 1:
			return rng.Int64N(200)
		case 2:
			return -rng.Int64N(200)
		case 3:
			return math.MinInt64 + rng.Int64N(2)
		}
		return rng.Int64()
	}
	bs := func() []byte {
		switch rng.IntN(4) {
		case 0:
			return nil
		case 1:
			return []byte{}
		case 2:
			return []byte{0}
		}
		b := make([]byte, rng.IntN(300))
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	for range 5000 {
		r := &pb.RangeRequest{Key: bs(), RangeEnd: bs(), Limit: num(), Revision: num(),
			SortOrder: pb.RangeRequest_SortOrder(num() % 4), SortTarget: pb.RangeRequest_SortTarget(int32(num())),
			Serializable: rng.IntN(2) == 0, KeysOnly: rng.IntN(2) == 0, CountOnly: rng.IntN(2) == 0,
			MinModRevision: num(), MaxModRevision: num(), MinCreateRevision: num(), MaxCreateRevision: num()}
		want, err := proto.MarshalOptions{Deterministic: true}.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		if got := appendRequest([]byte("prefix"), r); !bytes.Equal(got[len("prefix"):], want) {
			t.Fatalf("%v: appendRequest wrote %x, proto %x", r, got[len("prefix"):], want)
		}
	}
}
