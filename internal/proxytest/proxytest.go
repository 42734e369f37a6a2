// Package proxytest starts what a test of etcdproxy needs: real etcd members in-process, an etcdproxy in front of
// them on a loopback TCP port, and gRPC connections to both, all stopped by t.Cleanup; and it holds the helpers
// the tests of every package share (Timeout, Eventually, Put, EnableAuth, As, Gauge, WalkMessages, the leak
// checks), so that none is written twice. Only tests import it: the etcdproxy binary must not.
package proxytest

import (
	"context"
	"fmt"
	"net"
	"os"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/embedetcd"
	"github.com/etcdproxy/etcdproxy/overrides"
	"github.com/etcdproxy/etcdproxy/overrides/kvcache"
	"github.com/etcdproxy/etcdproxy/proxy"
	"github.com/prometheus/client_golang/prometheus"
	"go.etcd.io/etcd/api/v3/authpb"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
)

// Options describe the environment to start.
type Options struct {
	// Members is the etcd cluster size; 0 means 1.
	Members int
	// Configure adjusts each etcd member's configuration.
	Configure func(*embed.Config)
	// Proxy adjusts the proxy's configuration (Upstream is set already).
	Proxy func(*proxy.Config)
	// Upstream picks the endpoints the proxy connects to; nil means every member.
	Upstream func(*embedetcd.Cluster) []string
	// BeforeProxy, if set, runs once the cluster serves and before the proxy starts.
	BeforeProxy func(*embedetcd.Cluster)
	// User and Password, if set, are the proxy's own credentials for its internal calls (etcdproxy --user).
	User, Password string
}

// Env is a running etcd cluster with an etcdproxy in front of it.
type Env struct {
	Cluster  *embedetcd.Cluster
	Upstream *clientv3.Client
	Proxy    *proxy.Proxy
	// ProxyAddr is the proxy's loopback address (host:port).
	ProxyAddr string
	// Direct is a gRPC connection to the first etcd member; Via is one to the proxy.
	Direct, Via *grpc.ClientConn
}

// Start starts an Env and registers its teardown with t.Cleanup.
func Start(t testing.TB, o Options) *Env {
	t.Helper()
	c, err := embedetcd.Start(embedetcd.Options{Dir: t.TempDir(), Members: o.Members, Configure: o.Configure, LogLevel: "fatal"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	e := &Env{Cluster: c}
	if o.BeforeProxy != nil {
		o.BeforeProxy(c)
	}
	endpoints := c.Endpoints()
	if o.Upstream != nil {
		endpoints = o.Upstream(c)
	}
	e.Upstream, err = proxy.Dial(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Upstream.Close() })
	cfg := defaults(e.Upstream)
	if o.User != "" {
		internal, err := proxy.Dial(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second,
			Username: o.User, Password: o.Password})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { internal.Close() })
		cfg.Internal = internal
	}
	if o.Proxy != nil {
		o.Proxy(&cfg)
	}
	e.Proxy, e.ProxyAddr = serve(t, cfg)
	e.Direct = Conn(t, c.Members[0].ClientURL)
	e.Via = Conn(t, e.ProxyAddr)
	// Start in steady state: the proxy has seen the leader (its probe watch is open) and its read cache's
	// invalidation watch, if it can have one, is live. With auth on and no proxy credentials it cannot.
	Eventually(t, 10*time.Second, e.Proxy.HasLeader, "the proxy saw no leader within 10s of starting")
	if o.BeforeProxy == nil || o.User != "" {
		Eventually(t, 10*time.Second, e.Proxy.Steady, "the proxy's read cache was not live within 10s of starting")
	}
	return e
}

// defaults is the proxy's configuration on up as etcdproxy start runs it: the read cache on, with its
// command-line defaults, but for one: the cache's invalidation watch runs from the start (etcdproxy
// --kv-cache-watch-idle=0), so that the first reads of a test are cached as any later one. A watch that starts at
// the first read and stops when reads stop (the default) is tested on its own (kvcache's TestWatchRunsWhileRead),
// and by the suites that run the binary.
func defaults(up *clientv3.Client) proxy.Config {
	return proxy.Config{Upstream: up, Overrides: overrides.Config{KVCache: kvcache.Options{MaxBytes: 64 << 20,
		WatchIdle: -1}}}
}

// serve starts a proxy with cfg on a loopback port and stops it at cleanup.
func serve(t testing.TB, cfg proxy.Config) (*proxy.Proxy, string) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ServeOn(t, cfg, l), l.Addr().String()
}

