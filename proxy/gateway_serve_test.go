package proxy_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/proxy"
	"github.com/google/go-cmp/cmp"
	"github.com/gorilla/websocket"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3lock/v3lockpb"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/encoding/protojson"
)

// TestGatewayTLS: on a TLS listener (as etcdproxy start builds it), the gateway answers over HTTPS with HTTP/1.1 and
// with HTTP/2 (what curl and Go's client negotiate with etcd's TLS configuration, ALPN h2): a put, a range whose
// answer is etcd's own (asked over plaintext on the member the proxy forwards to), and a watch whose event arrives
// while the stream is open, so each message is flushed through TLS and h2Conn as it comes.
func TestGatewayTLS(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ca, addr := serveTLS(t, proxy.Config{Upstream: e.Upstream})
	base := "https://" + addr
	direct := &http.Client{Transport: &http.Transport{}}
	t.Cleanup(direct.CloseIdleConnections)

	for _, h2 := range []bool{false, true} {
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool()}, ForceAttemptHTTP2: h2}
		hc := &http.Client{Transport: tr}
		ctx := proxytest.Timeout(t, 15*time.Second)
		key := fmt.Sprintf("tls/%v", h2)
		if code, body := postJSON(ctx, t, hc, base+"/v3/kv/put", fmt.Sprintf(`{"key":%q,"value":"dg=="}`, b64(key)), h2); code != http.StatusOK {
			t.Fatalf("put over HTTPS (HTTP/2 %v): %d %s", h2, code, body)
		}
		rng := fmt.Sprintf(`{"key":%q}`, b64(key))
		_, via := postJSON(ctx, t, hc, base+"/v3/kv/range", rng, h2)
		_, own := postJSON(ctx, t, direct, e.Cluster.Members[0].ClientURL+"/v3/kv/range", rng, false)
		if d := cmp.Diff(decodeAll(own), decodeAll(via)); d != "" || !strings.Contains(string(via), b64(key)) {
			t.Errorf("range over HTTPS (HTTP/2 %v) differs from etcd's answer (-etcd +proxy):\n%s\n%s", h2, d, via)
		}
		watchOverHTTPS(ctx, t, hc, base, e, h2)
		tr.CloseIdleConnections()
	}
}

// postJSON posts body to url and returns the status and the whole answer; it fails the test unless the answer came
// over HTTP/2 exactly when h2 is set.
func postJSON(ctx context.Context, t *testing.T, hc *http.Client, url, body string, h2 bool) (int, []byte) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("POST %s: %v", url, err)
	}
	if (resp.ProtoMajor == 2) != h2 {
		t.Errorf("POST %s: answered over %s", url, resp.Proto)
	}
	return resp.StatusCode, b
}

// watchOverHTTPS opens a watch through the gateway, writes the key through gRPC, and waits for the event.
func watchOverHTTPS(ctx context.Context, t *testing.T, hc *http.Client, base string, e *proxytest.Env, h2 bool) {
	t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	key := fmt.Sprintf("tls/w/%v", h2)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v3/watch",
		strings.NewReader(fmt.Sprintf(`{"create_request":{"key":%q}}`, b64(key))))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("watch over HTTPS (HTTP/2 %v): %v", h2, err)
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	next := func() *pb.WatchResponse {
		var msg struct{ Result json.RawMessage }
		r := &pb.WatchResponse{}
		if err := dec.Decode(&msg); err != nil {
			t.Fatalf("watch over HTTPS (HTTP/2 %v): %v", h2, err)
		}
		if err := protojson.Unmarshal(msg.Result, r); err != nil {
			t.Fatalf("watch over HTTPS (HTTP/2 %v): %s: %v", h2, msg.Result, err)
		}
		return r
	}
	if r := next(); !r.Created {
		t.Fatalf("watch over HTTPS (HTTP/2 %v): the first message: %v", h2, r)
	}
	if _, err := pb.NewKVClient(e.Direct).Put(ctx, &pb.PutRequest{Key: []byte(key), Value: []byte("w")}); err != nil {
		t.Fatal(err)
	}
	if r := next(); len(r.Events) != 1 || string(r.Events[0].Kv.Key) != key {
		t.Fatalf("watch over HTTPS (HTTP/2 %v): the event: %v", h2, r)
	}
}

