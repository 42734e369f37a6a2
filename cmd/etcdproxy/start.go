package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/etcdproxy/etcdproxy/overrides"
	"github.com/etcdproxy/etcdproxy/overrides/kvcache"
	"github.com/etcdproxy/etcdproxy/overrides/lease"
	"github.com/etcdproxy/etcdproxy/overrides/members"
	"github.com/etcdproxy/etcdproxy/overrides/ryw"
	"github.com/etcdproxy/etcdproxy/proxy"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zapgrpc"
	"google.golang.org/grpc/grpclog"
)

// startFlags are the flags of `etcdproxy start`. Names and defaults follow `etcd grpc-proxy start`, except where a
// flag's help says otherwise.
type startFlags struct {
	endpoints             []string
	endpointsAutoSync     time.Duration
	listenAddr            string
	advertiseClientURL    string
	advertiseSet          bool // --advertise-client-url was given: MemberList answers with the proxies
	dataDir               string
	debug                 bool
	maxSendBytes          int
	maxRecvBytes          int
	maxConcurrentStreams  uint32
	dynamicWindow         bool
	grpcKeepAliveMinTime  time.Duration
	grpcKeepAliveInterval time.Duration
	grpcKeepAliveTimeout  time.Duration
	dialKeepAliveTime     time.Duration
	dialKeepAliveTimeout  time.Duration
	permitWithoutStream   bool
	cert, key, cacert     string
	insecureSkipTLSVerify bool

	user         string
	password     string
	kvCacheBytes int64
	kvCacheTTL   time.Duration
	kvCacheLin   bool
	kvCacheAdmit string
	kvCacheIdle  time.Duration
	leaseStreams int
	leaseRenew   time.Duration
	metricsAddr  string
	metricsURL   string // --metrics-addr's scheme: http, https or unix
	enablePprof  bool
	tls          tlsFlags // TLS toward clients (tls.go)
	namespace    string

	serializableOrdering  bool
	logCalls              bool
	leasingPrefix         string
	resolverPrefix        string
	resolverTTL           int
	discoverySRV          string
	discoverySRVName      string
	insecureDiscovery     bool
	embeddedEtcd          bool
	embeddedEtcdClientURL string
	embeddedEtcdPeerURL   string
	embeddedEtcdBinary    string
	shutdownTimeout       time.Duration
}

func newStartCommand() *cobra.Command { return startCommand(&startFlags{}, runStart) }

// checkResolver validates --resolver-prefix and --resolver-ttl as etcd grpc-proxy does, with its messages.
func (f *startFlags) checkResolver() error {
	switch {
	case f.resolverPrefix != "" && f.resolverTTL < 1:
		return fmt.Errorf("invalid resolver-ttl %d", f.resolverTTL)
	case f.resolverPrefix == "" && f.resolverTTL > 0:
		return fmt.Errorf("invalid resolver-prefix %q", f.resolverPrefix)
	case f.resolverPrefix != "" && f.advertiseClientURL == "":
		return fmt.Errorf("invalid advertise-client-url %q", f.advertiseClientURL)
	}
	return nil
}

// errLeasing refuses --experimental-leasing-prefix (README: "Not built").
var errLeasing = errors.New("--experimental-leasing-prefix is not supported by etcdproxy: etcd's leasing KV writes " +
	"lease keys under the prefix into your keyspace, where every client sees them; the proxy's read cache serves " +
	"reads from memory, kept coherent by a watch, without writing anything into etcd")

