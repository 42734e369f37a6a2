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
	"github.com/etcdproxy/etcdproxy/internal/embedetcd"
	"github.com/etcdproxy/etcdproxy/overrides/kvcache"
	"github.com/etcdproxy/etcdproxy/proxy"
	"github.com/spf13/cobra"
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
	dataDir               string
	debug                 bool
	maxSendBytes          int
	maxRecvBytes          int
	maxConcurrentStreams  uint32
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
	metricsAddr  string
	enablePprof  bool
	namespace    string

	embeddedEtcd          bool
	embeddedEtcdClientURL string
	embeddedEtcdPeerURL   string
	shutdownTimeout       time.Duration
}

func newStartCommand() *cobra.Command {
	f := &startFlags{}
	cmd := &cobra.Command{
		Use:   "start",
		Short: "Serve the etcd v3 gRPC API, forwarding to an etcd cluster",
		Long: `Serve the etcd v3 gRPC API on --listen-addr, forwarding every RPC to the etcd cluster at --endpoints.
Clients (etcdctl, clientv3, Kubernetes) use it exactly as they would use etcd.

With --embedded-etcd, etcdproxy first starts a single-member etcd in --data-dir on loopback and proxies to it:
one command gives a working endpoint, for trying it out and for development.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cmd.Flags().Changed("endpoints") && f.embeddedEtcd {
				return errors.New("--endpoints and --embedded-etcd exclude each other: the embedded etcd is the upstream")
			}
			if f.metricsAddr != "" {
				addr, err := metricsListenAddr(f.metricsAddr)
				if err != nil {
					return fmt.Errorf("--metrics-addr: %w", err)
				}
				f.metricsAddr = addr
			}
			return runStart(f)
		},
	}
	fs := cmd.Flags()
	fs.StringSliceVar(&f.endpoints, "endpoints", []string{"127.0.0.1:2379"}, "comma separated etcd cluster endpoints")
	fs.DurationVar(&f.endpointsAutoSync, "endpoints-auto-sync-interval", 0, "etcd endpoints auto sync interval (disabled by default)")
	fs.StringVar(&f.listenAddr, "listen-addr", "127.0.0.1:23790", "listen address")
	fs.StringVar(&f.advertiseClientURL, "advertise-client-url", "127.0.0.1:23790", "advertise address to register (must be reachable by client); logged at start, used for registration with --resolver-prefix once that is supported")
	fs.StringVar(&f.dataDir, "data-dir", "default.proxy", "data directory for persistent data (the embedded etcd's data with --embedded-etcd)")
	fs.BoolVar(&f.debug, "debug", false, "enable debug-level logging, gRPC's own logs included")
	fs.IntVar(&f.maxSendBytes, "max-send-bytes", 0, "largest message in bytes the proxy sends to etcd, and so the largest request it accepts from a client (a larger one gets ResourceExhausted from the proxy); 0 (the default) leaves the limit to etcd's --max-request-bytes, so an oversized request gets etcd's own error (etcd grpc-proxy defaults to 1.5 MiB and answers requests between its limit and etcd's with a different, client-side error)")
	fs.IntVar(&f.maxRecvBytes, "max-recv-bytes", math.MaxInt32, "largest message in bytes the proxy receives from etcd, and so the largest response it sends to a client (a larger one gets ResourceExhausted); 0 means the default")
	fs.Uint32Var(&f.maxConcurrentStreams, "max-concurrent-streams", math.MaxUint32, "maximum concurrent streams that each client can open at a time (applied to the proxy's gRPC server)")
	fs.DurationVar(&f.grpcKeepAliveMinTime, "grpc-keepalive-min-time", 5*time.Second, "minimum interval duration that a client should wait before pinging proxy (0: gRPC's default, 5m, as with etcd grpc-proxy; a negative value counts as 0, where etcd grpc-proxy would hand it to gRPC)")
	fs.DurationVar(&f.grpcKeepAliveInterval, "grpc-keepalive-interval", 2*time.Hour, "frequency duration of server-to-client ping to check if a connection is alive (0: gRPC's default, 2h, as with etcd grpc-proxy; a negative value counts as 0, where etcd grpc-proxy would hand it to gRPC)")
	fs.DurationVar(&f.grpcKeepAliveTimeout, "grpc-keepalive-timeout", 20*time.Second, "additional duration of wait before closing a non-responsive connection (0: gRPC's default, 20s, as with etcd grpc-proxy; a negative value counts as 0, where etcd grpc-proxy would hand it to gRPC)")
	fs.DurationVar(&f.dialKeepAliveTime, "dial-keepalive-time", 0, "keepalive time for the proxy's connections to etcd (0 disables)")
	fs.DurationVar(&f.dialKeepAliveTimeout, "dial-keepalive-timeout", 20*time.Second, "keepalive timeout for the proxy's connections to etcd")
	fs.BoolVar(&f.permitWithoutStream, "permit-without-stream", false, "let the proxy send keepalive pings to etcd even with no active RPCs")
	fs.StringVar(&f.cert, "cert", "", "identify secure connections with etcd servers using this TLS certificate file")
	fs.StringVar(&f.key, "key", "", "identify secure connections with etcd servers using this TLS key file")
	fs.StringVar(&f.cacert, "cacert", "", "verify certificates of TLS-enabled secure etcd servers using this CA bundle")
	fs.BoolVar(&f.insecureSkipTLSVerify, "insecure-skip-tls-verify", false, "skip authentication of etcd server TLS certificates (CAUTION: for testing only)")
	fs.StringVar(&f.user, "user", "", "the proxy's own etcd user, as username or username:password, for its internal calls only (the read cache's keyspace watch needs read permission on every key when auth is enabled); client calls always carry the client's own credentials")
	fs.StringVar(&f.password, "password", "", "password of --user (or give it as username:password)")
	fs.Int64Var(&f.kvCacheBytes, "kv-cache-bytes", 64<<20, "size of the cache of serializable reads, in bytes of cached responses; 0 turns the cache off")
	fs.DurationVar(&f.kvCacheTTL, "kv-cache-ttl", 30*time.Second, "longest life of a cached read; the cache is kept coherent by a watch, this is a backstop")
	fs.StringVar(&f.metricsAddr, "metrics-addr", "", "also serve /metrics and /health (and /debug/pprof with --enable-pprof) on this URL (http://host:port, as etcd grpc-proxy takes it; host:port works too); they are always served on --listen-addr too")
	fs.StringVar(&f.namespace, "namespace", "", "string to prefix to all keys for namespacing requests (every keyed service: KV, Watch, LeaseTimeToLive keys, Election and Lock names and keys; end it with a separator, e.g. /tenant1/: /t1 and /t10 overlap, /t1/ and /t10/ do not)")
	fs.BoolVar(&f.enablePprof, "enable-pprof", false, "serve runtime profiling data at /debug/pprof/")
	fs.BoolVar(&f.embeddedEtcd, "embedded-etcd", false, "start a single-member etcd in --data-dir on loopback and proxy to it")
	fs.StringVar(&f.embeddedEtcdClientURL, "embedded-etcd-client-url", "http://127.0.0.1:23791", "client URL of the embedded etcd (with --embedded-etcd)")
	fs.StringVar(&f.embeddedEtcdPeerURL, "embedded-etcd-peer-url", "http://127.0.0.1:23792", "peer URL of the embedded etcd (with --embedded-etcd)")
	fs.DurationVar(&f.shutdownTimeout, "shutdown-timeout", 5*time.Second, "on SIGINT or SIGTERM, how long running calls may finish before the proxy ends them and exits; watch, lease keepalive and election observe streams, which never finish by themselves, end at once with Unavailable so that clients reconnect elsewhere")
	return cmd
}

func runStart(f *startFlags) error {
	lg, err := newLogger(f.debug)
	if err != nil {
		return err
	}
	defer func() { _ = lg.Sync() }()
	if f.debug {
		// As etcd grpc-proxy does with --debug: gRPC's own logs go to the proxy's log. Done before any gRPC use.
		grpclog.SetLoggerV2(zapgrpc.NewLogger(lg.Named("grpc")))
	}

	endpoints := f.endpoints
	if f.embeddedEtcd {
		c, err := embedetcd.Start(embedetcd.Options{
			Dir:       filepath.Join(f.dataDir, "embedded-etcd"),
			ClientURL: f.embeddedEtcdClientURL,
			PeerURL:   f.embeddedEtcdPeerURL,
			LogLevel:  "warn",
		})
		if err != nil {
			return fmt.Errorf("--embedded-etcd: %w", err)
		}
		defer c.Close()
		endpoints = c.Endpoints()
		lg.Info("started embedded etcd", zap.Strings("endpoints", endpoints), zap.String("data-dir", f.dataDir))
	}

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
		return err
	}
	upstream, err := proxy.Dial(ccfg)
	if err != nil {
		return fmt.Errorf("connect to etcd at %v: %w", endpoints, err)
	}
	defer upstream.Close()

	var internal *clientv3.Client
	if f.user != "" {
		icfg := ccfg
		icfg.Username, icfg.Password = f.user, f.password
		if name, pw, ok := strings.Cut(f.user, ":"); ok {
			icfg.Username, icfg.Password = name, pw
		}
		if icfg.Password == "" {
			return errors.New("--user needs a password: --password or --user=name:password")
		}
		if internal, err = proxy.Dial(icfg); err != nil {
			return fmt.Errorf("connect to etcd as --user %s: %w", icfg.Username, err)
		}
		defer internal.Close()
	}

	// --max-send-bytes and --max-recv-bytes bound the client side too: a request the proxy could not send upstream
	// is refused as it arrives (not read whole first), and no response is sent that it could not have received.
	p := proxy.New(proxy.Config{
		Upstream:             upstream,
		Internal:             internal,
		Logger:               lg,
		MaxRecvBytes:         f.maxSendBytes,
		MaxSendBytes:         f.maxRecvBytes,
		MaxConcurrentStreams: f.maxConcurrentStreams,
		KeepaliveMinTime:     f.grpcKeepAliveMinTime,
		KeepaliveInterval:    f.grpcKeepAliveInterval,
		KeepaliveTimeout:     f.grpcKeepAliveTimeout,
		EnablePprof:          f.enablePprof,
		Namespace:            f.namespace,
		KVCache:              kvcache.Options{MaxBytes: f.kvCacheBytes, TTL: f.kvCacheTTL},
	})
	l, err := net.Listen("tcp", f.listenAddr)
	if err != nil {
		return fmt.Errorf("--listen-addr: %w", err)
	}
	served := make(chan error, 2)
	go func() { served <- p.Serve(l) }()
	if f.metricsAddr != "" {
		ml, err := net.Listen("tcp", f.metricsAddr) // host:port, checked by the command
		if err != nil {
			return fmt.Errorf("--metrics-addr: %w", err)
		}
		ms := &http.Server{Handler: p.HTTPHandler(f.enablePprof), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := ms.Serve(ml); !errors.Is(err, http.ErrServerClosed) {
				served <- fmt.Errorf("--metrics-addr: %w", err)
			}
		}()
		defer ms.Close()
	}
	lg.Info("serving the etcd v3 API", zap.String("listen-addr", l.Addr().String()),
		zap.String("advertise-client-url", f.advertiseClientURL), zap.Strings("endpoints", endpoints))
	// Under systemd (Type=notify), tell it the proxy serves, as etcd grpc-proxy does; without NOTIFY_SOCKET this
	// does nothing.
	if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
		lg.Warn("could not notify systemd that the proxy is ready", zap.Error(err))
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sig)
	select {
	case err := <-served:
		return fmt.Errorf("serving gRPC: %w", err)
	case s := <-sig:
		lg.Info("shutting down", zap.String("signal", s.String()), zap.Duration("timeout", f.shutdownTimeout))
	}
	ctx, cancel := context.WithTimeout(context.Background(), f.shutdownTimeout)
	defer cancel()
	p.Shutdown(ctx)
	lg.Info("stopped")
	return nil
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
	return cfg.Build()
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

// metricsListenAddr returns the host:port to listen on for --metrics-addr. etcd grpc-proxy takes a URL
// (http://0.0.0.0:6633); a bare host:port is accepted too. https needs TLS towards clients, not supported yet.
func metricsListenAddr(v string) (string, error) {
	if !strings.Contains(v, "://") {
		return v, nil
	}
	u, err := url.Parse(v)
	if err != nil {
		return "", err
	}
	switch {
	case u.Scheme == "https":
		return "", fmt.Errorf("%q: https needs TLS towards clients, which etcdproxy does not serve yet; use http://", v)
	case u.Scheme != "http":
		return "", fmt.Errorf("%q: scheme %q not supported; use http://host:port", v, u.Scheme)
	case u.Host == "":
		return "", fmt.Errorf("%q: no host:port", v)
	case u.Path != "" && u.Path != "/":
		return "", fmt.Errorf("%q: a path is not supported; the endpoints are /metrics and /health", v)
	}
	return u.Host, nil
}
