package leader

import "github.com/prometheus/client_golang/prometheus"

var (
	leaderPresent = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "etcdproxy", Subsystem: "leader", Name: "present",
		Help: "1 when the etcd cluster behind the proxy has a leader, 0 when it has none or cannot be reached.",
	})
	leaderChanges = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "leader", Name: "found_total",
		Help: "Times the proxy saw the leader become present (at start and after each loss).",
	})
	leaderLosses = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "leader", Name: "lost_total",
		Help: "Times the proxy saw the leader lost.",
	})
	requireLeaderRefused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "etcdproxy", Subsystem: "leader", Name: "require_leader_refused_total",
		Help: "Require-leader client calls refused or ended because the leader was lost, by kind (unary, stream).",
	}, []string{"kind"})
)

func init() {
	prometheus.MustRegister(leaderPresent, leaderChanges, leaderLosses, requireLeaderRefused)
}