// addFlags declares start's flags into f: every flag of etcd grpc-proxy start v3.7.3, then etcdproxy's own.
func (f *startFlags) addFlags(fs *pflag.FlagSet) {
	fs.StringSliceVar(&f.endpoints, "endpoints", []string{"127.0.0.1:2379"}, "comma separated etcd cluster endpoints")
	fs.StringVar(&f.discoverySRV, "discovery-srv", "", "domain name to query for SRV records describing cluster endpoints (_etcd-client-ssl._tcp and _etcd-client._tcp); the endpoints found replace --endpoints")
	fs.StringVar(&f.discoverySRVName, "discovery-srv-name", "", "service name to query when using DNS discovery (_etcd-client-NAME._tcp)")
	fs.BoolVar(&f.insecureDiscovery, "insecure-discovery", false, "accept insecure SRV records: without it, only https endpoints that pass a TLS handshake (verified with --cacert) are used")
	fs.DurationVar(&f.endpointsAutoSync, "endpoints-auto-sync-interval", 0, "etcd endpoints auto sync interval (disabled by default)")
	fs.StringVar(&f.listenAddr, "listen-addr", "127.0.0.1:23790", "listen address")
	fs.StringVar(&f.advertiseClientURL, "advertise-client-url", "127.0.0.1:23790", "advertise address to register (must be reachable by client) with --resolver-prefix; given (or with --resolver-prefix), MemberList answers with the proxies (the registered ones, or this one) instead of etcd's members, so that clients which sync their endpoints stay on proxies; given empty, MemberList is etcd's")
	fs.StringVar(&f.resolverPrefix, "resolver-prefix", "", "prefix to use for registering proxy (must be shared with other grpc-proxy members): the proxy keeps PREFIX/ADVERTISE-CLIENT-URL registered (etcd's naming/endpoints) under a lease of --resolver-ttl seconds, so clients find the live proxies with etcd's gRPC resolver (target etcd:///PREFIX); it deregisters at once on a clean stop")
	fs.IntVar(&f.resolverTTL, "resolver-ttl", 0, "specify TTL, in seconds, when registering proxy endpoints")
	fs.StringVar(&f.dataDir, "data-dir", "default.proxy", "data directory for persistent data (the embedded etcd's data with --embedded-etcd)")
	fs.BoolVar(&f.debug, "debug", false, "enable debug-level logging, gRPC's own logs included")
	fs.IntVar(&f.maxSendBytes, "max-send-bytes", 0, "largest message in bytes the proxy sends to etcd, and so the largest request it accepts from a client (a larger one gets ResourceExhausted from the proxy); 0 (the default) leaves the limit to etcd's --max-request-bytes, so an oversized request gets etcd's own error (etcd grpc-proxy defaults to 1.5 MiB and answers requests between its limit and etcd's with a different, client-side error)")
	fs.IntVar(&f.maxRecvBytes, "max-recv-bytes", math.MaxInt32, "largest message in bytes the proxy receives from etcd, and so the largest response it sends to a client (a larger one gets ResourceExhausted); 0 means the default")
	fs.Uint32Var(&f.maxConcurrentStreams, "max-concurrent-streams", math.MaxUint32, "maximum concurrent streams that each client can open at a time (applied to the proxy's gRPC server)")
	fs.DurationVar(&f.grpcKeepAliveMinTime, "grpc-keepalive-min-time", 5*time.Second, "minimum interval duration that a client should wait before pinging proxy (0: gRPC's default, 5m, as with etcd grpc-proxy; a negative value counts as 0, where etcd grpc-proxy would hand it to gRPC)")
	fs.DurationVar(&f.grpcKeepAliveInterval, "grpc-keepalive-interval", 2*time.Hour, "frequency duration of server-to-client ping to check if a connection is alive (0: gRPC's default, 2h, as with etcd grpc-proxy; a negative value counts as 0, where etcd grpc-proxy would hand it to gRPC)")
	fs.DurationVar(&f.grpcKeepAliveTimeout, "grpc-keepalive-timeout", 20*time.Second, "additional duration of wait before closing a non-responsive connection (0: gRPC's default, 20s, as with etcd grpc-proxy; a negative value counts as 0, where etcd grpc-proxy would hand it to gRPC)")
	fs.BoolVar(&f.dynamicWindow, "grpc-dynamic-window", false, "give client connections gRPC's default flow control, windows grown by bandwidth-delay estimation (a PING whenever data arrives and none is out), instead of static ones (64 KiB per stream, 16 MiB per connection): for clients far from the proxy that send large puts or txns, which a 64 KiB window slows to 64 KiB per round trip")
	fs.DurationVar(&f.dialKeepAliveTime, "dial-keepalive-time", 0, "keepalive time for the proxy's connections to etcd (0 disables)")
	fs.DurationVar(&f.dialKeepAliveTimeout, "dial-keepalive-timeout", 20*time.Second, "keepalive timeout for the proxy's connections to etcd")
	fs.BoolVar(&f.permitWithoutStream, "permit-without-stream", false, "let the proxy send keepalive pings to etcd even with no active RPCs")
	fs.StringVar(&f.cert, "cert", "", "identify secure connections with etcd servers using this TLS certificate file")
	fs.StringVar(&f.key, "key", "", "identify secure connections with etcd servers using this TLS key file")
	fs.StringVar(&f.cacert, "cacert", "", "verify certificates of TLS-enabled secure etcd servers using this CA bundle")
	f.tls.register(fs)
	fs.BoolVar(&f.insecureSkipTLSVerify, "insecure-skip-tls-verify", false, "skip authentication of etcd server TLS certificates (CAUTION: for testing only)")
	fs.StringVar(&f.user, "user", "", "the proxy's own etcd user, as username or username:password, for its internal calls only (the read cache's keyspace watch needs read permission on every key when auth is enabled); client calls always carry the client's own credentials")
	fs.StringVar(&f.password, "password", "", "password of --user (or give it as username:password)")
	fs.Int64Var(&f.kvCacheBytes, "kv-cache-bytes", 64<<20, "size of the read cache (serializable reads, and linearizable ones with --kv-cache-linearizable), in bytes of cached responses (each held decoded and encoded, so counted twice its encoded size; with --kv-cache-admit=second, a table of up to 1/32 of it, growing with the keys, besides remembers the keys that missed); 0 turns the cache off")
	fs.DurationVar(&f.kvCacheTTL, "kv-cache-ttl", 30*time.Second, "longest life of a cached read; the cache is kept coherent by a watch, this is a backstop")
	fs.StringVar(&f.kvCacheAdmit, "kv-cache-admit", "second", "when the read cache stores a read's answer: second (a key's first miss is only remembered, in a table of up to 1/32 of --kv-cache-bytes, and its answer stored at the key's second miss, or at the first when identical reads wait for it: keys read once take no cache memory and cost no store) or first (at every miss, keys never read again included; a key read twice then costs etcd one read, not two)")
	fs.DurationVar(&f.kvCacheIdle, "kv-cache-watch-idle", kvcache.DefaultWatchIdle, "how long the read cache's keyspace watch runs with no cacheable read before it stops, so that etcd stops sending this proxy an event for every write (the next cacheable read starts it again, and goes to etcd meanwhile); 0 keeps the watch running from the start")
	fs.BoolVar(&f.kvCacheLin, "kv-cache-linearizable", true, "also answer linearizable reads from the cache when that is provably linearizable (one shared linearizable barrier read to etcd per batch of reads, then the cache's watch must have reached its revision; with auth enabled they always go to etcd); false sends every linearizable read to etcd")
	fs.DurationVar(&f.leaseRenew, "lease-renew-timeout", lease.DefaultRenewTimeout, "how long a client's lease keepalive request may wait through the proxy for etcd's answer (re-sent meanwhile when its upstream stream fails, as while the cluster has no leader) before the client's stream ends as etcd ends it: with 'etcdserver: no leader' when the proxy sees no leader, else 'etcdserver: request timed out'; set it to etcd's own bound on a renewal, 5s + 2 x etcd's --election-timeout; must be positive")
	fs.IntVar(&f.leaseStreams, "lease-keepalive-streams", lease.DefaultStreams, "upstream LeaseKeepAlive streams that the client keepalive streams of one identity (auth token) share at most, each client stream on one of them: etcd renews one stream's leases one at a time (a member that is not the leader asks the leader for each renewal), so a few streams renew in parallel; at least 1")
	fs.StringVar(&f.metricsAddr, "metrics-addr", "", "also serve /metrics and /health (and /debug/pprof with --enable-pprof) on this URL, as etcd grpc-proxy takes it: http://host:port, https://host:port (TLS toward clients, as on --listen-addr; needs --cert-file/--key-file or --auto-tls) or unix://name (a unix socket; the URL's host part is the socket file, as with etcd); host:port works too, as http; they are always served on --listen-addr too")
	fs.StringVar(&f.namespace, "namespace", "", "string to prefix to all keys for namespacing requests (every keyed service: KV, Watch, LeaseTimeToLive keys, Election and Lock names and keys; end it with a separator, e.g. /tenant1/: /t1 and /t10 overlap, /t1/ and /t10/ do not)")
	fs.BoolVar(&f.enablePprof, "enable-pprof", false, "serve runtime profiling data at /debug/pprof/")
	fs.BoolVar(&f.serializableOrdering, "experimental-serializable-ordering", false, "ensure serializable reads have monotonically increasing store revisions across endpoints: no serializable answer, cached or not, is older than an answer the proxy has already given (it is read again, then linearizably)")
	fs.BoolVar(&f.logCalls, "experimental-enable-grpc-logging", false, "log every gRPC request and response (streams message by message), with passwords and tokens redacted")
	fs.StringVar(&f.leasingPrefix, "experimental-leasing-prefix", "", "not supported (etcd grpc-proxy: leasing metadata prefix for disconnected linearized reads): the proxy's coherent read cache serves reads without writing leasing keys into etcd; a value is refused")
	fs.BoolVar(&f.embeddedEtcd, "embedded-etcd", false, "start a single-member etcd in --data-dir on loopback and proxy to it")
	fs.StringVar(&f.embeddedEtcdClientURL, "embedded-etcd-client-url", "http://127.0.0.1:23791", "client URL of the embedded etcd (with --embedded-etcd)")
	fs.StringVar(&f.embeddedEtcdPeerURL, "embedded-etcd-peer-url", "http://127.0.0.1:23792", "peer URL of the embedded etcd (with --embedded-etcd)")
	fs.StringVar(&f.embeddedEtcdBinary, "embedded-etcd-binary", "", "the etcdproxy-etcd binary that runs the embedded etcd, as a child process (with --embedded-etcd; default: the one beside this binary, else the one in PATH)")
	fs.DurationVar(&f.shutdownTimeout, "shutdown-timeout", 5*time.Second, "on SIGINT or SIGTERM, how long running calls may finish before the proxy ends them and exits; watch, lease keepalive and election observe streams, which never finish by themselves, end at once with Unavailable so that clients reconnect elsewhere")
}