// ServeOn starts a proxy with cfg on l (a TLS listener, say) and stops it at cleanup.
func ServeOn(t testing.TB, cfg proxy.Config, l net.Listener) *proxy.Proxy {
	t.Helper()
	p := proxy.New(cfg)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = p.Serve(l)
	}()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		p.Shutdown(ctx)
		<-served
	})
	return p
}

// AnotherProxy starts a second proxy in front of e's cluster, with the default configuration adjusted by configure
// (if given), and returns a connection to it: writes through it are writes made elsewhere for e's proxy.
func (e *Env) AnotherProxy(t testing.TB, configure ...func(*proxy.Config)) *grpc.ClientConn {
	t.Helper()
	up, err := proxy.Dial(clientv3.Config{Endpoints: e.Cluster.Endpoints(), DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { up.Close() })
	cfg := defaults(up)
	for _, c := range configure {
		c(&cfg)
	}
	p, addr := serve(t, cfg)
	Eventually(t, 10*time.Second, p.Steady, "the second proxy was not steady within 10s")
	return Conn(t, addr)
}

// Conn dials target ("host:port" or "http://host:port") with plain gRPC and closes it at cleanup.
func Conn(t testing.TB, target string) *grpc.ClientConn {
	t.Helper()
	if u, ok := trimScheme(target); ok {
		target = u
	}
	cc, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30), grpc.MaxCallSendMsgSize(1<<30)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// Client returns a clientv3 client of endpoint, closed at cleanup.
func Client(t testing.TB, endpoint string, opts ...func(*clientv3.Config)) *clientv3.Client {
	t.Helper()
	cfg := clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 5 * time.Second}
	for _, o := range opts {
		o(&cfg)
	}
	c, err := clientv3.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func trimScheme(s string) (string, bool) {
	for _, p := range []string{"http://", "https://"} {
		if len(s) > len(p) && s[:len(p)] == p {
			return s[len(p):], true
		}
	}
	return s, false
}

// Gauge returns the value of a gauge or counter from this process's default Prometheus registry (in-process etcd
// members register there; with several members, their values add up), summed over the series whose labels include
// every name=value pair of labels.
func Gauge(t testing.TB, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		var sum float64
	series:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				found := false
				for _, l := range m.GetLabel() {
					found = found || (l.GetName() == labels[i] && l.GetValue() == labels[i+1])
				}
				if !found {
					continue series
				}
			}
			sum += m.GetGauge().GetValue() + m.GetCounter().GetValue()
		}
		return sum
	}
	t.Fatalf("metric %s not found", name)
	return 0
}

// Eventually polls cond every 10ms until it holds or d passes, then fails the test with msg.
func Eventually(t testing.TB, d time.Duration, cond func() bool, msg string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf(msg, args...)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// LeakOptions are the goleak options for packages that run etcd in-process: they ignore goroutines that belong to
// etcd itself, never to the proxy.
//   - process-wide: glog's flush daemon, etcd's trace init;
//   - etcd's Election/Lock servers keep campaign leases alive through an in-process clientv3 they never close, not
//     even when the member is closed (the proxy's own code uses no clientv3 lessor);
//   - a stopped or restarted member leaves its peers' HTTP connections (raft transport) open for up to 5 s (no
//     package that uses these options serves or dials HTTP/1 of its own, apart from /health in package proxy,
//     whose tests close their responses).
func LeakOptions() []goleak.Option {
	return []goleak.Option{
		goleak.IgnoreTopFunction("github.com/golang/glog.(*fileSink).flushDaemon"),
		goleak.IgnoreAnyFunction("go.etcd.io/etcd/pkg/v3/traceutil.init"),
		goleak.IgnoreAnyFunction("go.etcd.io/etcd/server/v3/proxy/grpcproxy/adapter.(*chanStream).RecvMsg"),
		goleak.IgnoreAnyFunction("go.etcd.io/etcd/server/v3/proxy/grpcproxy/adapter.(*ls2lcServerStream).Recv"),
		goleak.IgnoreAnyFunction("go.etcd.io/etcd/server/v3/proxy/grpcproxy/adapter.newPipeStream.func1"),
		goleak.IgnoreTopFunction("go.etcd.io/etcd/server/v3/etcdserver/api/v3rpc.(*LeaseServer).LeaseKeepAlive"),
		goleak.IgnoreTopFunction("go.etcd.io/etcd/client/v3.(*lessor).sendKeepAliveLoop"),
		goleak.IgnoreTopFunction("go.etcd.io/etcd/client/v3.(*lessor).deadlineLoop"),
		goleak.IgnoreTopFunction("go.etcd.io/etcd/client/v3.(*lessor).recvKeepAliveLoop"),
		// etcd's Election server watches through its in-process clientv3 (Observe), which it never closes: the
		// client's watch stream, its context goroutine and the member's send loop for it can outlive the call
		// (seen in package namespace). The proxy's own clientv3 watches (MemberList, registration) end with Close.
		goleak.IgnoreTopFunction("go.etcd.io/etcd/client/v3.(*watchGRPCStream).run"),
		goleak.IgnoreTopFunction("go.etcd.io/etcd/server/v3/etcdserver/api/v3rpc.(*serverWatchStream).sendLoop"),
		goleak.IgnoreTopFunction("context.(*cancelCtx).propagateCancel.func2"),
		goleak.IgnoreAnyFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreAnyFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreAnyFunction("net/http.(*conn).serve"),
		goleak.IgnoreAnyFunction("net/http.(*connReader).backgroundRead"),
	}
}

// VerifyTestMain runs the package's tests and then, if they passed, fails the run when goroutines are left over
// (LeftOver), as goleak.VerifyTestMain does; atExit run last, before the process exits.
func VerifyTestMain(m *testing.M, atExit ...func()) {
	code := m.Run()
	if code == 0 {
		if err := LeftOver(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			code = 1
		}
	}
	for _, f := range atExit {
		f()
	}
	os.Exit(code)
}

// LeftOver reports the goroutines (LeakOptions and extra aside) still running 10 s from now, or as soon as none
// is: it gives goroutines that are still ending (a closed client's watch stream, an etcd member's send loop for a
// stream just closed, its peers' HTTP connections) the time a loaded machine may take. goleak's own retries last
// about 0.4 s (v1.3.0: 20 sleeps, from 1 µs doubling to at most 100 ms); a goroutine that never ends is still
// reported.
func LeftOver(extra ...goleak.Option) error {
	opts := append(LeakOptions(), extra...)
	err := goleak.Find(opts...)
	for deadline := time.Now().Add(10 * time.Second); err != nil && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond)
		err = goleak.Find(opts...)
	}
	if err != nil {
		return fmt.Errorf("goleak: goroutines left over 10 s after the tests: %w", err)
	}
	return nil
}