// TestGatewayNamespace: a gateway request takes the path a gRPC client's call takes through the proxy, overrides
// included. With --namespace, a put of "a" through the gateway writes "ns/a" in etcd, and a range of "a" answers
// with the key "a"; a gateway that called etcd on a connection of its own would write "a".
func TestGatewayNamespace(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{Proxy: func(c *proxy.Config) { c.Overrides.Namespace = "ns/" }})
	hc := &http.Client{Transport: &http.Transport{}}
	t.Cleanup(hc.CloseIdleConnections)
	ctx := proxytest.Timeout(t, 15*time.Second)
	base := "http://" + e.ProxyAddr
	if code, body := postJSON(ctx, t, hc, base+"/v3/kv/put", fmt.Sprintf(`{"key":%q,"value":"dg=="}`, b64("a")), false); code != http.StatusOK {
		t.Fatalf("put through the gateway: %d %s", code, body)
	}
	r, err := pb.NewKVClient(e.Direct).Range(ctx, &pb.RangeRequest{Key: []byte("a"), RangeEnd: []byte("b")})
	if err != nil || len(r.Kvs) != 0 {
		t.Errorf("etcd has keys under a: %v, %v", r, err)
	}
	r, err = pb.NewKVClient(e.Direct).Range(ctx, &pb.RangeRequest{Key: []byte("ns/a")})
	if err != nil || len(r.Kvs) != 1 || string(r.Kvs[0].Value) != "v" {
		t.Errorf("etcd's ns/a: %v, %v", r, err)
	}
	_, body := postJSON(ctx, t, hc, base+"/v3/kv/range", fmt.Sprintf(`{"key":%q}`, b64("a")), false)
	var got pb.RangeResponse
	if err := protojson.Unmarshal(body, &got); err != nil || len(got.Kvs) != 1 || string(got.Kvs[0].Key) != "a" {
		t.Errorf("range of a through the gateway: %s (%v)", body, err)
	}
}

// TestGatewayShutdown: Shutdown ends the gateway's open watch streams at once, over HTTP and over a websocket, with
// the proxy's shutting-down error as their last message, closes a websocket whose unary call never got its request, and leaves
// no goroutine behind (the gateway's in-memory connection and listener are closed). Shutdown's timeout is long: a
// stream left open would hold it there. (The websocket's last message once came only in most runs: the gateway
// closed the websocket before grpc-websocket-proxy had written it.)
func TestGatewayShutdown(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	before := goleak.IgnoreCurrent()
	p, l, served := startOwnProxy(t, e)
	ctx := proxytest.Timeout(t, 30*time.Second)
	tr := &http.Transport{}
	watch := fmt.Sprintf(`{"create_request":{"key":%q}}`, b64("sd"))
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+l.Addr().String()+"/v3/watch", strings.NewReader(watch))
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	ws, _, err := websocket.DefaultDialer.DialContext(ctx, "ws://"+l.Addr().String()+"/v3/watch", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	if err := ws.WriteMessage(websocket.TextMessage, []byte(watch)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := ws.ReadMessage(); err != nil {
		t.Fatalf("websocket watch: %v", err)
	}
	// A websocket to a unary route whose client never sends its request: the gateway waits for the request before
	// it calls, so no call exists to end, and Shutdown's wait for the websockets to deliver their last messages must
	// be bounded by more than its 30 s context.
	idle, _, err := websocket.DefaultDialer.DialContext(ctx, "ws://"+l.Addr().String()+"/v3/kv/range", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	if msgs, err := readMessages(resp.Body, 1); err != nil {
		t.Fatalf("HTTP watch: %v, %v", msgs, err)
	}

	start := time.Now()
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p.Shutdown(sctx)
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Shutdown took %v with gateway watches open", d)
	}
	if err := <-served; err != nil {
		t.Errorf("Serve: %v", err)
	}
	const ended = `"message":"etcdproxy: shutting down"`
	rest, err := io.ReadAll(resp.Body)
	if !strings.Contains(string(rest), ended) {
		t.Errorf("the HTTP watch ended with %q, %v; want its last message to hold %s", rest, err, ended)
	}
	_, last, err := ws.ReadMessage()
	if !strings.Contains(string(last), ended) {
		t.Errorf("the websocket watch ended with %q, %v; want its last message to hold %s", last, err, ended)
	}
	if _, msg, err := idle.ReadMessage(); err == nil {
		t.Errorf("the websocket that sent nothing got %q after Shutdown; want it closed", msg)
	}
	tr.CloseIdleConnections()
	if err := proxytest.LeftOver(before); err != nil {
		t.Error(err)
	}
}

// TestGatewayShutdownDrains: a gateway call in flight when Shutdown starts finishes, as a gRPC unary call does, and
// its client gets the answer. The call is a Lock that waits for a lock held elsewhere, released once Shutdown has
// stopped accepting connections.
func TestGatewayShutdownDrains(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 30*time.Second)
	leases := pb.NewLeaseClient(e.Direct)
	held, err := leases.LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	waiting, err := leases.LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	locks := v3lockpb.NewLockClient(e.Direct)
	lock, err := locks.Lock(ctx, &v3lockpb.LockRequest{Name: []byte("dl"), Lease: held.ID})
	if err != nil {
		t.Fatal(err)
	}

	hc := &http.Client{Transport: &http.Transport{}}
	defer hc.CloseIdleConnections()
	answered := postInBackground(hc, "http://"+e.ProxyAddr+"/v3/lock/lock", fmt.Sprintf(`{"name":%q,"lease":%d}`, b64("dl"), waiting.ID))
	// The gateway's Lock waits once its key is in etcd, behind the held one.
	proxytest.Eventually(t, 10*time.Second, func() bool {
		r, err := pb.NewKVClient(e.Direct).Range(ctx, &pb.RangeRequest{Key: []byte("dl/"), RangeEnd: keyPrefixEnd("dl/"), CountOnly: true})
		return err == nil && r.Count == 2
	}, "the gateway's Lock did not reach etcd")

	shut := make(chan time.Duration, 1)
	go func() {
		start := time.Now()
		sctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		e.Proxy.Shutdown(sctx)
		shut <- time.Since(start)
	}()
	proxytest.Eventually(t, 10*time.Second, func() bool { return !accepts(e.ProxyAddr) },
		"the proxy still accepts connections after Shutdown started")
	if _, err := locks.Unlock(ctx, &v3lockpb.UnlockRequest{Key: lock.Key}); err != nil {
		t.Fatal(err)
	}
	a := <-answered
	if want := b64(fmt.Sprintf("dl/%x", waiting.ID)); a.err != nil || a.code != http.StatusOK || !strings.Contains(string(a.body), want) {
		t.Errorf("the gateway's Lock during Shutdown: %d %s, %v; want 200 with the key %s", a.code, a.body, a.err, want)
	}
	if d := <-shut; d > 10*time.Second {
		t.Errorf("Shutdown took %v", d)
	}
}

