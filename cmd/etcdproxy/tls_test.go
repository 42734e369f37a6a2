package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/internal/testcerts"
	"github.com/etcdproxy/etcdproxy/proxy"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// The tests of TLS toward clients parse the flags with start's own command (its checks included) and serve a
// proxy, in front of a real etcd, on the listener runStart builds from them (tlsFlags.info, listenClients); the
// wiring of runStart itself is TestTLSBinary's.

// startTLS parses args (after --listen-addr 127.0.0.1:0) as `etcdproxy start` does and returns the error it
// refuses them with, if any; otherwise it serves a proxy in front of e on the listener the flags ask for and
// returns its address.
func startTLS(t *testing.T, e *proxytest.Env, args ...string) (string, error) {
	t.Helper()
	var f *startFlags
	cmd := startCommand(&startFlags{}, func(sf *startFlags) error { f = sf; return nil })
	cmd.SetArgs(append([]string{"--listen-addr", "127.0.0.1:0"}, args...))
	cmd.SetOut(io.Discard)
	cmd.SetErr(io.Discard)
	if err := cmd.Execute(); err != nil {
		return "", err
	}
	info, err := f.tls.info(zap.NewNop(), f.listenAddr, f.dataDir)
	if err != nil {
		return "", err
	}
	l, err := listenClients(f.listenAddr, info)
	if err != nil {
		return "", err
	}
	proxytest.ServeOn(t, proxy.Config{Upstream: e.Upstream}, l)
	return l.Addr().String(), nil
}

func mustStartTLS(t *testing.T, e *proxytest.Env, args ...string) string {
	t.Helper()
	addr, err := startTLS(t, e, args...)
	if err != nil {
		t.Fatalf("start %v: %v", args, err)
	}
	return addr
}

// probe opens a TLS connection to addr with cfg and makes one HTTP/1.1 request (GET /metrics) on it: under
// TLS 1.3 a server refuses a client certificate only after the client's side of the handshake is done. It returns
// the connection's state, or what refused it.
func probe(addr string, cfg *tls.Config) (tls.ConnectionState, error) {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, "GET /metrics HTTP/1.1\r\nHost: proxy\r\n\r\n"); err != nil {
		return tls.ConnectionState{}, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return tls.ConnectionState{}, err
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return tls.ConnectionState{}, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	return conn.ConnectionState(), nil
}

// putGet writes and reads a key with a clientv3 client of addr over TLS with cfg.
func putGet(t *testing.T, addr string, cfg *tls.Config) {
	t.Helper()
	c := proxytest.Client(t, addr, func(c *clientv3.Config) { c.TLS = cfg })
	ctx := proxytest.Timeout(t, 10*time.Second)
	if _, err := c.Put(ctx, "tls", addr); err != nil {
		t.Fatalf("put through the proxy over TLS: %v", err)
	}
	if r, err := c.Get(ctx, "tls"); err != nil || len(r.Kvs) != 1 || string(r.Kvs[0].Value) != addr {
		t.Fatalf("get through the proxy over TLS: %v, %v", r, err)
	}
}

// refusedClient checks that a clientv3 client of addr (TLS with cfg; plaintext if cfg is nil) cannot put.
func refusedClient(t *testing.T, addr string, cfg *tls.Config) {
	t.Helper()
	c := proxytest.Client(t, addr, func(c *clientv3.Config) { c.TLS = cfg })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := c.Put(ctx, "tls", "refused"); err == nil {
		t.Fatalf("put through the proxy (TLS config %v) succeeded; want it refused", cfg != nil)
	}
}

