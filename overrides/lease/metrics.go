package lease

import "github.com/prometheus/client_golang/prometheus"

var (
	keepaliveClientStreams = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "etcdproxy", Subsystem: "lease", Name: "keepalive_client_streams",
		Help: "Client LeaseKeepAlive streams open on the proxy.",
	})
	keepaliveUpstreamStreams = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "etcdproxy", Subsystem: "lease", Name: "keepalive_upstream_streams",
		Help: "LeaseKeepAlive streams the proxy holds open to etcd, shared by the client streams.",
	})
	keepaliveRequests = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "lease", Name: "keepalive_requests_total",
		Help: "Keepalive requests sent upstream (re-sent requests included).",
	})
	keepaliveExpired = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "lease", Name: "keepalive_expired_total",
		Help: "Client keepalive streams ended because a request waited --lease-renew-timeout unanswered (no leader, or etcd did not answer).",
	})
	keepaliveLatency = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "etcdproxy", Subsystem: "lease", Name: "keepalive_reply_seconds",
		Help:    "Time from a client's keepalive request reaching the proxy to its reply being sent.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
	})
)

func init() {
	prometheus.MustRegister(keepaliveClientStreams, keepaliveUpstreamStreams, keepaliveRequests, keepaliveExpired, keepaliveLatency)
}
