package proxy_test

import (
	"context"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
)

func TestSmoke(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kv := pb.NewKVClient(e.Via)
	if _, err := kv.Put(ctx, &pb.PutRequest{Key: []byte("a"), Value: []byte("1")}); err != nil {
		t.Fatal(err)
	}
	r, err := kv.Range(ctx, &pb.RangeRequest{Key: []byte("a")})
	if err != nil || len(r.Kvs) != 1 || string(r.Kvs[0].Value) != "1" {
		t.Fatal(r, err)
	}
	_, err = kv.Txn(ctx, &pb.TxnRequest{Success: []*pb.RequestOp{{}}})
	t.Log(err)
	_, err = pb.NewKVClient(e.Direct).Txn(ctx, &pb.TxnRequest{Success: []*pb.RequestOp{{}}})
	t.Log(err)
}
