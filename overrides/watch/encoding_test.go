package watch

import (
	"bytes"
	"math"
	"testing"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
)

// TestSharedEncoding: a fanned-out response sent as the shared parts around its watch id is byte for byte what
// gRPC's proto codec (proto.Marshal) makes of it, for every shape a fan-out sends: watch ids 0 (left out), small,
// large and negative; one event or many, puts and deletes, with and without prev_kv, leases, empty keys and
// values, a header with unknown fields, no header.
func TestSharedEncoding(t *testing.T) {
	hdr := &pb.ResponseHeader{ClusterId: 14841639068965178418, MemberId: 10276657743932975437, Revision: 12345, RaftTerm: 7}
	withUnknown := proto.CloneOf(hdr)
	withUnknown.ProtoReflect().SetUnknown([]byte{0xf8, 0x07, 0x01}) // field 127, varint 1
	put := &mvccpb.Event{Kv: &mvccpb.KeyValue{Key: []byte("/registry/pods/default/p"), Value: bytes.Repeat([]byte{'v'}, 300),
		CreateRevision: 10, ModRevision: 12345, Version: 3, Lease: 0x1234}}
	del := &mvccpb.Event{Type: mvccpb.DELETE, Kv: &mvccpb.KeyValue{Key: []byte("k"), ModRevision: 12346},
		PrevKv: &mvccpb.KeyValue{Key: []byte("k"), Value: []byte("old"), CreateRevision: 2, ModRevision: 3, Version: 1}}
	empty := &mvccpb.Event{Kv: &mvccpb.KeyValue{}}
	for _, h := range []*pb.ResponseHeader{hdr, withUnknown, nil, {}} {
		for _, evs := range [][]*mvccpb.Event{{put}, {del}, {empty}, {put, del, put, empty}} {
			enc := encodeShared(h, evs)
			if enc == nil {
				t.Fatalf("header %v, %d events: not encoded", h, len(evs))
			}
			for _, id := range []int64{0, 1, 127, 128, 1 << 40, math.MaxInt64, -1} {
				resp := &pb.WatchResponse{Header: h, WatchId: id, Events: evs}
				want, err := proto.Marshal(resp)
				if err != nil {
					t.Fatal(err)
				}
				var got []byte
				for _, p := range []mem.Buffer{enc.hdr, idPart(id), enc.events} {
					if p != nil {
						got = append(got, p.ReadOnlyData()...)
					}
				}
				if !bytes.Equal(got, want) {
					t.Errorf("header %v, watch id %d, %d events:\nshared %x\nproto  %x", h, id, len(evs), got, want)
				}
			}
		}
	}
	if encodeShared(hdr, []*mvccpb.Event{put, nil}) != nil {
		t.Error("events with a nil one: encoded; want nil (gRPC's codec reports the error)")
	}
}
