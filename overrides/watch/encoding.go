package watch

import (
	"sync"
	"sync/atomic"

	"github.com/etcdproxy/etcdproxy/internal/encoded"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// An event fanned out to W watchers is W responses that differ only in their watch id: the same header, the same
// events. Each used to be encoded whole by gRPC; now the header's and the events' encodings are made once per
// upstream response (shared) and each watcher's response is sent as those bytes around its own watch id's
// (internal/encoded: the stream's Slot). The bytes are what gRPC's proto codec makes of the response: fields in
// the order of their numbers, header (1), watch_id (2, left out when 0), events (11); the response has no other
// field set (TestSharedEncoding checks it against proto.Marshal). A watcher whose events are filtered (NOPUT,
// NODELETE, or some already delivered) gets its response encoded by gRPC, as before.

// shared is the header and the events of the responses of one fan-out, and their encoding.
type shared struct {
	header    *pb.ResponseHeader
	events    []*mvccpb.Event // at least one
	hdrEnc    mem.Buffer      // field 1; nil without a header
	eventsEnc mem.Buffer      // field 11, each event
}

// encodeShared encodes hdr and events as fields of a WatchResponse, or returns nil if it cannot.
func encodeShared(hdr *pb.ResponseHeader, events []*mvccpb.Event) *shared {
	var b []byte
	s := &shared{header: hdr, events: events}
	if hdr != nil {
		var err error
		if b, err = appendField(b, 1, hdr); err != nil {
			return nil
		}
		s.hdrEnc = mem.SliceBuffer(b)
	}
	var evs []byte
	for _, ev := range events {
		if ev == nil {
			return nil // proto.Marshal refuses it: leave the error to gRPC
		}
		var err error
		if evs, err = appendField(evs, 11, ev); err != nil {
			return nil
		}
	}
	if len(evs) == 0 {
		return nil
	}
	s.eventsEnc = mem.SliceBuffer(evs)
	return s
}

// appendField appends m as field num of its parent message, as proto.Marshal encodes it there.
func appendField(b []byte, num protowire.Number, m proto.Message) ([]byte, error) {
	size := proto.Size(m)
	b = protowire.AppendTag(b, num, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(size))
	return proto.MarshalOptions{UseCachedSize: true}.MarshalAppend(b, m)
}

// idPart is the encoding of watch_id (field 2) id, nil for 0 (proto3 leaves a zero out).
func idPart(id int64) mem.Buffer {
	if id == 0 {
		return nil
	}
	b := protowire.AppendTag(make([]byte, 0, 11), 2, protowire.VarintType)
	return mem.SliceBuffer(protowire.AppendVarint(b, uint64(id)))
}

// smallIDs bounds the watch ids whose encodings smallIDParts holds. clientv3 and etcd number a stream's watchers
// from 0, so nearly every watcher's id is small, and its encoding costs it nothing of its own (a watcher's own,
// boxed as a mem.Buffer, was 48 bytes of each).
const smallIDs = 1024

// smallIDParts returns idPart of 0 to smallIDs-1, made at the first call (40 KiB).
var smallIDParts = sync.OnceValue(func() *[smallIDs]mem.Buffer {
	var parts [smallIDs]mem.Buffer
	for id := int64(1); id < smallIDs; id++ {
		parts[id] = idPart(id)
	}
	return &parts
})

// offer offers, on slot, the encoding of resp, whose header and events are enc's and watch id is id's.
func (enc *shared) offer(slot *encoded.Slot, resp *pb.WatchResponse, id mem.Buffer) {
	slot.Offer(resp, enc.hdrEnc, id, enc.eventsEnc)
	if f := onShared.Load(); f != nil {
		(*f)()
	}
}

// onShared, if set, is called for each response offered as shared parts (a test's counter: export_test.go; a
// counter of its own here would be one more write to a line every sender shares).
var onShared atomic.Pointer[func()]
