package proxy

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/pprof"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// health is etcd's /health body: {"health":"true","reason":""}.
type healthBody struct {
	Health string `json:"health"`
	Reason string `json:"reason"`
}

// portHandler serves HTTP on the gRPC port: etcd's gateway under /v3/ (and /v3beta/, which etcd serves as /v3/),
// everything else as HTTPHandler. The gateway is not part of HTTPHandler because --metrics-addr serves that, and
// etcd's metrics listener serves no gateway.
func (p *Proxy) portHandler(pprofOn bool) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/v3/", p.gateway.handler)
	mux.Handle("/v3beta/", p.gateway.handler)
	mux.Handle("/", p.HTTPHandler(pprofOn))
	return mux
}

// HTTPHandler serves the proxy's HTTP endpoints: /health (200 with {"health":"true"} while the etcd cluster has a
// leader, 503 with a reason otherwise, as etcd's own /health), /metrics (the proxy's Prometheus metrics), the same
// two under /proxy/ (where etcd grpc-proxy serves its own), and /debug/pprof/ when pprof is true.
func (p *Proxy) HTTPHandler(pprofOn bool) http.Handler {
	mux := http.NewServeMux()
	health := func(w http.ResponseWriter, r *http.Request) {
		body := healthBody{Health: "true"}
		code := http.StatusOK
		if !p.HasLeader() {
			body = healthBody{Health: "false", Reason: "etcdproxy: the etcd cluster has no leader, or none is reachable"}
			code = http.StatusServiceUnavailable
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		_ = json.NewEncoder(w).Encode(body)
	}
	mux.HandleFunc("/health", health)
	metrics := promhttp.InstrumentMetricHandler(prometheus.DefaultRegisterer,
		promhttp.HandlerFor(proxyMetrics{prometheus.DefaultGatherer}, promhttp.HandlerOpts{}))
	mux.Handle("/metrics", metrics)
	// etcd grpc-proxy serves its own health and metrics under /proxy/ (its /metrics relays an etcd member's); the
	// same paths answer here, so that probes and scrapes written for it keep working.
	mux.HandleFunc("/proxy/health", health)
	mux.Handle("/proxy/metrics", metrics)
	if pprofOn {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// proxyMetrics gathers the proxy's own metrics (etcdproxy_*), Go's, the process's and the metrics handler's, and
// nothing else: etcd's server packages, in a process with the proxy (tests run members in-process), register etcd's
// member metrics in the default registry (etcd_*, and os_fd_used, os_fd_limit), and a member in the process adds
// its gRPC server's (grpc_server_*); served here they would read as this process's (etcd_server_has_leader 0, an
// empty backend) and mislead a dashboard or an alert that matches on them. The etcd of --embedded-etcd runs in a
// process of its own (etcdproxy-etcd) and serves its metrics on its client URL, as any member does.
type proxyMetrics struct{ prometheus.Gatherer }

// proxyMetricPrefixes are the metric families proxyMetrics serves.
var proxyMetricPrefixes = []string{"etcdproxy_", "go_", "process_", "promhttp_"}

func (g proxyMetrics) Gather() ([]*dto.MetricFamily, error) {
	mfs, err := g.Gatherer.Gather()
	kept := mfs[:0]
	for _, mf := range mfs {
		for _, p := range proxyMetricPrefixes {
			if strings.HasPrefix(mf.GetName(), p) {
				kept = append(kept, mf)
				break
			}
		}
	}
	return kept, err
}

// serveHealth keeps the grpc.health.v1 status of the whole server ("") in step with the leader: SERVING while the
// cluster has a leader, NOT_SERVING otherwise, until ctx ends.
func (p *Proxy) serveHealth(ctx context.Context, h *health.Server) {
	t := p.overrides.Leader
	for {
		h.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
		select {
		case <-ctx.Done():
			return
		case <-t.Found():
		}
		h.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
		select {
		case <-ctx.Done():
			return
		case <-t.Loss().Done():
		}
	}
}