// Timeout returns a context that ends after d or when the test ends.
func Timeout(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// Put writes key=value through cc and returns the revision of the write.
func Put(t testing.TB, ctx context.Context, cc *grpc.ClientConn, key, value string) int64 {
	t.Helper()
	r, err := pb.NewKVClient(cc).Put(ctx, &pb.PutRequest{Key: []byte(key), Value: []byte(value)})
	if err != nil {
		t.Fatal(err)
	}
	return r.Header.Revision
}

// User is an etcd user for EnableAuth: it gets a role of its own that may read [ReadFrom, ReadTo) (a single key
// if ReadTo is empty; nothing if ReadFrom is empty).
type User struct {
	Name, Password   string
	ReadFrom, ReadTo string
}

// EnableAuth creates root with rootPassword and users, then enables auth, through cc.
func EnableAuth(t testing.TB, ctx context.Context, cc *grpc.ClientConn, rootPassword string, users ...User) {
	t.Helper()
	auth := pb.NewAuthClient(cc)
	must := func(_ any, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(auth.UserAdd(ctx, &pb.AuthUserAddRequest{Name: "root", Password: rootPassword}))
	must(auth.UserGrantRole(ctx, &pb.AuthUserGrantRoleRequest{User: "root", Role: "root"}))
	for _, u := range users {
		must(auth.UserAdd(ctx, &pb.AuthUserAddRequest{Name: u.Name, Password: u.Password}))
		if u.ReadFrom == "" {
			continue
		}
		role := u.Name + "-reader"
		must(auth.RoleAdd(ctx, &pb.AuthRoleAddRequest{Name: role}))
		must(auth.RoleGrantPermission(ctx, &pb.AuthRoleGrantPermissionRequest{Name: role,
			Perm: &authpb.Permission{PermType: authpb.READ, Key: []byte(u.ReadFrom), RangeEnd: []byte(u.ReadTo)}}))
		must(auth.UserGrantRole(ctx, &pb.AuthUserGrantRoleRequest{User: u.Name, Role: role}))
	}
	must(auth.AuthEnable(ctx, &pb.AuthEnableRequest{}))
}

// As authenticates name through cc and returns ctx carrying the token as gRPC metadata, as clientv3 sends it.
func As(t testing.TB, ctx context.Context, cc *grpc.ClientConn, name, password string) context.Context {
	t.Helper()
	r, err := pb.NewAuthClient(cc).Authenticate(ctx, &pb.AuthenticateRequest{Name: name, Password: password})
	if err != nil {
		t.Fatalf("authenticate %s: %v", name, err)
	}
	return metadata.AppendToOutgoingContext(ctx, "token", r.Token)
}
