package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestMetricsListenAddr(t *testing.T) {
	for _, c := range []struct {
		in, scheme, want, err string
	}{
		{in: "http://127.0.0.1:6633", scheme: "http", want: "127.0.0.1:6633"}, // etcd grpc-proxy's form
		{in: "http://0.0.0.0:6633/", scheme: "http", want: "0.0.0.0:6633"},
		{in: "127.0.0.1:6633", scheme: "http", want: "127.0.0.1:6633"}, // host:port, as --listen-addr
		{in: ":6633", scheme: "http", want: ":6633"},
		{in: "https://127.0.0.1:6633", scheme: "https", want: "127.0.0.1:6633"},
		{in: "unix://metrics.sock", scheme: "unix", want: "metrics.sock"}, // etcd listens on the host part
		{in: "unix:///tmp/metrics.sock", err: "no socket name"},
		{in: "ftp://127.0.0.1:6633", err: `scheme "ftp" not supported`},
		{in: "http://", err: "no host:port"},
		{in: "http://127.0.0.1:6633/metrics", err: "a path is not supported"},
	} {
		scheme, got, err := metricsListenAddr(c.in)
		switch {
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("metricsListenAddr(%q) = %q, %q, %v; want an error containing %q", c.in, scheme, got, err, c.err)
		case c.err == "" && (err != nil || got != c.want || scheme != c.scheme):
			t.Errorf("metricsListenAddr(%q) = %q, %q, %v; want %q, %q", c.in, scheme, got, err, c.scheme, c.want)
		}
	}
}

func TestStrayArgument(t *testing.T) {
	cmd := newStartCommand()
	cmd.SetArgs([]string{"--debug", "false"})
	cmd.SetOut(io.Discard)
	cmd.SetErr(io.Discard)
	err := cmd.Execute()
	if err == nil || !strings.Contains(err.Error(), `unexpected argument "false"`) ||
		!strings.Contains(err.Error(), "--debug=false") {
		t.Fatalf("start --debug false: %v; want an error naming the argument and the --flag=value form", err)
	}
}

