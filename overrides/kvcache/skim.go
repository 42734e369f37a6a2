package kvcache

import (
	"errors"
	"unicode/utf8"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	grpcenc "google.golang.org/grpc/encoding"
	protoenc "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
)

// The invalidation watch receives every write made through etcd, value included, and reads only keys and
// revisions. Its stream decodes a WatchResponse with skimCodec instead of gRPC's proto codec: the values of the
// events' key-values (and prev_kv, which the watch does not ask for) are skipped over, neither copied nor
// allocated. The other fields of WatchResponse, ResponseHeader, Event and KeyValue are decoded as proto.Unmarshal
// decodes them (the last of a repeated scalar wins, a repeated message is merged, a known field of another wire
// type is an unknown field, cancel_reason must be UTF-8); unknown fields are dropped. What proto.Unmarshal refuses
// is refused (errSkim): Recv then fails the stream, and the watch's retry loop opens another.

// Field numbers, from etcd's rpc.proto and kv.proto.
const (
	respHeader          protowire.Number = 1
	respWatchID         protowire.Number = 2
	respCreated         protowire.Number = 3
	respCanceled        protowire.Number = 4
	respCompactRevision protowire.Number = 5
	respCancelReason    protowire.Number = 6
	respFragment        protowire.Number = 7
	respEvents          protowire.Number = 11

	headerClusterID protowire.Number = 1
	headerMemberID  protowire.Number = 2
	headerRevision  protowire.Number = 3
	headerRaftTerm  protowire.Number = 4

	eventType   protowire.Number = 1
	eventKv     protowire.Number = 2
	eventPrevKv protowire.Number = 3

	kvKey            protowire.Number = 1
	kvCreateRevision protowire.Number = 2
	kvModRevision    protowire.Number = 3
	kvVersion        protowire.Number = 4
	kvValue          protowire.Number = 5
	kvLease          protowire.Number = 6
)

var errSkim = errors.New("kvcache: malformed WatchResponse")

// skimCodec is gRPC's proto codec, except that it decodes a WatchResponse with skimWatchResponse. It is the codec
// of the invalidation watch's stream only (grpc.ForceCodecV2 on that call): the requests it sends are encoded as
// gRPC would, and the content-subtype it names is proto's.
type skimCodec struct{ proto grpcenc.CodecV2 }

func newSkimCodec() skimCodec { return skimCodec{proto: grpcenc.GetCodecV2(protoenc.Name)} }

func (c skimCodec) Marshal(v any) (mem.BufferSlice, error) { return c.proto.Marshal(v) }

func (c skimCodec) Unmarshal(data mem.BufferSlice, v any) error {
	resp, ok := v.(*pb.WatchResponse)
	if !ok {
		return c.proto.Unmarshal(data, v)
	}
	buf := data.MaterializeToBuffer(mem.DefaultBufferPool()) // one buffer as it is, else a pooled copy
	defer buf.Free()                                         // gRPC's buffers too are reused: keys are copied out
	return skimWatchResponse(buf.ReadOnlyData(), resp)
}

func (skimCodec) Name() string { return protoenc.Name }

// fields reads an encoded message one field at a time, as proto.Unmarshal reads it (a group or a fixed-size
// field is skipped over):
//
//	r := fields{b: b}
//	for r.next() {
//		... r.num, r.typ, and r.v (a varint's value) or r.val() (a length-delimited field's content)
//	}
//	if r.bad { ... }
//
// next keeps positions rather than slices of b: storing them needs no write barrier.
type fields struct {
	b        []byte // the message
	at       int    // where its next field starts
	num      protowire.Number
	typ      protowire.Type
	v        uint64
	from, to int  // where the content of a length-delimited field is in b
	bad      bool // b is malformed: next returned false before its end
}

// next reads the next field, or returns false: at the end, or if what is left is malformed (bad).
func (r *fields) next() bool {
	b := r.b[r.at:]
	if len(b) == 0 {
		return false
	}
	var tag uint64
	n := 1
	if b[0] < 0x80 { // a field number below 16: every field etcd sends
		tag = uint64(b[0])
	} else if tag, n = protowire.ConsumeVarint(b); n < 0 || tag>>3 > uint64(protowire.MaxValidNumber) {
		return r.fail()
	}
	r.num, r.typ = protowire.Number(tag>>3), protowire.Type(tag&7)
	if r.num < protowire.MinValidNumber {
		return r.fail()
	}
	r.at += n
	b = b[n:]
	switch r.typ {
	case protowire.VarintType:
		if len(b) > 0 && b[0] < 0x80 {
			r.v, n = uint64(b[0]), 1
		} else {
			r.v, n = protowire.ConsumeVarint(b)
		}
	case protowire.BytesType:
		var size uint64
		if len(b) > 0 && b[0] < 0x80 {
			size, n = uint64(b[0]), 1
		} else {
			size, n = protowire.ConsumeVarint(b)
		}
		if n < 0 || size > uint64(len(b)-n) {
			return r.fail()
		}
		r.from, r.to = r.at+n, r.at+n+int(size)
		n += int(size)
	default:
		n = protowire.ConsumeFieldValue(r.num, r.typ, b)
	}
	if n < 0 {
		return r.fail()
	}
	r.at += n
	return true
}

// val is the content of the length-delimited field next read.
func (r *fields) val() []byte { return r.b[r.from:r.to] }

func (r *fields) fail() bool {
	r.at, r.bad = len(r.b), true
	return false
}

