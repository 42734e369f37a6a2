package watch

import "github.com/prometheus/client_golang/prometheus"

// The coalescing ratio is etcdproxy_watch_client_watchers / etcdproxy_watch_upstream_watchers.
var (
	clientStreams = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "etcdproxy", Subsystem: "watch", Name: "client_streams",
		Help: "Client Watch streams open on the proxy.",
	})
	clientWatchers = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "etcdproxy", Subsystem: "watch", Name: "client_watchers",
		Help: "Client watchers served by the proxy.",
	})
	upstreamWatchers = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "etcdproxy", Subsystem: "watch", Name: "upstream_watchers",
		Help: "Watchers the proxy holds on etcd (broadcasts), shared by the client watchers.",
	})
	upstreamStreams = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "etcdproxy", Subsystem: "watch", Name: "upstream_streams",
		Help: "Watch streams the proxy holds open to etcd (one per client identity).",
	})
	upstreamReconnects = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "watch", Name: "upstream_reconnects_total",
		Help: "Times an upstream watch stream was reopened and its watches resumed.",
	})
	eventsFannedOut = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "watch", Name: "upstream_events_total",
		Help: "Events received from etcd for fan-out.",
	})
	clientEventResponses = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "watch", Name: "client_event_responses_total",
		Help: "Event responses sent to client watchers.",
	})
	slowDetaches = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "watch", Name: "slow_consumer_detaches_total",
		Help: "Times a watcher was detached because its client stream fell behind; it catches up on its own.",
	})
	revisionReads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "watch", Name: "revision_reads_total",
		Help: "Reads of etcd's current revision for created and cancel responses, by how: probe (on the upstream " +
			"watch stream) or status (a Maintenance.Status call).",
	}, []string{"via"})
	merges = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "watch", Name: "broadcast_merges_total",
		Help: "Times a caught-up broadcast was merged into another of the same range.",
	})
)

func init() {
	prometheus.MustRegister(clientStreams, clientWatchers, upstreamWatchers, upstreamStreams, upstreamReconnects,
		eventsFannedOut, clientEventResponses, slowDetaches, merges, revisionReads)
}