// httpAnswer is an answer postInBackground received.
type httpAnswer struct {
	code int
	body []byte
	err  error
}

// postInBackground posts body to url from a goroutine of its own and delivers the answer on the channel.
func postInBackground(hc *http.Client, url, body string) <-chan httpAnswer {
	answered := make(chan httpAnswer, 1)
	go func() {
		var a httpAnswer
		defer func() { answered <- a }()
		resp, err := hc.Post(url, "application/json", strings.NewReader(body))
		if a.err = err; err != nil {
			return
		}
		defer resp.Body.Close()
		a.code = resp.StatusCode
		a.body, a.err = io.ReadAll(resp.Body)
	}()
	return answered
}

// accepts reports whether a TCP connection to addr can be made.
func accepts(addr string) bool {
	c, err := net.Dial("tcp", addr)
	if err == nil {
		c.Close()
	}
	return err == nil
}

// startOwnProxy starts a proxy in front of e's cluster that the test shuts down itself; served delivers what Serve
// returned.
func startOwnProxy(t *testing.T, e *proxytest.Env) (*proxy.Proxy, net.Listener, <-chan error) {
	t.Helper()
	p := proxy.New(proxy.Config{Upstream: e.Upstream})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- p.Serve(l) }()
	proxytest.Eventually(t, 10*time.Second, p.HasLeader, "the proxy saw no leader within 10s")
	return p, l, served
}

// TestGatewayShutdownStuckWebsocket: a websocket whose client stopped reading, with the proxy blocked writing
// events to it, is closed by Shutdown too; nothing of it stays behind. (The HTTP server does not see a hijacked
// connection, and the stream's end cannot reach a goroutine blocked in a write.)
func TestGatewayShutdownStuckWebsocket(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 60*time.Second)
	kv := pb.NewKVClient(e.Direct)
	if _, err := kv.Put(ctx, &pb.PutRequest{Key: []byte("big")}); err != nil { // connects e.Direct before the snapshot
		t.Fatal(err)
	}
	before := goleak.IgnoreCurrent()
	p, l, served := startOwnProxy(t, e)
	// A small receive buffer, so that a few events fill what the connection holds.
	dialer := websocket.Dialer{NetDialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if err == nil {
			err = c.(*net.TCPConn).SetReadBuffer(4 << 10)
		}
		return c, err
	}}
	ws, _, err := dialer.DialContext(ctx, "ws://"+l.Addr().String()+"/v3/watch", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	if err := ws.WriteMessage(websocket.TextMessage, []byte(fmt.Sprintf(`{"create_request":{"key":%q}}`, b64("big")))); err != nil {
		t.Fatal(err)
	}
	if _, _, err := ws.ReadMessage(); err != nil {
		t.Fatalf("websocket watch: %v", err)
	}
	// 16 MiB of events, more than the socket buffers of a loopback connection hold; the client reads none.
	value := bytes.Repeat([]byte("x"), 1<<20)
	for range 16 {
		if _, err := kv.Put(ctx, &pb.PutRequest{Key: []byte("big"), Value: value}); err != nil {
			t.Fatal(err)
		}
	}
	// A short timeout: the stream's end waits behind the events its client does not read, so Shutdown drains until
	// the timeout, as with a gRPC client that stopped reading.
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	p.Shutdown(sctx)
	if err := <-served; err != nil {
		t.Errorf("Serve: %v", err)
	}
	if err := proxytest.LeftOver(before); err != nil {
		t.Error(err)
	}
}
