package proxy_test

import (
	"context"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
)

// TestReconnectsPromptly: while its etcd member is down, the proxy tries to connect again every 2 s or so, not at
// gRPC's default backoff (1 s growing by 1.6 each attempt, to 120 s), so it sees the member back within that
// time. A listener on the stopped member's port counts the attempts: from 8 s to 16 s after the stop, the capped
// backoff makes about 4 (at 8.6, 10.6, 12.6 and 14.6 s, each ±20%), the default at most 2 (at about 9.3 and
// 15.8 s). Then, with the member back, a read through the proxy succeeds.
func TestReconnectsPromptly(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 90*time.Second)
	proxytest.Put(t, ctx, e.Via, "reconnect", "v")
	m := e.Cluster.Members[0]
	u, err := url.Parse(m.ClientURL)
	if err != nil {
		t.Fatal(err)
	}
	m.Stop()
	stopped := time.Now()
	l, err := net.Listen("tcp", u.Host)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var attempts []time.Duration // since the stop
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			attempts = append(attempts, time.Since(stopped))
			mu.Unlock()
			c.Close() // no gRPC server: the attempt fails, and the next waits out the backoff
		}
	}()
	// A read waiting for a ready connection, as client calls do while etcd is down (wait-for-ready): the
	// connection is wanted throughout, whatever the proxy's own calls do meanwhile.
	rctx, cancel := context.WithTimeout(ctx, 17*time.Second)
	defer cancel()
	go func() { _, _ = pb.NewKVClient(e.Via).Range(rctx, &pb.RangeRequest{Key: []byte("reconnect")}) }()
	time.Sleep(time.Until(stopped.Add(16 * time.Second)))
	l.Close()
	wg.Wait()
	mu.Lock()
	n := 0
	for _, at := range attempts {
		if at >= 8*time.Second && at < 16*time.Second {
			n++
		}
	}
	t.Logf("connection attempts since the stop: %v (%d from 8 s to 16 s)", attempts, n)
	mu.Unlock()
	if n < 3 {
		t.Errorf("%d connection attempts from 8 s to 16 s after etcd went down, want 3 or more (one every 2 s or so)", n)
	}
	if err := m.Restart(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	rctx2, cancel2 := context.WithTimeout(ctx, 10*time.Second)
	defer cancel2()
	r, err := pb.NewKVClient(e.Via).Range(rctx2, &pb.RangeRequest{Key: []byte("reconnect")})
	if err != nil || len(r.Kvs) != 1 {
		t.Fatalf("a read through the proxy %v after the member came back: %v, %v", time.Since(back), r, err)
	}
	t.Logf("read through the proxy %v after the member came back", time.Since(back).Round(time.Millisecond))
}
