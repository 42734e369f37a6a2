package ryw

import "github.com/prometheus/client_golang/prometheus"

var retries = prometheus.NewCounterVec(prometheus.CounterOpts{
	Namespace: "etcdproxy", Subsystem: "ryw", Name: "rereads_total",
	Help: "Serializable reads answered by a member behind this proxy's writes, read again: as they were " +
		"(serializable) or, after those, as linearizable reads.",
}, []string{"as"})

func init() {
	prometheus.MustRegister(retries)
	for _, as := range []string{"serializable", "linearizable"} {
		retries.WithLabelValues(as) // reported from the start, at 0
	}
}
