package kvcache_test

import (
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/embedetcd"
	"github.com/etcdproxy/etcdproxy/internal/proxytest"
)

// TestWatchReopensAtOnceAfterDrop: the invalidation watch, live and then cut by a dropped connection, again and
// again, is reopened at once, not after a backoff that doubles with every drop (100 ms to 10 s): while it is not
// live the cache serves nothing, every read goes to etcd. Each round: drop, see the cache not live, and time until
// it is live again (the leader probe's stream, cut too, is reopened at once as well: Steady needs both). With the
// doubling, rounds 5 to 8 take 1.3 s or more each; at most 2 of the 8 may take more than 1.2 s.
// (etcdproxy's own streams only: the test's clients open none.)
func TestWatchReopensAtOnceAfterDrop(t *testing.T) {
	var relay *proxytest.Relay
	e := proxytest.Start(t, proxytest.Options{Upstream: func(c *embedetcd.Cluster) []string {
		relay = proxytest.NewRelay(t, c.Members[0].ClientURL)
		return []string{"http://" + relay.Addr}
	}})
	proxytest.FewSlow(t, 8, 2, 1200*time.Millisecond, "to be live again after a drop", func(i int) {
		opened := watchStreamsStarted(t)
		relay.Drop()
		// Both the invalidation watch's stream and the probe's reopened (etcd counts the streams it started), and
		// the cache live again.
		proxytest.Eventually(t, 30*time.Second, func() bool {
			return watchStreamsStarted(t) >= opened+2 && e.Proxy.Steady()
		}, "round %d: the cache not live again on new streams within 30 s", i)
	})
}

// watchStreamsStarted is the number of Watch streams etcd has started (gRPC's server metrics, which the in-process
// members register).
func watchStreamsStarted(t *testing.T) float64 {
	return proxytest.Gauge(t, "grpc_server_started_total", "grpc_service", "etcdserverpb.Watch", "grpc_method", "Watch")
}