// watchIdle is --kv-cache-watch-idle as kvcache.Options takes it: 0 there is the default, negative is always on.
func (f *startFlags) watchIdle() time.Duration {
	if f.kvCacheIdle == 0 {
		return -1
	}
	return f.kvCacheIdle
}

// startCommand is `start` with its flags in f, running run once they are checked.
func startCommand(f *startFlags, run func(*startFlags) error) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "start",
		Short: "Serve the etcd v3 gRPC API, forwarding to an etcd cluster",
		Long: `Serve the etcd v3 gRPC API on --listen-addr, forwarding every RPC to the etcd cluster at --endpoints.
Clients (etcdctl, clientv3, Kubernetes) use it exactly as they would use etcd. The same port serves etcd's
HTTP/JSON gateway (/v3/kv/range, /v3/watch, ...) as an etcd member's client port does, and /health and /metrics.

With --embedded-etcd, etcdproxy first starts a single-member etcd in --data-dir on loopback and proxies to it:
one command gives a working endpoint, for trying it out and for development. The member runs as a child process,
etcdproxy-etcd (built beside etcdproxy by make build), and stops with the proxy; if it exits, so does the proxy.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if (cmd.Flags().Changed("endpoints") || f.discoverySRV != "") && f.embeddedEtcd {
				return errors.New("--endpoints (or --discovery-srv) and --embedded-etcd exclude each other: the embedded etcd is the upstream")
			}
			if f.leasingPrefix != "" {
				return errLeasing
			}
			if f.kvCacheIdle < 0 {
				return fmt.Errorf("--kv-cache-watch-idle: %v is negative", f.kvCacheIdle)
			}
			if f.leaseStreams < 1 {
				return fmt.Errorf("--lease-keepalive-streams: %d is not at least 1", f.leaseStreams)
			}
			if f.leaseRenew <= 0 {
				return fmt.Errorf("--lease-renew-timeout: %v is not positive", f.leaseRenew)
			}
			if f.kvCacheAdmit != "first" && f.kvCacheAdmit != "second" {
				return fmt.Errorf("--kv-cache-admit: %q is neither first nor second", f.kvCacheAdmit)
			}
			f.advertiseSet = cmd.Flags().Changed("advertise-client-url")
			if err := f.checkResolver(); err != nil {
				return err
			}
			if err := f.tls.check(); err != nil {
				return err
			}
			if f.metricsAddr != "" {
				scheme, addr, err := metricsListenAddr(f.metricsAddr)
				if err == nil && scheme == "https" && !f.tls.serving() {
					err = fmt.Errorf("cannot listen on TLS for %s: KeyFile and CertFile are not presented", addr) // etcd's words
				}
				if err != nil {
					return fmt.Errorf("--metrics-addr: %w", err)
				}
				f.metricsURL, f.metricsAddr = scheme, addr
			}
			return run(f)
		},
	}
	f.addFlags(cmd.Flags())
	return cmd
}

func runStart(f *startFlags) error {
	lg, err := newLogger(f.debug)
	if err != nil {
		return err
	}
	defer func() { _ = lg.Sync() }()
	// TLS toward clients, before anything starts (as etcd grpc-proxy, which builds it first).
	tlsInfo, err := f.tls.info(lg, f.listenAddr, f.dataDir)
	if err != nil {
		return err
	}
	endpoints, stopEtcd, etcdDied, err := startUpstream(f, lg)
	if err != nil {
		return err
	}
	defer stopEtcd()
	upstream, internal, err := dialUpstream(f, lg, endpoints)
	if err != nil {
		return err
	}
	defer upstream.Close()
	if internal != nil {
		defer internal.Close()
	}

	p, l, served, err := startServing(f, upstream, internal, lg, tlsInfo)
	if err != nil {
		return err
	}
	if f.metricsAddr != "" {
		stopMetrics, err := serveMetrics(f, p, tlsInfo, served)
		if err != nil {
			return err
		}
		defer stopMetrics()
	}
	reg := register(f, upstream, internal, lg)
	if reg != nil {
		defer reg.Close()
	}
	lg.Info("serving the etcd v3 API", zap.String("listen-addr", l.Addr().String()),
		zap.String("advertise-client-url", f.advertiseClientURL), zap.Strings("endpoints", endpoints))
	// Under systemd (Type=notify), tell it the proxy serves, as etcd grpc-proxy does; without NOTIFY_SOCKET this
	// does nothing.
	if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
		lg.Warn("could not notify systemd that the proxy is ready", zap.Error(err))
	}
	if err := waitForSignal(lg, f, served, etcdDied); err != nil {
		return err
	}
	if reg != nil {
		reg.Close() // first: clients move to other proxies before this one stops serving
	}
	ctx, cancel := context.WithTimeout(context.Background(), f.shutdownTimeout)
	defer cancel()
	p.Shutdown(ctx)
	lg.Info("stopped")
	return nil
}

// startServing starts the proxy on --listen-addr; a failure to serve goes to served (buffered for the metrics
// server's too). --max-send-bytes and --max-recv-bytes bound the client side as well (proxyConfig): a request the
// proxy could not send upstream is refused as it arrives (not read whole first), and no response is sent that it
// could not have received.
func startServing(f *startFlags, upstream, internal *clientv3.Client, lg *zap.Logger, tlsInfo *transport.TLSInfo) (
	*proxy.Proxy, net.Listener, chan error, error) {
	cfg := f.proxyConfig()
	cfg.Upstream, cfg.Internal, cfg.Logger = upstream, internal, lg
	p := proxy.New(cfg)
	l, err := listenClients(f.listenAddr, tlsInfo)
	if err != nil {
		p.Shutdown(context.Background())
		return nil, nil, nil, fmt.Errorf("--listen-addr: %w", err)
	}
	served := make(chan error, 2)
	go func() { served <- p.Serve(l) }()
	return p, l, served, nil
}

// register keeps the proxy registered under --resolver-prefix (nil without it), with the proxy's own connection
// (with --user, its own credentials: registration writes a key). The key is under the namespace, as etcd
// grpc-proxy's (its client is namespaced): clients of this proxy find the record at PREFIX/ADDR through it.
func register(f *startFlags, upstream, internal *clientv3.Client, lg *zap.Logger) *proxy.Registration {
	if f.resolverPrefix == "" {
		return nil
	}
	own := upstream
	if internal != nil {
		own = internal
	}
	return proxy.Register(own, f.namespace+f.resolverPrefix, f.advertiseClientURL, f.resolverTTL, lg.Named("register"))
}

// startUpstream returns the etcd endpoints to proxy to: --endpoints (or --discovery-srv), or, with --embedded-etcd,
// those of an etcd member it starts (embedded.go), which stop stops; died reports the member's exit if it exits by
// itself (nil without --embedded-etcd).
func startUpstream(f *startFlags, lg *zap.Logger) (endpoints []string, stop func(), died <-chan error, err error) {
	endpoints, err = upstreamEndpoints(f, lg)
	if err != nil || !f.embeddedEtcd {
		return endpoints, func() {}, nil, err
	}
	bin, err := findEmbeddedBinary(f.embeddedEtcdBinary)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("--embedded-etcd: %w", err)
	}
	e, url, err := startEmbedded(bin, filepath.Join(f.dataDir, "embedded-etcd"), f.embeddedEtcdClientURL,
		f.embeddedEtcdPeerURL, lg.Named("etcd"))
	if err != nil {
		return nil, nil, nil, fmt.Errorf("--embedded-etcd: %w", err)
	}
	lg.Info("started embedded etcd", zap.String("endpoint", url), zap.String("data-dir", f.dataDir),
		zap.String("binary", bin))
	return []string{url}, e.stop, e.died, nil
}

// dialUpstream connects to etcd: the connection client calls go on, and with --user a second one, with the
// proxy's own credentials, for its own calls (nil without --user).
func dialUpstream(f *startFlags, lg *zap.Logger, endpoints []string) (upstream, internal *clientv3.Client, err error) {
	ccfg := clientv3.Config{
		Endpoints:            endpoints,
		AutoSyncInterval:     f.endpointsAutoSync,
		DialTimeout:          5 * time.Second,
		DialKeepAliveTime:    f.dialKeepAliveTime,
		DialKeepAliveTimeout: f.dialKeepAliveTimeout,
		PermitWithoutStream:  f.permitWithoutStream,
		MaxCallSendMsgSize:   f.maxSendBytes,
		MaxCallRecvMsgSize:   f.maxRecvBytes,
		Logger:               lg.Named("upstream").WithOptions(zap.IncreaseLevel(zapcore.ErrorLevel)),
	}
	if ccfg.TLS, err = upstreamTLS(f, lg); err != nil {
		return nil, nil, err
	}
	if upstream, err = proxy.Dial(ccfg); err != nil {
		return nil, nil, fmt.Errorf("connect to etcd at %v: %w", endpoints, err)
	}
	if f.user == "" {
		return upstream, nil, nil
	}
	icfg := ccfg
	icfg.Username, icfg.Password = f.user, f.password
	if name, pw, ok := strings.Cut(f.user, ":"); ok {
		icfg.Username, icfg.Password = name, pw
	}
	if icfg.Password == "" {
		err = errors.New("--user needs a password: --password or --user=name:password")
	} else if internal, err = proxy.Dial(icfg); err != nil {
		err = fmt.Errorf("connect to etcd as --user %s: %w", icfg.Username, err)
	}
	if err != nil {
		upstream.Close()
		return nil, nil, err
	}
	return upstream, internal, nil
}

// serveMetrics serves the proxy's HTTP endpoints on --metrics-addr until stop; a failure to serve goes to served.
func serveMetrics(f *startFlags, p *proxy.Proxy, tlsInfo *transport.TLSInfo, served chan<- error) (stop func(), err error) {
	ml, err := transport.NewListener(f.metricsAddr, f.metricsURL, tlsInfo) // checked by the command
	if err != nil {
		return nil, fmt.Errorf("--metrics-addr: %w", err)
	}
	ms := &http.Server{Handler: p.HTTPHandler(f.enablePprof), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := ms.Serve(ml); !errors.Is(err, http.ErrServerClosed) {
			served <- fmt.Errorf("--metrics-addr: %w", err)
		}
	}()
	return func() { _ = ms.Close() }, nil
}

// waitForSignal returns nil at SIGINT or SIGTERM, or the error that stopped serving first.
func waitForSignal(lg *zap.Logger, f *startFlags, served, etcdDied <-chan error) error {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sig)
	select {
	case err := <-served:
		return fmt.Errorf("serving gRPC: %w", err)
	case err := <-etcdDied:
		select {
		case s := <-sig:
			// A SIGTERM sent to the whole process group (systemd's default) reaches the member too, which may
			// exit before the proxy has seen its own: the proxy still drains its clients.
			lg.Info("shutting down", zap.String("signal", s.String()), zap.Duration("timeout", f.shutdownTimeout))
			return nil
		default:
		}
		return fmt.Errorf("the embedded etcd exited: %w", err)
	case s := <-sig:
		lg.Info("shutting down", zap.String("signal", s.String()), zap.Duration("timeout", f.shutdownTimeout))
		return nil
	}
}

// proxyConfig is the proxy's configuration from the flags (the connections and the logger are the caller's).
func (f *startFlags) proxyConfig() proxy.Config {
	return proxy.Config{
		MaxRecvBytes:         f.maxSendBytes,
		MaxSendBytes:         f.maxRecvBytes,
		MaxConcurrentStreams: f.maxConcurrentStreams,
		DynamicWindows:       f.dynamicWindow,
		KeepaliveMinTime:     f.grpcKeepAliveMinTime,
		KeepaliveInterval:    f.grpcKeepAliveInterval,
		KeepaliveTimeout:     f.grpcKeepAliveTimeout,
		EnablePprof:          f.enablePprof,
		LogCalls:             f.logCalls,
		Overrides: overrides.Config{
			KVCache: kvcache.Options{MaxBytes: f.kvCacheBytes, TTL: f.kvCacheTTL, SerializableOnly: !f.kvCacheLin,
				AdmitFirst: f.kvCacheAdmit == "first", WatchIdle: f.watchIdle()},
			ReadYourWrites: ryw.Options{Ordering: f.serializableOrdering},
			Lease:          lease.Options{Streams: f.leaseStreams, RenewTimeout: f.leaseRenew},
			Namespace:      f.namespace,
			Members:        f.members(),
		},
	}
}

// members is what MemberList answers. etcd grpc-proxy answers with its --advertise-client-url whenever that is not
// empty, and its default is not: every proxy left at the defaults claims 127.0.0.1:23790, whatever it listens on,
// and a client that syncs its endpoints follows. Here the proxies answer only when the operator said where they
// are (--advertise-client-url given, or --resolver-prefix, which registers that URL); otherwise MemberList is
// etcd's, as for a client of etcd itself. With the URL given, this is etcd grpc-proxy's rule: the registered
// proxies with --resolver-prefix, this proxy alone without, etcd's members when it is given empty.
func (f *startFlags) members() members.Options {
	if f.resolverPrefix == "" && !f.advertiseSet {
		return members.Options{}
	}
	o := members.Options{Advertise: f.advertiseClientURL}
	if f.resolverPrefix != "" {
		o.Prefix = f.namespace + f.resolverPrefix
	}
	return o
}

// upstreamTLS builds the TLS configuration of the connection to etcd from --cert, --key, --cacert and
// --insecure-skip-tls-verify; nil means plaintext.
func upstreamTLS(f *startFlags, lg *zap.Logger) (*tls.Config, error) {
	if f.cert == "" && f.key == "" && f.cacert == "" && !f.insecureSkipTLSVerify {
		return nil, nil
	}
	if (f.cert == "") != (f.key == "") {
		return nil, errors.New("--cert and --key go together: give both or neither")
	}
	info := transport.TLSInfo{CertFile: f.cert, KeyFile: f.key, TrustedCAFile: f.cacert, EmptyCN: true}
	cfg, err := info.ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("upstream TLS (--cert, --key, --cacert): %w", err)
	}
	if f.insecureSkipTLSVerify {
		lg.Warn("--insecure-skip-tls-verify: etcd's server certificates are not verified; use this for testing only")
		cfg.InsecureSkipVerify = true
	}
	return cfg, nil
}

func newLogger(debug bool) (*zap.Logger, error) {
	cfg := zap.NewProductionConfig()
	cfg.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
	if debug {
		cfg.Level = zap.NewAtomicLevelAt(zapcore.DebugLevel)
	}
	cfg.Sampling = nil // sampled as zap's production configuration samples, with a smaller table (logsample.go)
	lg, err := cfg.Build(zap.WrapCore(newSampler))
	if err == nil && debug {
		// As etcd grpc-proxy does with --debug: gRPC's own logs go to the proxy's log. Done before any gRPC use.
		grpclog.SetLoggerV2(zapgrpc.NewLogger(lg.Named("grpc")))
	}
	return lg, err
}

// noArgs refuses positional arguments with a hint: etcd grpc-proxy ignores them, so `--debug false` there silently
// means --debug; here it is an error that says how to write it.
func noArgs(_ *cobra.Command, args []string) error {
	if len(args) == 0 {
		return nil
	}
	return fmt.Errorf("unexpected argument %q: start takes flags only; give a boolean flag's value with '=' "+
		"(--debug=false)", args[0])
}

// metricsListenAddr returns the scheme and address to listen on for --metrics-addr, as etcd grpc-proxy takes it: a
// URL, http://host:port, https://host:port (TLS toward clients, as on --listen-addr) or unix://name (a unix socket
// named by the URL's host part, as etcd has it); a bare host:port is accepted too, as http.
func metricsListenAddr(v string) (scheme, addr string, err error) {
	if !strings.Contains(v, "://") {
		return "http", v, nil
	}
	u, err := url.Parse(v)
	if err != nil {
		return "", "", err
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https" && u.Scheme != "unix":
		return "", "", fmt.Errorf("%q: scheme %q not supported; use http://host:port, https://host:port or unix://name", v, u.Scheme)
	case u.Host == "" && u.Scheme == "unix":
		return "", "", fmt.Errorf("%q: no socket name (unix://name, as etcd grpc-proxy takes it, listens on the socket file name)", v)
	case u.Host == "":
		return "", "", fmt.Errorf("%q: no host:port", v)
	case u.Path != "" && u.Path != "/":
		return "", "", fmt.Errorf("%q: a path is not supported; the endpoints are /metrics and /health", v)
	}
	return u.Scheme, u.Host, nil
}
