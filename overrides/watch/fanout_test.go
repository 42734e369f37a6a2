package watch_test

import (
	"bytes"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/overrides/watch"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	gproto "google.golang.org/protobuf/proto"
)

// rawCodec is the client's proto codec, recording the bytes of every message it decodes.
type rawCodec struct {
	encoding.CodecV2
	mu  sync.Mutex
	raw [][]byte
}

func (c *rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	c.mu.Lock()
	c.raw = append(c.raw, data.Materialize())
	c.mu.Unlock()
	return c.CodecV2.Unmarshal(data, v)
}

// TestFanOutSharesEncoding: watchers of one range on two streams (watch ids 0, 1 and 2 on one, 0 on the other; id 2
// filters puts) get each event response as the fan-out's shared parts around their watch id, and what they get
// is what etcd sends a watcher straight on it (the same responses) and byte for byte what gRPC's proto codec makes
// of them: a put, a put with a lease and a larger value, a transaction's events at one revision, a delete. The
// filtering watcher's response to the transaction, whose puts it filters out, is encoded by gRPC, as before.
func TestFanOutSharesEncoding(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 60*time.Second)
	var codecs []*rawCodec
	openRaw := func() *stream {
		c := &rawCodec{CodecV2: encoding.GetCodecV2(proto.Name)}
		codecs = append(codecs, c)
		return open(t, ctx, e.Via, grpc.ForceCodecV2(c))
	}
	plain := &pb.WatchCreateRequest{Key: []byte("f"), RangeEnd: []byte("g")}
	noPut := &pb.WatchCreateRequest{Key: []byte("f"), RangeEnd: []byte("g"), Filters: []pb.WatchCreateRequest_FilterType{pb.WatchCreateRequest_NOPUT}}
	direct := open(t, ctx, e.Direct)
	direct.create(plain)
	direct.create(noPut)
	a, b := openRaw(), openRaw()
	for _, r := range []*pb.WatchCreateRequest{plain, plain, noPut} {
		a.create(r)
	}
	b.create(plain)
	for _, s := range []*stream{direct, direct, a, a, a, b} {
		if r := s.next(); !r.Created {
			t.Fatalf("want a created response, got %v", r)
		}
	}
	before := watch.SharedOffers()

	cli := proxytest.Client(t, e.Cluster.Endpoints()[0])
	lease, err := cli.Grant(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, "f", "one"); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, "f", string(bytes.Repeat([]byte("v"), 500)), clientv3.WithLease(lease.ID)); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Txn(ctx).Then(clientv3.OpPut("f1", "a"), clientv3.OpDelete("f"), clientv3.OpPut("f2", "b")).Commit(); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Delete(ctx, "f1"); err != nil {
		t.Fatal(err)
	}
	// Per watch id, the responses etcd sends: 4 for a plain watcher, 2 (the transaction's delete, the delete)
	// for the filtering one. One stream's watchers of a revision come in no fixed order.
	byID := func(s *stream, n int) map[int64][]*pb.WatchResponse {
		m := map[int64][]*pb.WatchResponse{}
		for i := 0; i < n; i++ {
			r := s.next()
			m[r.WatchId] = append(m[r.WatchId], r)
		}
		return m
	}
	want := byID(direct, 6)
	check := func(what string, got []*pb.WatchResponse, want []*pb.WatchResponse, id int64) {
		t.Helper()
		if len(got) != len(want) {
			t.Fatalf("%s: %d responses; want %d", what, len(got), len(want))
		}
		for i := range want {
			w := gproto.CloneOf(want[i])
			w.WatchId = id
			same(t, fmt.Sprintf("%s, response %d", what, i), w, got[i])
		}
	}
	gotA, gotB := byID(a, 10), byID(b, 4)
	check("stream a, watch id 0", gotA[0], want[0], 0)
	check("stream a, watch id 1", gotA[1], want[0], 1)
	check("stream a, watch id 2 (NOPUT)", gotA[2], want[1], 2)
	check("stream b, watch id 0", gotB[0], want[0], 0)
	for i, c := range codecs {
		c.mu.Lock()
		for j, raw := range c.raw {
			var m pb.WatchResponse
			if err := gproto.Unmarshal(raw, &m); err != nil {
				t.Fatal(err)
			}
			if enc, err := gproto.Marshal(&m); err != nil || !bytes.Equal(raw, enc) {
				t.Errorf("stream %d, response %d: sent %x; proto encodes it %x (%v)", i, j, raw, enc, err)
			}
		}
		c.mu.Unlock()
	}
	// Shared: the 4 responses of each of the three plain watchers, and the filtering watcher's response to the
	// delete, which its filter leaves whole; not its response to the transaction (its puts filtered out).
	if got := watch.SharedOffers() - before; got != 13 {
		t.Errorf("%d responses sent as shared parts; want 13 (3 plain watchers × 4 writes, and 1)", got)
	}
}