func TestTLSFlagErrors(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ca := testcerts.NewCA(t, "ca")
	srv := ca.Issue(t, testcerts.Options{Name: "server"})
	tlsOn := []string{"--cert-file", srv.CertFile, "--key-file", srv.KeyFile}
	for _, c := range []struct {
		args []string
		err  string // etcd grpc-proxy's text
	}{
		{[]string{"--auto-tls", "--self-signed-cert-validity=0"}, "selfSignedCertValidity is invalid,it should be greater than 0"},
		{[]string{"--tls-min-version=TLS1.1"}, `tls-min-version is invalid: unexpected TLS version "TLS1.1" (must be one of: TLS1.2, TLS1.3)`},
		{[]string{"--tls-max-version=TLS1.0"}, `tls-max-version is invalid: unexpected TLS version "TLS1.0" (must be one of: TLS1.2, TLS1.3)`},
		{[]string{"--tls-min-version=TLS1.3", "--tls-max-version=TLS1.2"}, "min version (TLS1.3) is greater than max version (TLS1.2)"},
		{[]string{"--tls-min-version=TLS1.3", "--listen-cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"}, "cipher suites cannot be configured when only TLS1.3 is enabled"},
		{append([]string{"--listen-cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,BOGUS"}, tlsOn...), `unexpected TLS cipher suite "BOGUS"`},
		{[]string{"--trusted-ca-file", ca.File}, "KeyFile and CertFile are not presented"},
		{[]string{"--cert-file", srv.CertFile}, fmt.Sprintf("KeyFile and CertFile must both be present[key: , cert: %s]", srv.CertFile)},
		{[]string{"--cert-file", srv.CertFile, "--key-file", ca.File}, "tls: found a certificate rather than a key in the PEM for the private key"},
	} {
		_, err := startTLS(t, e, c.args...)
		if err == nil || !strings.Contains(err.Error(), c.err) {
			t.Errorf("start %q: %v; want an error with %q", c.args, err, c.err)
		}
	}
	// TLS flags without TLS are accepted, as etcd accepts them.
	if _, err := startTLS(t, e, "--client-crl-file", "/nonexistent", "--listen-cipher-suites=BOGUS"); err != nil {
		t.Errorf("TLS options without TLS: %v; want them accepted, as etcd grpc-proxy does", err)
	}
}

// TestTLSServer: --cert-file and --key-file serve TLS with that certificate; plaintext clients are refused.
func TestTLSServer(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ca := testcerts.NewCA(t, "ca")
	srv := ca.Issue(t, testcerts.Options{Name: "server"})
	addr := mustStartTLS(t, e, "--cert-file", srv.CertFile, "--key-file", srv.KeyFile)
	st, err := probe(addr, &tls.Config{RootCAs: ca.Pool()})
	if err != nil {
		t.Fatalf("TLS without a client certificate: %v", err)
	}
	if got := st.PeerCertificates[0].SerialNumber; got.Cmp(srv.Cert.SerialNumber) != 0 {
		t.Errorf("served certificate %v, want --cert-file's %v", got, srv.Cert.SerialNumber)
	}
	putGet(t, addr, &tls.Config{RootCAs: ca.Pool()})
	refusedClient(t, addr, nil)
}

// TestTLSMutual: with --trusted-ca-file, a client certificate signed by that CA is required: none, one of another
// CA, and an expired one are refused.
func TestTLSMutual(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ca, other := testcerts.NewCA(t, "ca"), testcerts.NewCA(t, "other")
	srv := ca.Issue(t, testcerts.Options{Name: "server"})
	client := ca.Issue(t, testcerts.Options{Name: "client", Client: true})
	stranger := other.Issue(t, testcerts.Options{Name: "stranger", Client: true})
	expired := ca.Issue(t, testcerts.Options{Name: "expired", Client: true, Expired: true})
	addr := mustStartTLS(t, e, "--cert-file", srv.CertFile, "--key-file", srv.KeyFile, "--trusted-ca-file", ca.File)

	with := func(p *testcerts.Pair) *tls.Config {
		cfg := &tls.Config{RootCAs: ca.Pool()}
		if p != nil {
			// Sent even when the server asks for another CA's (Certificates would then send none).
			cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &p.TLS, nil }
		}
		return cfg
	}
	if _, err := probe(addr, with(client)); err != nil {
		t.Fatalf("client certificate of --trusted-ca-file's CA: %v", err)
	}
	putGet(t, addr, with(client))
	for _, c := range []struct {
		name string
		cert *testcerts.Pair
		err  string
	}{
		{"no client certificate", nil, "certificate required"},
		{"a certificate of another CA", stranger, "unknown certificate authority"},
		{"an expired certificate", expired, "expired certificate"},
	} {
		if _, err := probe(addr, with(c.cert)); err == nil || !strings.Contains(err.Error(), c.err) {
			t.Errorf("%s: %v; want refused (%s)", c.name, err, c.err)
		}
	}
	refusedClient(t, addr, with(nil))
}

