package watch

import (
	"bytes"
	"math"
	"slices"
	"testing"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
)

// TestSharedEncoding: a fanned-out response sent as the shared parts around its watch id is byte for byte what
// gRPC's proto codec (proto.Marshal) makes of it, for every shape a fan-out sends: watch ids 0 (left out), small,
// large and negative; one event or many, puts and deletes, with and without prev_kv, leases, empty keys and
// values, a header with unknown fields, no header. The response made when the queued entry is sent is the same.
func TestSharedEncoding(t *testing.T) {
	hdr := &pb.ResponseHeader{ClusterId: 14841639068965178418, MemberId: 10276657743932975437, Revision: 12345, RaftTerm: 7}
	withUnknown := proto.CloneOf(hdr)
	withUnknown.ProtoReflect().SetUnknown([]byte{0xf8, 0x07, 0x01}) // field 127, varint 1
	put := &mvccpb.Event{Kv: &mvccpb.KeyValue{Key: []byte("/registry/pods/default/p"), Value: bytes.Repeat([]byte{'v'}, 300),
		CreateRevision: 10, ModRevision: 12345, Version: 3, Lease: 0x1234}}
	del := &mvccpb.Event{Type: mvccpb.DELETE, Kv: &mvccpb.KeyValue{Key: []byte("k"), ModRevision: 12346},
		PrevKv: &mvccpb.KeyValue{Key: []byte("k"), Value: []byte("old"), CreateRevision: 2, ModRevision: 3, Version: 1}}
	empty := &mvccpb.Event{Kv: &mvccpb.KeyValue{}}
	var reused pb.WatchResponse // as the sender reuses it
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
				if made, err := proto.Marshal((&queued{enc: enc, watchID: id}).response(&reused)); err != nil ||
					!bytes.Equal(made, want) {
					t.Errorf("header %v, watch id %d, %d events: the response queued as shared is not the same", h,
						id, len(evs))
				}
				for _, p := range []mem.Buffer{enc.hdrEnc, idPart(id), enc.eventsEnc} {
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
	if encodeShared(hdr, nil) != nil {
		t.Error("no events: encoded; want nil (a fan-out has events)")
	}
}

// TestFiltered: a watcher that receives every event of a fan-out gets the fan-out's own slice, allocated for none
// (so that its response is sent as the shared encoding); one that does not gets the events it receives, in order.
func TestFiltered(t *testing.T) {
	ev := func(typ mvccpb.Event_EventType, rev int64) *mvccpb.Event {
		return &mvccpb.Event{Type: typ, Kv: &mvccpb.KeyValue{Key: []byte("k"), ModRevision: rev}}
	}
	evs := []*mvccpb.Event{ev(mvccpb.PUT, 10), ev(mvccpb.DELETE, 11), ev(mvccpb.PUT, 12), ev(mvccpb.DELETE, 13)}
	all := &watcher{next: 10}
	if got := filtered(evs, all); len(got) != len(evs) || &got[0] != &evs[0] {
		t.Error("a watcher of every event does not get the fan-out's slice")
	}
	if allocs := testing.AllocsPerRun(100, func() { filtered(evs, all) }); allocs != 0 {
		t.Errorf("a watcher of every event: %v allocations", allocs)
	}
	for _, tc := range []struct {
		w    *watcher
		want []int64
	}{
		{&watcher{next: 11}, []int64{11, 12, 13}},
		{&watcher{next: 14}, nil},
		{&watcher{next: 1, noPut: true}, []int64{11, 13}},
		{&watcher{next: 1, noDelete: true}, []int64{10, 12}},
		{&watcher{next: 12, noDelete: true}, []int64{12}},
		{&watcher{next: 1, noPut: true, noDelete: true}, nil},
	} {
		var got []int64
		for _, e := range filtered(evs, tc.w) {
			got = append(got, e.Kv.ModRevision)
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("next %d, noPut %v, noDelete %v: %v, want %v", tc.w.next, tc.w.noPut, tc.w.noDelete, got, tc.want)
		}
	}
	if len(evs) != 4 || evs[0].Kv.ModRevision != 10 || evs[3].Kv.ModRevision != 13 {
		t.Error("filtering changed the fan-out's events")
	}
}

// TestWatcherIDPart: a watcher's id part is idPart's encoding of its id, from the shared table for a small id
// (nothing allocated per watcher) and made once for a larger one.
func TestWatcherIDPart(t *testing.T) {
	bytesOf := func(b mem.Buffer) []byte {
		if b == nil {
			return nil
		}
		return b.ReadOnlyData()
	}
	for _, id := range []int64{0, 1, 127, 128, smallIDs - 1, smallIDs, 1 << 40, math.MaxInt64, -1} {
		w := &watcher{id: id}
		if got, want := bytesOf(w.idPart()), bytesOf(idPart(id)); !bytes.Equal(got, want) {
			t.Errorf("watch id %d: %x, want %x", id, got, want)
		}
		allocs := testing.AllocsPerRun(10, func() { w.idPart() })
		if allocs != 0 {
			t.Errorf("watch id %d: its part allocates %v times once made", id, allocs)
		}
		if small := id >= 0 && id < smallIDs; small != (w.idEnc == nil) {
			t.Errorf("watch id %d: made for the watcher: %v", id, w.idEnc != nil)
		}
	}
}
