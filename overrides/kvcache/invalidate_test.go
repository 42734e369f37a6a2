package kvcache_test

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/overrides/kvcache"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
)

// TestInvalidationWatchSkipsValues: the invalidation watch, on the proxy's upstream connection (its interceptors
// and call options), receives a write's event with its key and revisions but not its value, which etcd did send:
// a watch of the same write decoded by gRPC's proto codec has it. If the watch decoded values again, this fails.
func TestInvalidationWatchSkipsValues(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 30*time.Second)
	resps := make(chan *pb.WatchResponse, 100)
	live, stop := kvcache.WatchInvalidation(e.Upstream.ActiveConnection(), resps)
	defer stop()
	proxytest.Eventually(t, 10*time.Second, live, "the invalidation watch never went live")

	key, value := "skim/key", strings.Repeat("v", 256)
	rev := proxytest.Put(t, ctx, e.Direct, key, value)

	direct, err := pb.NewWatchClient(e.Direct).Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := direct.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{
		Key: []byte(key), StartRevision: rev}}}); err != nil {
		t.Fatal(err)
	}
	var sent *mvccpb.Event
	for sent == nil {
		resp, err := direct.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Events) > 0 {
			sent = resp.Events[0]
		}
	}
	if string(sent.Kv.Value) != value {
		t.Fatalf("etcd's event for the write carries value %q, want %q", sent.Kv.Value, value)
	}

	for {
		select {
		case resp := <-resps:
			for _, ev := range resp.Events {
				if ev.Kv.ModRevision != rev {
					continue
				}
				if !bytes.Equal(ev.Kv.Key, sent.Kv.Key) || ev.Type != sent.Type || ev.Kv.CreateRevision != sent.Kv.CreateRevision ||
					ev.Kv.Version != sent.Kv.Version || resp.Header.GetRevision() < rev {
					t.Errorf("the invalidation watch received %v (header %v), etcd sent %v", ev, resp.Header, sent)
				}
				if len(ev.Kv.Value) != 0 {
					t.Errorf("the invalidation watch decoded the write's value (%d bytes)", len(ev.Kv.Value))
				}
				return
			}
		case <-ctx.Done():
			t.Fatal("the invalidation watch never received the write")
		}
	}
}
