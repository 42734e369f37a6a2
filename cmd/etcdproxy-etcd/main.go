// Command etcdproxy-etcd runs the single-member etcd behind `etcdproxy start --embedded-etcd` (and `make run`).
//
// It is a binary of its own so that etcdproxy does not link etcd's server: those packages' init functions (449
// metrics registered, their protobuf descriptors) cost every proxy process about 5 MB of resident memory, and
// a proxy has no use for them. etcdproxy starts it as a child process:
//
//	etcdproxy-etcd --data-dir DIR --client-url URL --peer-url URL [--log-level LEVEL]
//
// Once the member serves, it writes its client URL and a newline to standard output. It stops the member and
// exits when it gets SIGTERM or SIGINT, or when its standard input ends: etcdproxy holds the other end of a pipe,
// so the member stops whenever the proxy exits, even when it is killed. It logs to standard error (JSON, zap's
// production format, at --log-level and above).
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/etcdproxy/etcdproxy/internal/embedetcd"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

func main() {
	if err := run(os.Args[1:], os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "etcdproxy-etcd:", err)
		os.Exit(1)
	}
}

func run(args []string, stdin io.Reader, stdout io.Writer) error {
	fs := flag.NewFlagSet("etcdproxy-etcd", flag.ContinueOnError)
	dir := fs.String("data-dir", "", "where the member keeps its data, in DIR/m0.etcd (required)")
	clientURL := fs.String("client-url", "", "the member's client URL, http://127.0.0.1:PORT (required)")
	peerURL := fs.String("peer-url", "", "the member's peer URL, http://127.0.0.1:PORT (required)")
	level := fs.String("log-level", "warn", "the lowest level logged: debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q: flags only", fs.Arg(0))
	}
	if *dir == "" || *clientURL == "" || *peerURL == "" {
		return errors.New("--data-dir, --client-url and --peer-url are required")
	}
	lvl, err := zapcore.ParseLevel(*level)
	if err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	cfg := zap.NewProductionConfig()
	cfg.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
	cfg.Level = zap.NewAtomicLevelAt(lvl)
	lg, err := cfg.Build()
	if err != nil {
		return err
	}
	defer func() { _ = lg.Sync() }()

	// Signals and the proxy's end are watched first: one that comes while the member starts stops it once it has.
	// A write to a standard output the proxy no longer reads fails (EPIPE) instead of killing the process, so that
	// the member is stopped then too.
	signal.Ignore(syscall.SIGPIPE)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sig)
	gone := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, stdin)
		close(gone)
	}()
	c, err := embedetcd.Start(embedetcd.Options{Dir: *dir, ClientURL: *clientURL, PeerURL: *peerURL,
		LogLevel: lvl.String(), Logger: lg.Named("etcd")})
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := fmt.Fprintln(stdout, c.Endpoints()[0]); err != nil {
		return fmt.Errorf("telling the proxy the member serves: %w", err)
	}
	select {
	case <-sig:
	case <-gone:
		lg.Warn("the proxy is gone (standard input ended): stopping")
	}
	return nil
}