// TestTLSCRL: with --client-crl-file, a client certificate the CRL revokes is refused; another of the same CA is
// not.
func TestTLSCRL(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ca := testcerts.NewCA(t, "ca")
	srv := ca.Issue(t, testcerts.Options{Name: "server"})
	client := ca.Issue(t, testcerts.Options{Name: "client", Client: true})
	revoked := ca.Issue(t, testcerts.Options{Name: "revoked", Client: true})
	crl := ca.CRL(t, revoked.Cert)
	addr := mustStartTLS(t, e, "--cert-file", srv.CertFile, "--key-file", srv.KeyFile, "--trusted-ca-file", ca.File,
		"--client-crl-file", crl)
	cfg := func(p *testcerts.Pair) *tls.Config {
		return &tls.Config{RootCAs: ca.Pool(), Certificates: []tls.Certificate{p.TLS}}
	}
	if _, err := probe(addr, cfg(client)); err != nil {
		t.Fatalf("a certificate the CRL does not revoke: %v", err)
	}
	if _, err := probe(addr, cfg(revoked)); err == nil {
		t.Errorf("a revoked certificate was accepted")
	}
	refusedClient(t, addr, cfg(revoked))
}

// TestTLSVersions: --tls-min-version and --tls-max-version bound the versions a client may use.
func TestTLSVersions(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ca := testcerts.NewCA(t, "ca")
	srv := ca.Issue(t, testcerts.Options{Name: "server"})
	files := []string{"--cert-file", srv.CertFile, "--key-file", srv.KeyFile}

	min13 := mustStartTLS(t, e, append(files, "--tls-min-version=TLS1.3")...)
	if _, err := probe(min13, &tls.Config{RootCAs: ca.Pool(), MaxVersion: tls.VersionTLS12}); err == nil {
		t.Errorf("--tls-min-version=TLS1.3: a TLS 1.2 client was accepted")
	}
	if st, err := probe(min13, &tls.Config{RootCAs: ca.Pool()}); err != nil || st.Version != tls.VersionTLS13 {
		t.Errorf("--tls-min-version=TLS1.3: %v, version %x", err, st.Version)
	}

	max12 := mustStartTLS(t, e, append(files, "--tls-max-version=TLS1.2")...)
	if _, err := probe(max12, &tls.Config{RootCAs: ca.Pool(), MinVersion: tls.VersionTLS13}); err == nil {
		t.Errorf("--tls-max-version=TLS1.2: a TLS 1.3 client was accepted")
	}
	if st, err := probe(max12, &tls.Config{RootCAs: ca.Pool()}); err != nil || st.Version != tls.VersionTLS12 {
		t.Errorf("--tls-max-version=TLS1.2: %v, version %x; want TLS 1.2", err, st.Version)
	}
	putGet(t, max12, &tls.Config{RootCAs: ca.Pool()})

	// The default, as etcd's: TLS 1.2 and up.
	def := mustStartTLS(t, e, files...)
	if st, err := probe(def, &tls.Config{RootCAs: ca.Pool(), MaxVersion: tls.VersionTLS12}); err != nil || st.Version != tls.VersionTLS12 {
		t.Errorf("default versions: a TLS 1.2 client: %v, version %x", err, st.Version)
	}
	if _, err := probe(def, &tls.Config{RootCAs: ca.Pool(), MinVersion: tls.VersionTLS11, MaxVersion: tls.VersionTLS11}); err == nil {
		t.Errorf("default versions: a TLS 1.1 client was accepted")
	}
}

