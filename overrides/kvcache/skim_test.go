package kvcache

import (
	"bytes"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
)

// unknowns appends a field of every wire type this etcd's messages do not have, a nested group among them.
func unknowns(b []byte) []byte {
	b = protowire.AppendTag(b, 100, protowire.VarintType)
	b = protowire.AppendVarint(b, 1<<40)
	b = protowire.AppendTag(b, 101, protowire.Fixed32Type)
	b = protowire.AppendFixed32(b, 7)
	b = protowire.AppendTag(b, 102, protowire.Fixed64Type)
	b = protowire.AppendFixed64(b, 8)
	b = protowire.AppendTag(b, 103, protowire.BytesType)
	b = protowire.AppendBytes(b, []byte("not ours"))
	b = protowire.AppendTag(b, 104, protowire.StartGroupType)
	b = protowire.AppendTag(b, 1, protowire.BytesType)
	b = protowire.AppendBytes(b, []byte("in a group"))
	b = protowire.AppendTag(b, 105, protowire.StartGroupType)
	b = protowire.AppendTag(b, 105, protowire.EndGroupType)
	b = protowire.AppendTag(b, 104, protowire.EndGroupType)
	b = protowire.AppendTag(b, protowire.MaxValidNumber, protowire.VarintType)
	return protowire.AppendVarint(b, 3)
}

// with returns m with raw appended to its encoding (as fields it does not know: proto.Marshal writes them last).
func with[M proto.Message](m M, raw []byte) M {
	m.ProtoReflect().SetUnknown(raw)
	return m
}

func varintField(num protowire.Number, v uint64) []byte {
	return protowire.AppendVarint(protowire.AppendTag(nil, num, protowire.VarintType), v)
}

func bytesField(num protowire.Number, v []byte) []byte {
	return protowire.AppendBytes(protowire.AppendTag(nil, num, protowire.BytesType), v)
}

