package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// TestScrapeUncompressed: the bench reads counters from a promhttp endpoint (etcdproxy's /metrics serves one) as
// plain text, so that the measured process builds no gzip compressor at the edges of a window, and sums the
// samples of each wanted metric across label sets.
func TestScrapeUncompressed(t *testing.T) {
	reg := prometheus.NewRegistry()
	hits := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "bench_test_hits_total", Help: "h"}, []string{"kind"})
	reg.MustRegister(hits)
	hits.WithLabelValues("a").Add(3)
	hits.WithLabelValues("b").Add(4)
	prom := promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	var encoding []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		encoding = append(encoding, r.Header.Get("Accept-Encoding"))
		rec := httptest.NewRecorder()
		prom.ServeHTTP(rec, r)
		if ce := rec.Header().Get("Content-Encoding"); ce != "" {
			t.Errorf("the endpoint answered with Content-Encoding %q", ce)
		}
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.Code)
		_, _ = w.Write(rec.Body.Bytes())
	}))
	defer srv.Close()

	got, err := scrapeMetrics(context.Background(), srv.URL, "bench_test_hits_total")
	if err != nil {
		t.Fatal(err)
	}
	if len(encoding) != 1 || encoding[0] != "identity" {
		t.Errorf("Accept-Encoding sent: %q, want [identity]", encoding)
	}
	if got["bench_test_hits_total"] != 7 {
		t.Errorf("bench_test_hits_total = %v, want 7 (3 + 4)", got["bench_test_hits_total"])
	}
}