// TestTLSCipherSuites: --listen-cipher-suites is the TLS 1.2 suites the proxy accepts.
func TestTLSCipherSuites(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ca := testcerts.NewCA(t, "ca")
	srv := ca.Issue(t, testcerts.Options{Name: "server"}) // ECDSA
	addr := mustStartTLS(t, e, "--cert-file", srv.CertFile, "--key-file", srv.KeyFile,
		"--listen-cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305")
	offer := func(cs ...uint16) *tls.Config {
		return &tls.Config{RootCAs: ca.Pool(), MaxVersion: tls.VersionTLS12, CipherSuites: cs}
	}
	if _, err := probe(addr, offer(tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)); err == nil {
		t.Errorf("a client offering only a suite not listed was accepted")
	}
	st, err := probe(addr, offer(tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384))
	if err != nil || st.CipherSuite != tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 {
		t.Errorf("a client offering a listed suite: %v, suite %s", err, tls.CipherSuiteName(st.CipherSuite))
	}
	// etcd's short name for the ChaCha20 suite.
	st, err = probe(addr, offer(tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256))
	if err != nil || st.CipherSuite != tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 {
		t.Errorf("ChaCha20 by etcd's name: %v, suite %s", err, tls.CipherSuiteName(st.CipherSuite))
	}
}

// TestTLSAutoTLS: --auto-tls serves a self-signed certificate kept under --data-dir (fixtures/proxy, where etcd
// grpc-proxy keeps it), valid for --self-signed-cert-validity years, and reuses it on the next start.
func TestTLSAutoTLS(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	dir := t.TempDir()
	addr := mustStartTLS(t, e, "--auto-tls", "--self-signed-cert-validity=2", "--data-dir", dir)
	b, err := os.ReadFile(filepath.Join(dir, "fixtures", "proxy", "cert.pem"))
	if err != nil {
		t.Fatalf("no certificate under --data-dir: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		t.Fatal("cert.pem holds no certificate")
	}
	// The certificate names the listen address: it verifies as its own CA.
	st, err := probe(addr, &tls.Config{RootCAs: pool})
	if err != nil {
		t.Fatalf("auto-TLS: %v", err)
	}
	cert := st.PeerCertificates[0]
	if want := time.Now().Add(2 * 365 * 24 * time.Hour); cert.NotAfter.Before(want.Add(-time.Hour)) || cert.NotAfter.After(want.Add(time.Hour)) {
		t.Errorf("certificate valid until %v; want 2 years from now (--self-signed-cert-validity=2)", cert.NotAfter)
	}
	putGet(t, addr, &tls.Config{InsecureSkipVerify: true}) // as etcdctl --insecure-skip-tls-verify
	refusedClient(t, addr, nil)

	again := mustStartTLS(t, e, "--auto-tls", "--data-dir", dir)
	if st, err := probe(again, &tls.Config{RootCAs: pool}); err != nil || !st.PeerCertificates[0].Equal(cert) {
		t.Errorf("second start on the same --data-dir: %v; want the same certificate", err)
	}
}

// TestTLSCertReload: certificate files replaced on disk are served to the next connection, without a restart.
func TestTLSCertReload(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ca := testcerts.NewCA(t, "ca")
	first := ca.Issue(t, testcerts.Options{Name: "first"})
	second := ca.Issue(t, testcerts.Options{Name: "second"})
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "server.pem"), filepath.Join(dir, "server-key.pem")
	testcerts.Replace(t, first, certFile, keyFile)
	addr := mustStartTLS(t, e, "--cert-file", certFile, "--key-file", keyFile)
	cfg := &tls.Config{RootCAs: ca.Pool()}
	c := proxytest.Client(t, addr, func(c *clientv3.Config) { c.TLS = cfg })
	ctx := proxytest.Timeout(t, 10*time.Second)
	if _, err := c.Put(ctx, "before", "v"); err != nil {
		t.Fatal(err)
	}
	if st, err := probe(addr, cfg); err != nil || !st.PeerCertificates[0].Equal(first.Cert) {
		t.Fatalf("before the replacement: %v; want the first certificate", err)
	}
	testcerts.Replace(t, second, certFile, keyFile)
	if st, err := probe(addr, cfg); err != nil || !st.PeerCertificates[0].Equal(second.Cert) {
		t.Fatalf("after the replacement: %v; want the second certificate on a new connection", err)
	}
	putGet(t, addr, cfg)
	// The connection opened before goes on.
	if _, err := c.Put(ctx, "after", "v"); err != nil {
		t.Errorf("the connection opened before the replacement: %v", err)
	}
}

