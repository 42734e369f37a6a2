package proxy_test

import (
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/internal/testcerts"
	"github.com/etcdproxy/etcdproxy/proxy"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// serveTLS serves a proxy with cfg on a TLS listener as etcdproxy start builds it (etcd's transport.NewTLSListener
// below the proxy's multiplexer), with a server certificate of a new CA; it returns the CA and the address, once
// the proxy has seen the leader.
func serveTLS(t *testing.T, cfg proxy.Config) (*testcerts.CA, string) {
	t.Helper()
	ca := testcerts.NewCA(t, "ca")
	srv := ca.Issue(t, testcerts.Options{Name: "server"})
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l, err := transport.NewTLSListener(raw, &transport.TLSInfo{CertFile: srv.CertFile, KeyFile: srv.KeyFile})
	if err != nil {
		t.Fatal(err)
	}
	p := proxytest.ServeOn(t, cfg, l)
	proxytest.Eventually(t, 10*time.Second, p.HasLeader, "the proxy saw no leader within 10s")
	return ca, raw.Addr().String()
}

// TestTLSServeHTTP: on a TLS listener (etcd's transport.NewTLSListener below the proxy's multiplexer, as
// etcdproxy start builds it), one port serves gRPC to a clientv3 client and HTTP (/health, /metrics, pprof) to
// HTTP/1.1 and HTTP/2 clients. HTTP/2 is what an HTTP client negotiates with etcd's TLS configuration (ALPN h2).
func TestTLSServeHTTP(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ca, addr := serveTLS(t, proxy.Config{Upstream: e.Upstream, EnablePprof: true})

	c := proxytest.Client(t, addr, func(cfg *clientv3.Config) { cfg.TLS = &tls.Config{RootCAs: ca.Pool()} })
	ctx := proxytest.Timeout(t, 10*time.Second)
	if _, err := c.Put(ctx, "k", "v"); err != nil {
		t.Fatalf("put over TLS: %v", err)
	}
	if r, err := c.Get(ctx, "k"); err != nil || len(r.Kvs) != 1 || string(r.Kvs[0].Value) != "v" {
		t.Fatalf("get over TLS: %v, %v", r, err)
	}

	for _, h2 := range []bool{false, true} {
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool()}, ForceAttemptHTTP2: h2}
		hc := &http.Client{Transport: tr, Timeout: 5 * time.Second}
		for _, path := range []string{"/health", "/metrics", "/proxy/health", "/debug/pprof/"} {
			resp, err := hc.Get("https://" + addr + path)
			if err != nil {
				t.Fatalf("GET %s over TLS (HTTP/2 %v): %v", path, h2, err)
			}
			body, _ := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode != http.StatusOK || (h2 && resp.ProtoMajor != 2) || (!h2 && resp.ProtoMajor != 1) {
				t.Errorf("GET %s over TLS (HTTP/2 %v): %s %s", path, h2, resp.Proto, resp.Status)
			}
			if path == "/health" && !strings.Contains(string(body), `"health":"true"`) {
				t.Errorf("GET /health over TLS: %s", body)
			}
		}
		tr.CloseIdleConnections()
	}
}
