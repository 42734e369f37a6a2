package proxy_test

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/proxy"
)

// TestServeShutdownRace: Shutdown right after Serve started, in either order, is race-free (issue #10 item 18: Serve
// published its multiplexer before registering the matchers Shutdown reads), Serve returns, and the listener is
// closed (a Shutdown that ran before Serve published anything left Serve accepting forever).
func TestServeShutdownRace(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	for i := 0; i < 20; i++ {
		p := proxy.New(proxy.Config{Upstream: e.Upstream})
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		served := make(chan error, 1)
		go func() { served <- p.Serve(l) }()
		if i%2 == 1 {
			// Let Serve publish first on every other round (it may or may not have already: both orders count).
			time.Sleep(time.Millisecond)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		p.Shutdown(ctx)
		cancel()
		select {
		case err := <-served:
			if err != nil {
				t.Fatalf("round %d: Serve after Shutdown: %v", i, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("round %d: Serve still running 10s after Shutdown", i)
		}
		if c, err := net.DialTimeout("tcp", l.Addr().String(), time.Second); err == nil {
			c.Close()
			t.Fatalf("round %d: the listener still accepts after Shutdown and Serve returned", i)
		}
	}
}