// TestTLSBinary runs the built binary with TLS toward clients, as runStart wires it: mutual TLS with a CRL on
// --listen-addr (gRPC and HTTP on the one port) and on an https:// --metrics-addr; then --auto-tls with a unix://
// --metrics-addr.
func TestTLSBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	ca := testcerts.NewCA(t, "ca")
	srv := ca.Issue(t, testcerts.Options{Name: "server"})
	client := ca.Issue(t, testcerts.Options{Name: "client", Client: true})
	revoked := ca.Issue(t, testcerts.Options{Name: "revoked", Client: true})
	crl := ca.CRL(t, revoked.Cert)
	mtls := func(p *testcerts.Pair) *tls.Config {
		return &tls.Config{RootCAs: ca.Pool(), GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &p.TLS, nil
		}}
	}

	t.Run("mTLS", func(t *testing.T) {
		r := runBinary(t, t.TempDir(), func(metrics string) []string {
			return []string{"--cert-file", srv.CertFile, "--key-file", srv.KeyFile, "--trusted-ca-file", ca.File,
				"--client-crl-file", crl, "--metrics-addr", "https://" + metrics}
		})
		putGet(t, r.listen, mtls(client))
		for _, h2 := range []bool{false, true} {
			for _, addr := range []string{r.listen, r.metrics} {
				hc := &http.Client{Timeout: 5 * time.Second,
					Transport: &http.Transport{TLSClientConfig: mtls(client), ForceAttemptHTTP2: h2}}
				healthy := func() bool {
					resp, err := hc.Get("https://" + addr + "/health")
					if err != nil {
						return false
					}
					_ = resp.Body.Close()
					return resp.StatusCode == http.StatusOK
				}
				proxytest.Eventually(t, 10*time.Second, healthy, "GET https://%s/health (HTTP/2 %v) with a client certificate: not 200 within 10s", addr, h2)
				hc.CloseIdleConnections()
			}
		}
		for _, addr := range []string{r.listen, r.metrics} {
			if _, err := probe(addr, mtls(revoked)); err == nil {
				t.Errorf("%s: a revoked client certificate was accepted", addr)
			}
			if _, _, err := get("http://" + addr + "/health"); err == nil {
				t.Errorf("%s: plaintext HTTP was answered", addr)
			}
		}
		refusedClient(t, r.listen, mtls(revoked))
	})

	t.Run("auto-TLS", func(t *testing.T) {
		work := t.TempDir()
		r := runBinary(t, work, func(string) []string {
			return []string{"--auto-tls", "--metrics-addr", "unix://metrics.sock"}
		})
		if _, err := os.Stat(filepath.Join(work, "data", "fixtures", "proxy", "cert.pem")); err != nil {
			t.Errorf("auto-TLS certificate: %v", err)
		}
		putGet(t, r.listen, &tls.Config{InsecureSkipVerify: true})
		sock := filepath.Join(work, "metrics.sock")
		hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, "unix", sock)
			}}}
		resp, err := hc.Get("http://unix/metrics")
		if err != nil {
			t.Fatalf("GET /metrics on unix://metrics.sock: %v", err)
		}
		body, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "etcdproxy_") {
			t.Errorf("GET /metrics on unix://metrics.sock: %s", resp.Status)
		}
	})
}