func marshal(t testing.TB, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func header(rev int64) *pb.ResponseHeader {
	return &pb.ResponseHeader{ClusterId: 14841639068965178418, MemberId: 10276657743932975437, Revision: rev, RaftTerm: 2}
}

func put(key, value string, rev int64) *mvccpb.Event {
	return &mvccpb.Event{Type: mvccpb.PUT, Kv: &mvccpb.KeyValue{Key: []byte(key), Value: []byte(value),
		CreateRevision: rev - 1, ModRevision: rev, Version: 2, Lease: 7587891234567}}
}

func del(key string, rev int64) *mvccpb.Event {
	return &mvccpb.Event{Type: mvccpb.DELETE, Kv: &mvccpb.KeyValue{Key: []byte(key), ModRevision: rev}}
}

// skimCases are encoded WatchResponses: what etcd sends the invalidation watch, and what a future etcd or a
// different encoder could send (fields it does not know, fields repeated, known fields of another wire type).
func skimCases(t testing.TB) map[string][]byte {
	events := func(rev int64, evs ...*mvccpb.Event) *pb.WatchResponse {
		return &pb.WatchResponse{Header: header(rev), Events: evs}
	}
	var many []*mvccpb.Event
	for i := range 50 {
		many = append(many, put(fmt.Sprintf("many/%03d", i), strings.Repeat("v", i*40), 100))
	}
	withPrev := put("p", "new", 9)
	withPrev.PrevKv = &mvccpb.KeyValue{Key: []byte("p"), Value: []byte("old"), CreateRevision: 3, ModRevision: 8,
		Version: 1}
	twiceKv := with(put("twice", "v1", 9),
		bytesField(eventKv, marshal(t, &mvccpb.KeyValue{Value: []byte("v2"), Version: 5})))
	cases := map[string]proto.Message{
		"empty":                &pb.WatchResponse{},
		"created":              &pb.WatchResponse{Header: header(5), Created: true},
		"put":                  events(6, put("/registry/pods/default/a", "v", 6)),
		"put with no value":    events(6, put("k", "", 6)),
		"put of a large value": events(6, put("big", strings.Repeat("x", 3<<20), 6)),
		"delete":               events(7, del("k", 7)),
		"a txn's events":       events(8, put("a", "1", 8), del("b", 8), put("c", "3", 8)),
		"catch-up":             events(1000, many...),
		"empty key":            events(6, &mvccpb.Event{Kv: &mvccpb.KeyValue{Value: []byte("v")}}),
		"event without kv":     events(6, &mvccpb.Event{Type: mvccpb.DELETE}, put("k", "v", 6)),
		"prev_kv":              events(9, withPrev),
		"progress":             &pb.WatchResponse{Header: header(10), WatchId: -1},
		"watcher's progress":   &pb.WatchResponse{Header: header(10)},
		"canceled": &pb.WatchResponse{Header: header(11), WatchId: 3, Canceled: true, CompactRevision: 9,
			CancelReason: "etcdserver: mvcc: required revision has been compacted"},
		"refused": &pb.WatchResponse{Header: header(11), Created: true, Canceled: true,
			CancelReason: "etcdserver: permission denied ✗"},
		"fragment": &pb.WatchResponse{Header: header(12), Fragment: true, Events: []*mvccpb.Event{put("f", "1", 12)}},
		"negative and large": &pb.WatchResponse{Header: &pb.ResponseHeader{ClusterId: 1<<64 - 1, Revision: -1},
			WatchId: -1 << 63, CompactRevision: 1<<63 - 1},
		"unknown fields everywhere": with(&pb.WatchResponse{
			Header: with(header(13), unknowns(nil)),
			Events: []*mvccpb.Event{with(&mvccpb.Event{Kv: with(put("u", "v", 13).Kv, unknowns(nil))}, unknowns(nil))},
		}, unknowns(nil)),
		// proto.Unmarshal: a known field of another wire type is an unknown field; the last of a repeated scalar
		// wins; a repeated message is merged into the first.
		"wrong wire types": with(&pb.WatchResponse{
			Header: with(header(14),
				protowire.AppendFixed64(protowire.AppendTag(nil, headerRevision, protowire.Fixed64Type), 99)),
			Events: []*mvccpb.Event{{Kv: with(&mvccpb.KeyValue{Key: []byte("w"), ModRevision: 14},
				append(varintField(kvValue, 5), bytesField(kvModRevision, []byte("x"))...))}},
		}, slices.Concat(varintField(respEvents, 1), varintField(respCancelReason, 1), bytesField(respWatchID, nil))),
		"repeated fields": with(&pb.WatchResponse{Header: header(15), WatchId: 1, Created: true,
			Events: []*mvccpb.Event{twiceKv}},
			slices.Concat(varintField(respWatchID, 2),
				bytesField(respHeader, marshal(t, &pb.ResponseHeader{Revision: 16})), varintField(respCreated, 0))),
	}
	out := map[string][]byte{}
	for name, m := range cases {
		out[name] = marshal(t, m)
	}
	return out
}

// malformed are encodings proto.Unmarshal refuses.
var malformed = map[string][]byte{
	"field number 0": {0x00, 0x01},
	"field number too large": protowire.AppendVarint(
		protowire.AppendVarint(nil, uint64(protowire.MaxValidNumber+1)<<3), 1),
	"reserved wire type":        {0x0e},
	"end group without start":   {0x0c},
	"group not ended":           {0x1b, 0x08, 0x01},
	"group ended by another":    {0x1b, 0x24},
	"varint too long":           {0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01},
	"varint cut":                {0x10, 0x80},
	"tag cut":                   {0x80},
	"length past the end":       {0x5a, 0x05, 0x12, 0x00},
	"cancel reason not UTF-8":   {0x32, 0x02, 0xc3, 0x28},
	"header malformed":          {0x0a, 0x02, 0x18, 0x80},
	"event malformed":           {0x5a, 0x01, 0x00},
	"kv malformed":              {0x5a, 0x04, 0x12, 0x02, 0x0a, 0x05},
	"value past the kv":         {0x5a, 0x05, 0x12, 0x03, 0x2a, 0x09, 0x00},
	"prev_kv malformed":         {0x5a, 0x04, 0x1a, 0x02, 0x08, 0xff},
	"prev_kv field number 0":    {0x5a, 0x04, 0x1a, 0x02, 0x00, 0x00},
	"kv's unknown field cut":    {0x5a, 0x04, 0x12, 0x02, 0xa1, 0x06},
	"fixed64 cut":               {0x09, 0x01, 0x02},
	"event count, then garbage": {0x5a, 0x00, 0x5a, 0x00, 0xff},
}

// skimmedProto is what skimWatchResponse should make of b: proto.Unmarshal's response, without the values and
// prev_kvs of its events (unknown fields are left to the comparison, which ignores them).
func skimmedProto(b []byte) (*pb.WatchResponse, error) {
	want := new(pb.WatchResponse)
	if err := proto.Unmarshal(b, want); err != nil {
		return nil, err
	}
	for _, ev := range want.Events {
		ev.PrevKv = nil
		if ev.Kv != nil {
			ev.Kv.Value = nil
		}
	}
	return want, nil
}

// checkSkim fails unless skimWatchResponse decodes b as proto.Unmarshal does, but for values, prev_kvs and unknown
// fields, and refuses it if proto.Unmarshal does.
func checkSkim(t *testing.T, b []byte) {
	t.Helper()
	got := new(pb.WatchResponse)
	err := skimWatchResponse(b, got)
	want, wantErr := skimmedProto(b)
	switch {
	case wantErr != nil && err == nil:
		t.Fatalf("skimmed %x, which proto.Unmarshal refuses (%v), into %v", b, wantErr, got)
	case wantErr != nil:
		return
	case err != nil:
		t.Fatalf("refused %x, which proto.Unmarshal decodes into %v: %v", b, want, err)
	}
	if d := cmp.Diff(want, got, protocmp.Transform(), protocmp.IgnoreUnknown()); d != "" {
		t.Fatalf("skimmed %x differs from proto.Unmarshal's (-want +got):\n%s", b, d)
	}
	for _, ev := range got.Events {
		if ev.PrevKv != nil || ev.Kv != nil && ev.Kv.Value != nil || len(ev.ProtoReflect().GetUnknown()) > 0 {
			t.Fatalf("skimmed %x kept a value, a prev_kv or unknown fields: %v", b, ev)
		}
	}
}

// TestSkimMatchesUnmarshal: the invalidation watch's decoder makes of every kind of WatchResponse, and of every
// prefix of its encoding (a cut message), what proto.Unmarshal makes of it minus the values, prev_kvs and
// unknown fields, and refuses what proto.Unmarshal refuses.
func TestSkimMatchesUnmarshal(t *testing.T) {
	for name, b := range skimCases(t) {
		t.Run(name, func(t *testing.T) {
			if _, err := skimmedProto(b); err != nil {
				t.Fatal(err)
			}
			checkSkim(t, b)
			if len(b) > 1<<12 {
				b = b[:1<<12] // the prefixes of a large value are alike
			}
			for i := range b {
				checkSkim(t, b[:i])
			}
		})
	}
}

// TestSkimMalformed: bytes proto.Unmarshal refuses are refused, not decoded and not a panic.
func TestSkimMalformed(t *testing.T) {
	for name, b := range malformed {
		t.Run(name, func(t *testing.T) {
			if err := proto.Unmarshal(b, new(pb.WatchResponse)); err == nil {
				t.Fatalf("proto.Unmarshal decodes %x: not a malformed case", b)
			}
			if err := skimWatchResponse(b, new(pb.WatchResponse)); err == nil {
				t.Errorf("%x decoded", b)
			}
			if err := newSkimCodec().Unmarshal(mem.BufferSlice{mem.SliceBuffer(b)}, new(pb.WatchResponse)); err == nil {
				t.Errorf("%x decoded by the codec", b)
			}
		})
	}
}

// TestSkimCodec: the codec decodes a response gRPC hands it in pieces, keeps no byte of gRPC's buffers (which gRPC
// reuses once Unmarshal returns), and encodes the watch's requests, and decodes any other message, as gRPC's proto
// codec does.
func TestSkimCodec(t *testing.T) {
	resp := &pb.WatchResponse{Header: header(20),
		Events: []*mvccpb.Event{put("a", "1", 20), put("bb", "22", 20), del("ccc", 20)}}
	b := marshal(t, resp)
	var data mem.BufferSlice // cut inside the header and inside the last event
	for _, part := range [][]byte{b[:7], b[7 : len(b)-3], b[len(b)-3:]} {
		data = append(data, mem.SliceBuffer(bytes.Clone(part)))
	}
	got := new(pb.WatchResponse)
	c := newSkimCodec()
	if err := c.Unmarshal(data, got); err != nil {
		t.Fatal(err)
	}
	one := bytes.Clone(b)
	again := new(pb.WatchResponse)
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(one)}, again); err != nil {
		t.Fatal(err)
	}
	clear(one) // as gRPC's pool may do once Unmarshal returns
	want, _ := skimmedProto(b)
	for _, m := range []*pb.WatchResponse{got, again} {
		if d := cmp.Diff(want, m, protocmp.Transform()); d != "" {
			t.Errorf("decoded (-want +got):\n%s", d)
		}
	}
	// Keys share one allocation, but never each other's bytes: appending to one leaves the next alone.
	got.Events[0].Kv.Key = append(got.Events[0].Kv.Key, 'x')
	if string(got.Events[1].Kv.Key) != "bb" {
		t.Errorf("appending to a key changed the next: %q", got.Events[1].Kv.Key)
	}

	req := &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{
		Key: []byte{0}, RangeEnd: []byte{0}, ProgressNotify: true}}}
	enc, err := c.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(enc.Materialize(), marshal(t, req)) {
		t.Errorf("request encoded as %x, want %x", enc.Materialize(), marshal(t, req))
	}
	enc.Free()
	other := new(pb.WatchRequest)
	err = c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(marshal(t, req))}, other)
	if err != nil || !proto.Equal(other, req) {
		t.Errorf("a WatchRequest decoded as %v, %v", other, err)
	}
}

// FuzzSkim compares the invalidation watch's decoder with proto.Unmarshal (checkSkim) on any bytes. Seeds: the
// cases above, and testdata/fuzz/FuzzSkim.
//
//	go test ./overrides/kvcache -run '^$' -fuzz FuzzSkim -fuzztime 1m
func FuzzSkim(f *testing.F) {
	for _, b := range skimCases(f) {
		if len(b) <= 1<<12 { // the fuzzer minimizes what it finds: a large seed makes that slow
			f.Add(b)
		}
	}
	for _, b := range malformed {
		f.Add(b)
	}
	f.Fuzz(checkSkim)
}
