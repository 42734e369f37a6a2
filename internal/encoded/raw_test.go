package encoded

import (
	"bytes"
	"context"
	"testing"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// TestRaw: a call that its Answer answers sends the parts it gave, and its method's handler never runs; one it does
// not answer reaches the handler, which decodes the request the client sent; bytes that do not decode get the
// status gRPC's server gives them.
func TestRaw(t *testing.T) {
	req := &pb.RangeRequest{Key: []byte("k"), Serializable: true}
	enc, err := proto.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	resp := &pb.RangeResponse{Header: &pb.ResponseHeader{Revision: 3}, Count: 1}
	want, err := proto.Marshal(resp)
	if err != nil {
		t.Fatal(err)
	}
	// call runs Raw over a handler that decodes its request and returns resp, for a client that sent b; the
	// answer says yes to the bytes of req only, with want in two parts.
	call := func(b []byte) (sent []byte, handled *pb.RangeRequest, err error) {
		pool := &countingPool{}
		h := func(_ any, _ context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			handled = &pb.RangeRequest{}
			if err := dec(handled); err != nil {
				return nil, err
			}
			if pool.put != 1 {
				t.Errorf("the request's bytes are still held after they were decoded")
			}
			return resp, nil
		}
		answer := func(_ context.Context, got []byte) (parts [2]mem.Buffer, n int, ok bool) {
			if !bytes.Equal(got, enc) {
				return parts, 0, false
			}
			return [2]mem.Buffer{mem.SliceBuffer(want[:2]), mem.SliceBuffer(want[2:])}, 2, true
		}
		codec := NewCodec()
		dec := func(v any) error { // as gRPC's: the received buffer is freed once decoded
			held := make([]byte, len(b), 4<<10) // above gRPC's pooling threshold: a pooled buffer, counted
			copy(held, b)
			data := mem.BufferSlice{mem.NewBuffer(&held, pool)}
			defer data.Free()
			return codec.Unmarshal(data, v)
		}
		out, err := Raw(h, answer)(nil, context.Background(), dec, nil)
		if err != nil {
			return nil, handled, err
		}
		data, err := codec.Marshal(out)
		if err != nil {
			t.Fatal(err)
		}
		if pool.put != 1 {
			t.Errorf("the request's bytes were let go %d times, want once", pool.put)
		}
		return data.Materialize(), handled, nil
	}

	sent, handled, err := call(enc)
	if err != nil || handled != nil || !bytes.Equal(sent, want) {
		t.Errorf("answered: sent %x (handler ran: %v), %v; want %x", sent, handled != nil, err, want)
	}
	other := &pb.RangeRequest{Key: []byte("other"), Serializable: true}
	b, err := proto.Marshal(other)
	if err != nil {
		t.Fatal(err)
	}
	sent, handled, err = call(b)
	if err != nil || !proto.Equal(handled, other) || !bytes.Equal(sent, want) {
		t.Errorf("not answered: the handler decoded %v, sent %x, %v", handled, sent, err)
	}
	bad := []byte{0x0a, 0x05, 'k'} // a key longer than what follows
	_, _, err = call(bad)
	wantErr := protoCodec.Unmarshal(mem.BufferSlice{mem.SliceBuffer(bad)}, &pb.RangeRequest{})
	if st := status.Convert(err); wantErr == nil || st.Code() != codes.Internal ||
		st.Message() != "grpc: error unmarshalling request: "+wantErr.Error() {
		t.Errorf("bad bytes: %v", err)
	}
}

// countingPool is a mem.BufferPool that counts the buffers given back to it.
type countingPool struct{ put int }

func (p *countingPool) Get(n int) *[]byte { b := make([]byte, n); return &b }
func (p *countingPool) Put(*[]byte)       { p.put++ }