// TestBinary runs the built binary as an operator would with etcd grpc-proxy's flags: in front of an embedded etcd,
// metrics on an http:// URL, --debug, message size limits, --namespace, under a systemd notify socket. It must tell systemd it
// is ready, serve the etcd API, apply the size limits, serve health and metrics on both addresses, log gRPC's own
// lines, and exit 0 on SIGTERM with no error logged. Under -race the
// binary is built with the race detector too, and a race it reports (exit code 66) fails the test.
func TestBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	// Both under what the embedded etcd accepts (1.5 MiB requests, responses of any size): only the flags refuse.
	const maxSend, maxRecv = 1 << 20, 3 << 20
	// runBinary checks that systemd hears READY=1 once the proxy serves.
	r := runBinary(t, t.TempDir(), func(metrics string) []string {
		return []string{"--metrics-addr", "http://" + metrics, "--debug",
			"--max-send-bytes", fmt.Sprint(maxSend), "--max-recv-bytes", fmt.Sprint(maxRecv),
			"--resolver-prefix", "/etcdproxies", "--resolver-ttl", "5", "--namespace", "/ns/"}
	})
	listen, metrics, logs := r.listen, r.metrics, r.logs
	// --advertise-client-url's default is etcd grpc-proxy's, 127.0.0.1:23790: what the registration records.
	const advertised = "127.0.0.1:23790"

	c, err := clientv3.New(clientv3.Config{Endpoints: []string{listen}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Put(ctx, "k", "v"); err != nil {
		t.Fatalf("put through the proxy: %v", err)
	}
	if r, err := c.Get(ctx, "k", clientv3.WithSerializable()); err != nil || len(r.Kvs) != 1 || string(r.Kvs[0].Value) != "v" {
		t.Fatalf("get through the proxy: %v, %v", r, err)
	}
	// --namespace: in etcd, the key is under the prefix.
	direct, err := clientv3.New(clientv3.Config{Endpoints: []string{r.etcd},
		DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	// Every key etcd holds is under it: the client's, and the proxy's registration (--resolver-prefix, below).
	all, err := direct.Get(ctx, "", clientv3.WithFromKey(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, kv := range all.Kvs {
		keys = append(keys, string(kv.Key))
		if !strings.HasPrefix(string(kv.Key), "/ns/") {
			t.Errorf("--namespace=/ns/: etcd holds %q, outside the namespace", kv.Key)
		}
	}
	if !slices.Contains(keys, "/ns/k") {
		t.Fatalf("--namespace=/ns/: etcd holds %v; want /ns/k among them", keys)
	}

	// --resolver-prefix: the proxy registers itself (etcd's naming/endpoints record) under the prefix.
	for deadline := time.Now().Add(10 * time.Second); ; {
		got, err := c.Get(ctx, "/etcdproxies/"+advertised)
		if err == nil && len(got.Kvs) == 1 && strings.Contains(string(got.Kvs[0].Value), advertised) && got.Kvs[0].Lease != 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("--resolver-prefix: no registration under /etcdproxies/%s within 10s: %v, %v", advertised, got, err)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// --max-send-bytes: a request over it is refused as it arrives (etcd would take it); --max-recv-bytes: so is a
	// response over it (here 4 values of 900 KiB in one Range).
	_, err = c.Put(ctx, "big", strings.Repeat("x", maxSend+100<<10))
	if status.Code(err) != codes.ResourceExhausted ||
		!strings.Contains(err.Error(), fmt.Sprint("received message larger than max (", maxSend+100<<10+9, " vs. ", maxSend, ")")) {
		t.Errorf("put over --max-send-bytes: %v; want ResourceExhausted from the proxy's server, with the limit", err)
	}
	for i := 0; i < 4; i++ {
		if _, err := c.Put(ctx, fmt.Sprint("big/", i), strings.Repeat("x", 900<<10)); err != nil {
			t.Fatalf("put under --max-send-bytes: %v", err)
		}
	}
	_, err = c.Get(ctx, "big/", clientv3.WithPrefix())
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), fmt.Sprint("vs. ", maxRecv, ")")) {
		t.Errorf("get of 3.6 MiB over --max-recv-bytes: %v; want ResourceExhausted with the limit", err)
	}

	for _, addr := range []string{listen, metrics} {
		for _, path := range []string{"/health", "/proxy/health", "/metrics", "/proxy/metrics"} {
			deadline := time.Now().Add(10 * time.Second)
			for {
				code, body, err := get("http://" + addr + path)
				if err == nil && code == http.StatusOK {
					if strings.HasSuffix(path, "metrics") && !strings.Contains(body, "etcdproxy_") {
						t.Errorf("GET %s%s: no etcdproxy_ metric in the answer", addr, path)
					}
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("GET %s%s: %d, %v", addr, path, code, err)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	}

	if !strings.Contains(logs.String(), `"logger":"grpc"`) {
		t.Errorf("--debug: no gRPC log line in the proxy's log")
	}

	r.stop(t)
	// A clean stop is quiet: no error-level line (etcd's embed package logs its servers closing as errors).
	for _, line := range strings.Split(logs.String(), "\n") {
		if strings.Contains(line, `"level":"error"`) {
			t.Errorf("an error logged by a clean run and stop: %s", line)
		}
	}
}

func get(url string) (int, string, error) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, "", err
	}
	return resp.StatusCode, string(b), nil
}

// TestBadMetricsAddr: a --metrics-addr the proxy cannot serve (https without TLS toward clients) is refused before
// anything starts (here, before it would find its --listen-addr taken), with etcd grpc-proxy's error.
func TestBadMetricsAddr(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	cmd := newStartCommand()
	cmd.SetArgs([]string{"--metrics-addr", "https://127.0.0.1:1", "--endpoints", "127.0.0.1:1",
		"--listen-addr", taken.Addr().String()})
	cmd.SetOut(io.Discard)
	cmd.SetErr(io.Discard)
	err = cmd.Execute()
	if err == nil || err.Error() != "--metrics-addr: cannot listen on TLS for 127.0.0.1:1: KeyFile and CertFile are not presented" {
		t.Fatalf("start --metrics-addr https://...: %v; want the --metrics-addr error first", err)
	}
}
