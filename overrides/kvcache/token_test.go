package kvcache_test

import (
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/embedetcd"
	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/server/v3/embed"
	"google.golang.org/grpc/status"
)

// tokenTTL is etcd's --auth-token-ttl in these tests, in seconds. Authenticating (bcrypt, under -race on a loaded
// machine) can take a second or more, so a shorter TTL could expire a token before its first use; it must stay
// above the cache's TokenCheck (1 s).
const tokenTTL = 4

func tokenEnv(t *testing.T) *proxytest.Env {
	return proxytest.Start(t, proxytest.Options{User: "root", Password: "r",
		Configure: func(c *embed.Config) { c.AuthTokenTTL = tokenTTL },
		BeforeProxy: func(c *embedetcd.Cluster) {
			enableAuth(t, proxytest.Timeout(t, 30*time.Second), proxytest.Conn(t, c.Members[0].ClientURL))
		}})
}

// sameAnswer fails unless the proxy's and etcd's answers to the same steps match (error code and message, or value).
func sameAnswer(t *testing.T, what string, via *pb.RangeResponse, viaErr error, direct *pb.RangeResponse, directErr error) {
	t.Helper()
	if status.Code(viaErr) != status.Code(directErr) || status.Convert(viaErr).Message() != status.Convert(directErr).Message() ||
		(directErr == nil && value(via) != value(direct)) {
		t.Errorf("%s: etcd %v %v, proxy %v %v", what, direct.GetKvs(), directErr, via.GetKvs(), viaErr)
	}
}

// TestExpiredTokenNotServed: a simple token left unused for longer than --auth-token-ttl is refused by etcd
// ("invalid auth token"); the proxy refuses it too instead of serving the answer it cached for it.
func TestExpiredTokenNotServed(t *testing.T) {
	e := tokenEnv(t)
	ctx := proxytest.Timeout(t, 30*time.Second)
	req := &pb.RangeRequest{Key: []byte("a1"), Serializable: true}
	viaAlice, directAlice := as(t, ctx, e.Via, "alice"), as(t, ctx, e.Direct, "alice")
	cached(t, viaAlice, e.Via, req)
	get(t, directAlice, e.Direct, req)
	// Nothing shows a token's expiry but a use, which would renew it: wait out the TTL and etcd's 1 s resolution.
	time.Sleep(tokenTTL*time.Second + 1500*time.Millisecond)
	via, viaErr := pb.NewKVClient(e.Via).Range(viaAlice, req)
	direct, directErr := pb.NewKVClient(e.Direct).Range(directAlice, req)
	if directErr == nil {
		t.Fatal("etcd still accepts the token: the test did not wait long enough")
	}
	sameAnswer(t, "a read with an expired token", via, viaErr, direct, directErr)
}

// TestTokenRenewedByHits: reads keep a simple token alive in etcd (each use renews it); reads that the proxy
// answers from its cache must too, or the caller's next miss is refused where etcd would have answered.
func TestTokenRenewedByHits(t *testing.T) {
	e := tokenEnv(t)
	ctx := proxytest.Timeout(t, 30*time.Second)
	req := &pb.RangeRequest{Key: []byte("a1"), Serializable: true}
	viaAlice, directAlice := as(t, ctx, e.Via, "alice"), as(t, ctx, e.Direct, "alice")
	cached(t, viaAlice, e.Via, req)
	for end := time.Now().Add(tokenTTL*time.Second + 1500*time.Millisecond); time.Now().Before(end); {
		_, _ = pb.NewKVClient(e.Via).Range(viaAlice, req)
		_, _ = pb.NewKVClient(e.Direct).Range(directAlice, req)
		time.Sleep(100 * time.Millisecond) // the pace of a client's reads
	}
	other := &pb.RangeRequest{Key: []byte("a2"), Serializable: true} // not cached
	via, viaErr := pb.NewKVClient(e.Via).Range(viaAlice, other)
	direct, directErr := pb.NewKVClient(e.Direct).Range(directAlice, other)
	sameAnswer(t, "a miss after reads for longer than the token's TTL", via, viaErr, direct, directErr)
}
