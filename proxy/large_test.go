package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/server/v3/embed"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// TestLargeMessages (issue #10 item 16, after etcd's TestKVLargeRequests): with etcd's --max-request-bytes at
// 8 MiB, a 5 MiB value goes through the proxy both ways, as with etcd itself: Put, Range (linearizable and
// serializable), RangeStream, Txn (a put and a range), and a watch event; above etcd's limits the client gets
// etcd's own errors. gRPC-Go's default 4 MiB receive limit on any leg the proxy controls breaks it (the typed stubs
// on clientv3's connection do not carry clientv3's call options).
func TestLargeMessages(t *testing.T) {
	const limit = 8 << 20
	e := proxytest.Start(t, proxytest.Options{Configure: func(c *embed.Config) { c.MaxRequestBytes = limit }})
	ctx := proxytest.Timeout(t, 120*time.Second)
	big := bytes.Repeat([]byte("x"), 5<<20)

	// Each step runs directly, then through the proxy, and must give the same answer: what it returns (sizes and
	// values, revisions left out since the two runs write at different revisions) and its error's code and message.
	type step struct {
		name string
		run  func(ctx context.Context, cc *grpc.ClientConn, key string) (string, error)
	}
	value := func(kvs []*mvccKV) string {
		var b bytes.Buffer
		for _, kv := range kvs {
			fmt.Fprintf(&b, "%s=%d bytes (same: %v) ", kv.key, len(kv.value), bytes.Equal(kv.value, big))
		}
		return b.String()
	}
	steps := []step{
		{"put 5 MiB", func(ctx context.Context, cc *grpc.ClientConn, key string) (string, error) {
			_, err := pb.NewKVClient(cc).Put(ctx, &pb.PutRequest{Key: []byte(key), Value: big})
			return "", err
		}},
		{"linearizable range", func(ctx context.Context, cc *grpc.ClientConn, key string) (string, error) {
			r, err := pb.NewKVClient(cc).Range(ctx, &pb.RangeRequest{Key: []byte(key)})
			return value(kvsOf(r.GetKvs())), err
		}},
		{"serializable range (read cache)", func(ctx context.Context, cc *grpc.ClientConn, key string) (string, error) {
			r, err := pb.NewKVClient(cc).Range(ctx, &pb.RangeRequest{Key: []byte(key), Serializable: true})
			return value(kvsOf(r.GetKvs())), err
		}},
		{"range stream", func(ctx context.Context, cc *grpc.ClientConn, key string) (string, error) {
			s, err := pb.NewKVClient(cc).RangeStream(ctx, &pb.RangeRequest{Key: []byte(key)})
			if err != nil {
				return "", err
			}
			var kvs []*mvccKV
			for {
				r, err := s.Recv()
				if errors.Is(err, io.EOF) {
					return value(kvs), nil
				}
				if err != nil {
					return value(kvs), err
				}
				kvs = append(kvs, kvsOf(r.GetRangeResponse().GetKvs())...)
			}
		}},
		{"txn: range", func(ctx context.Context, cc *grpc.ClientConn, key string) (string, error) {
			r, err := pb.NewKVClient(cc).Txn(ctx, &pb.TxnRequest{Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestRange{
				RequestRange: &pb.RangeRequest{Key: []byte(key)}}}}})
			var kvs []*mvccKV
			for _, op := range r.GetResponses() {
				kvs = append(kvs, kvsOf(op.GetResponseRange().GetKvs())...)
			}
			return value(kvs), err
		}},
		{"txn: put 5 MiB", func(ctx context.Context, cc *grpc.ClientConn, key string) (string, error) {
			_, err := pb.NewKVClient(cc).Txn(ctx, &pb.TxnRequest{Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestPut{
				RequestPut: &pb.PutRequest{Key: []byte(key + "-txn"), Value: big}}}}})
			return "", err
		}},
		{"watch: a 5 MiB event", func(ctx context.Context, cc *grpc.ClientConn, key string) (string, error) {
			ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			defer cancel()
			w, err := pb.NewWatchClient(cc).Watch(ctx)
			if err != nil {
				return "", err
			}
			if err := w.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{
				Key: []byte(key + "-w")}}}); err != nil {
				return "", err
			}
			if _, err := w.Recv(); err != nil { // created
				return "", err
			}
			if _, err := pb.NewKVClient(e.Direct).Put(ctx, &pb.PutRequest{Key: []byte(key + "-w"), Value: big}); err != nil {
				t.Fatal(err)
			}
			r, err := w.Recv()
			var kvs []*mvccKV
			for _, ev := range r.GetEvents() {
				kvs = append(kvs, &mvccKV{key: string(ev.Kv.Key), value: ev.Kv.Value})
			}
			return value(kvs), err
		}},
		// Between etcd's --max-request-bytes and its gRPC limit (the same plus 512 KiB): etcd's "request is too
		// large". Above its gRPC limit: etcd's gRPC server refuses the message (ResourceExhausted, with etcd's limit
		// in the message).
		{"put over --max-request-bytes", func(ctx context.Context, cc *grpc.ClientConn, key string) (string, error) {
			_, err := pb.NewKVClient(cc).Put(ctx, &pb.PutRequest{Key: []byte(key), Value: make([]byte, limit+100<<10)})
			return "", err
		}},
		{"put over etcd's gRPC limit", func(ctx context.Context, cc *grpc.ClientConn, key string) (string, error) {
			_, err := pb.NewKVClient(cc).Put(ctx, &pb.PutRequest{Key: []byte(key), Value: make([]byte, limit+1<<20)})
			return "", err
		}},
	}
	for _, s := range steps {
		direct, derr := s.run(ctx, e.Direct, "bigD")
		via, verr := s.run(ctx, e.Via, "bigV")
		direct = string(bytes.ReplaceAll([]byte(direct), []byte("bigD"), []byte("KEY")))
		via = string(bytes.ReplaceAll([]byte(via), []byte("bigV"), []byte("KEY")))
		d, v := status.Convert(derr), status.Convert(verr)
		if direct != via || d.Code() != v.Code() || d.Message() != v.Message() {
			t.Errorf("%s:\n  direct: %q %v %q\n  proxy:  %q %v %q", s.name, direct, d.Code(), d.Message(), via, v.Code(), v.Message())
		}
	}
}

type mvccKV struct {
	key   string
	value []byte
}

func kvsOf[KV interface {
	GetKey() []byte
	GetValue() []byte
}](kvs []KV) []*mvccKV {
	var out []*mvccKV
	for _, kv := range kvs {
		out = append(out, &mvccKV{key: string(kv.GetKey()), value: kv.GetValue()})
	}
	return out
}