// skimmed is what skimWatchResponse allocates for a response's events, in as few pieces as it can: the events and
// their key-values in one (with the header and the slice of events too, for a response of one event, a write of
// one key), and their keys in one, or a few as it grows (the encoding is gRPC's buffer, reused once Unmarshal
// returns, so keys are copied).
type skimmed struct {
	header *pb.ResponseHeader // for the response's header, or nil: allocated when it has one
	slots  []slot
	events []*mvccpb.Event
	keys   []byte
}

type slot struct {
	ev mvccpb.Event
	kv mvccpb.KeyValue
}

// single is what a response of one event needs but its keys, in one allocation.
type single struct {
	header pb.ResponseHeader
	events [1]*mvccpb.Event
	slots  [1]slot
}

// skimWatchResponse decodes b into resp as proto.Unmarshal would, leaving out the values of the key-values,
// every prev_kv, and the unknown fields of every message.
func skimWatchResponse(b []byte, resp *pb.WatchResponse) error {
	resp.Reset()
	var s skimmed
	switch n, err := countEvents(b); {
	case err != nil:
		return err
	case n == 1:
		one := new(single)
		s = skimmed{header: &one.header, slots: one.slots[:], events: one.events[:0]}
	case n > 1:
		s = skimmed{slots: make([]slot, n), events: make([]*mvccpb.Event, 0, n)}
	}
	r := fields{b: b}
	for r.next() {
		switch {
		case r.typ == protowire.VarintType:
			switch r.num {
			case respWatchID:
				resp.WatchId = int64(r.v)
			case respCreated:
				resp.Created = r.v != 0
			case respCanceled:
				resp.Canceled = r.v != 0
			case respCompactRevision:
				resp.CompactRevision = int64(r.v)
			case respFragment:
				resp.Fragment = r.v != 0
			}
		case r.typ != protowire.BytesType:
		case r.num == respHeader:
			if resp.Header == nil {
				resp.Header = s.header
				if resp.Header == nil {
					resp.Header = new(pb.ResponseHeader)
				}
			}
			if err := skimHeader(r.val(), resp.Header); err != nil {
				return err
			}
		case r.num == respCancelReason:
			if !utf8.Valid(r.val()) {
				return errSkim
			}
			resp.CancelReason = string(r.val())
		case r.num == respEvents:
			if len(s.events) == len(s.slots) { // countEvents counted them all
				return errSkim
			}
			sl := &s.slots[len(s.events)]
			if err := s.skimEvent(r.val(), sl); err != nil {
				return err
			}
			s.events = append(s.events, &sl.ev)
		}
	}
	if r.bad {
		return errSkim
	}
	resp.Events = s.events
	return nil
}

// countEvents returns how many events b holds.
func countEvents(b []byte) (int, error) {
	n := 0
	r := fields{b: b}
	for r.next() {
		if r.num == respEvents && r.typ == protowire.BytesType {
			n++
		}
	}
	if r.bad {
		return 0, errSkim
	}
	return n, nil
}

func skimHeader(b []byte, h *pb.ResponseHeader) error {
	r := fields{b: b}
	for r.next() {
		if r.typ != protowire.VarintType {
			continue
		}
		switch r.num {
		case headerClusterID:
			h.ClusterId = r.v
		case headerMemberID:
			h.MemberId = r.v
		case headerRevision:
			h.Revision = int64(r.v)
		case headerRaftTerm:
			h.RaftTerm = r.v
		}
	}
	if r.bad {
		return errSkim
	}
	return nil
}

// skimEvent decodes the event b into sl: its key-value, if it has one, is sl's.
func (s *skimmed) skimEvent(b []byte, sl *slot) error {
	r := fields{b: b}
	for r.next() {
		switch {
		case r.num == eventType && r.typ == protowire.VarintType:
			sl.ev.Type = mvccpb.Event_EventType(int32(r.v))
		case r.num == eventKv && r.typ == protowire.BytesType:
			sl.ev.Kv = &sl.kv
			if err := s.skimKeyValue(r.val(), &sl.kv); err != nil {
				return err
			}
		case r.num == eventPrevKv && r.typ == protowire.BytesType:
			if err := s.skimKeyValue(r.val(), nil); err != nil { // checked as proto.Unmarshal would, not kept
				return err
			}
		}
	}
	if r.bad {
		return errSkim
	}
	return nil
}

// skimKeyValue decodes the key-value b into kv, all but its value; with kv nil, it only checks b.
func (s *skimmed) skimKeyValue(b []byte, kv *mvccpb.KeyValue) error {
	r := fields{b: b}
	for r.next() {
		switch {
		case kv == nil:
		case r.num == kvValue: // skipped: what skimming is for
		case r.num == kvKey && r.typ == protowire.BytesType:
			// Keys are appended to one buffer: a key keeps the buffer it was appended to, which stays as it was if
			// a later key makes the buffer grow; and its capacity ends with it, so that appending to it copies.
			at := len(s.keys)
			s.keys = append(s.keys, r.val()...)
			kv.Key = s.keys[at:len(s.keys):len(s.keys)]
		case r.typ != protowire.VarintType:
		case r.num == kvCreateRevision:
			kv.CreateRevision = int64(r.v)
		case r.num == kvModRevision:
			kv.ModRevision = int64(r.v)
		case r.num == kvVersion:
			kv.Version = int64(r.v)
		case r.num == kvLease:
			kv.Lease = int64(r.v)
		}
	}
	if r.bad {
		return errSkim
	}
	return nil
}
