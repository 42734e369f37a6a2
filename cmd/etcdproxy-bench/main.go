// Command etcdproxy-bench compares, in one run, three ways of reaching etcd: directly, through etcd's own
// `etcd grpc-proxy start`, and through etcdproxy; and two floors to read etcdproxy against, floorrelay (the
// thinnest gRPC-Go relay) and floorcache (the thinnest gRPC-Go cache hit). It starts an etcd member and the proxies
// as separate processes on loopback ports it picks (or uses endpoints given by flags), runs each workload against
// the targets in interleaved rounds (A B C D, B C D A, ...), and prints the medians and the ratios
// etcdproxy/direct, etcdproxy/grpc-proxy and etcdproxy/floor as a Markdown table; -json writes JSON lines, -out
// writes BENCHMARKS.md and, next to it, SVG plots (-plots writes them elsewhere).
//
//	go run ./cmd/etcdproxy-bench -etcd .build/etcd -etcdproxy bin/etcdproxy -floorrelay .build/floorrelay -floorcache .build/floorcache -quick
//	go run ./cmd/etcdproxy-bench -etcd .build/etcd -etcdproxy bin/etcdproxy -floorrelay .build/floorrelay -floorcache .build/floorcache -out BENCHMARKS.md
//
// The machines this runs on are shared and small, so absolute numbers mean little: read the ratios.
//
// It owns measuring and the report only: every target, etcdproxy included, runs as a separate process built from its
// own command, so the benchmark must not link package proxy or the overrides into what it measures (its in-process Go
// micro-benchmarks are in its _test.go files).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"
)

// config holds the command-line flags.
type config struct {
	etcdBin       string
	etcdproxyBin  string
	floorRelayBin string // the floors: not run when empty
	floorCacheBin string
	// Endpoints of targets that are already running (host:port); a target with an endpoint is not started.
	directAddr, grpcProxyAddr, etcdproxyAddr string
	// PIDs of already running targets, for CPU and memory accounting (0: not accounted).
	etcdPID, grpcProxyPID, etcdproxyPID int
	metricsURL                          string
	quick                               bool
	rounds                              int
	only                                string
	out                                 string
	plots                               string // directory of the SVG plots (default: -out's)
	jsonOut                             string
	watchers100k                        bool
	soak                                soakConfig // run when soak.duration > 0
}

func main() {
	var c config
	flag.StringVar(&c.etcdBin, "etcd", "", "etcd binary: started as the etcd member and as `etcd grpc-proxy start` (make etcd-bin builds it)")
	flag.StringVar(&c.etcdproxyBin, "etcdproxy", "", "etcdproxy binary (make build builds bin/etcdproxy)")
	flag.StringVar(&c.floorRelayBin, "floorrelay", "", "floorrelay binary, the relay floor (make floor-bin builds .build/floorrelay); not run if empty")
	flag.StringVar(&c.floorCacheBin, "floorcache", "", "floorcache binary, the cache-hit floor (make floor-bin builds .build/floorcache); not run if empty")
	flag.StringVar(&c.directAddr, "direct", "", "use this running etcd (host:port) instead of starting one; the etcd-down workload is then skipped")
	flag.StringVar(&c.grpcProxyAddr, "grpc-proxy", "", "use this running etcd grpc-proxy (host:port) instead of starting one")
	flag.StringVar(&c.etcdproxyAddr, "etcdproxy-addr", "", "use this running etcdproxy (host:port) instead of starting one")
	flag.IntVar(&c.etcdPID, "etcd-pid", 0, "PID of the running etcd given by -direct, for CPU and memory accounting")
	flag.IntVar(&c.grpcProxyPID, "grpc-proxy-pid", 0, "PID of the running etcd grpc-proxy given by -grpc-proxy")
	flag.IntVar(&c.etcdproxyPID, "etcdproxy-pid", 0, "PID of the running etcdproxy given by -etcdproxy-addr")
	flag.StringVar(&c.metricsURL, "metrics-url", "", "etcd's Prometheus endpoint (default: http://ETCD/metrics)")
	flag.BoolVar(&c.quick, "quick", false, "quick mode for development: fewer and shorter rounds, 1000 watchers only, fewer client counts")
	flag.BoolVar(&c.watchers100k, "watchers100k", true, "full mode: also run 100,000 watchers over 1,000 streams through grpc-proxy and etcdproxy (about 1.5 minutes)")
	flag.IntVar(&c.rounds, "rounds", 0, "rounds per workload (default: 11 in full mode, 3 quick; the W=1000, W=10000 and etcd-down workloads use fewer)")
	flag.StringVar(&c.only, "only", "", "run only the workloads whose name matches this regular expression")
	flag.StringVar(&c.out, "out", "", "write a Markdown report (header, how to read, table, plots, JSON lines) to this file, and the plots next to it")
	flag.StringVar(&c.plots, "plots", "", "write the SVG plots to this directory (default: the directory of -out; none without either)")
	flag.StringVar(&c.jsonOut, "json", "", "write JSON lines (one per workload and metric) to this file")
	flag.DurationVar(&c.soak.duration, "soak", 0, "instead of the benchmark, soak etcdproxy for this long (`make soak DURATION=1h`): see soak.go")
	flag.DurationVar(&c.soak.sampleEvery, "soak-sample", 10*time.Second, "soak: sample the proxy's RSS and goroutines this often")
	flag.DurationVar(&c.soak.restartEvery, "soak-restart", 5*time.Minute, "soak: kill and restart an etcd member this often, in turn")
	flag.DurationVar(&c.soak.compactEvery, "soak-compact", 5*time.Minute, "soak: compact this often, to the revision seen one period before")
	flag.IntVar(&c.soak.watchers, "soak-watchers", 10000, "soak: watchers through the proxy")
	flag.IntVar(&c.soak.keys, "soak-keys", 100, "soak: keys the watchers watch and the load writes and reads")
	flag.IntVar(&c.soak.leases, "soak-leases", 1000, "soak: leases kept alive through the proxy")
	flag.Int64Var(&c.soak.leaseTTL, "soak-lease-ttl", 15, "soak: the leases' TTL in seconds")
	flag.IntVar(&c.soak.writeRate, "soak-puts", 20, "soak: puts per second through the proxy")
	flag.IntVar(&c.soak.readRate, "soak-reads", 500, "soak: serializable reads per second through the proxy")
	flag.StringVar(&c.soak.out, "soak-out", "", "soak: write soak.md, soak.csv, soak-rss.svg and soak-goroutines.svg to this directory")
	flag.Parse()
	if c.soak.duration > 0 {
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
		err := runSoak(ctx, c.etcdBin, c.etcdproxyBin, c.soak)
		stop()
		if err != nil {
			fmt.Fprintln(os.Stderr, "etcdproxy-bench:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(c); err != nil {
		fmt.Fprintln(os.Stderr, "etcdproxy-bench:", err)
		os.Exit(1)
	}
}

func run(c config) error {
	if c.etcdBin == "" && c.directAddr == "" {
		return errors.New("give -etcd (an etcd binary to start) or -direct (a running etcd)")
	}
	var only *regexp.Regexp
	if c.only != "" {
		var err error
		if only, err = regexp.Compile(c.only); err != nil {
			return fmt.Errorf("-only: %w", err)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		stop() // a second Ctrl-C kills the benchmark at once; its children die with it (Pdeathsig).
	}()

	started := time.Now()
	b := &bench{cfg: c, plan: newPlan(c)}
	defer b.close()
	if err := b.startTargets(ctx); err != nil {
		return err
	}
	meta := b.meta(started)
	logf("machine: %s; %s", meta.Machine, meta.Versions)

	for _, w := range b.workloads() {
		if only != nil && !only.MatchString(w.name) {
			continue
		}
		if ctx.Err() != nil {
			break
		}
		b.results = append(b.results, b.runWorkload(ctx, w))
	}
	if ctx.Err() != nil {
		return errors.New("interrupted")
	}
	meta.Wall = time.Since(started).Round(time.Second).String()
	meta.LoadAfter = loadAvg()
	logf("done in %v", meta.Wall)
	return b.writeOutputs(meta)
}

// writeOutputs prints the table and writes what the flags ask for: JSON lines, the plots, the report.
func (b *bench) writeOutputs(meta meta) error {
	c := b.cfg
	table := renderTable(b.results)
	fmt.Print(table)
	lines, err := jsonLines(meta, b.results)
	if err != nil {
		return err
	}
	if c.jsonOut != "" {
		if err := os.WriteFile(c.jsonOut, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
			return err
		}
	}
	dir := c.plots
	if dir == "" && c.out != "" {
		dir = filepath.Dir(c.out)
	}
	var plots []plotFile
	if dir != "" {
		if plots, err = writePlots(dir, b.plots()); err != nil {
			return err
		}
		for _, p := range plots {
			logf("wrote %s", filepath.Join(dir, p.file))
		}
	}
	if c.out != "" {
		for i, p := range plots {
			// The report links each plot relative to itself.
			if rel, err := filepath.Rel(filepath.Dir(c.out), filepath.Join(dir, p.file)); err == nil {
				plots[i].file = filepath.ToSlash(rel)
			}
		}
		if err := os.WriteFile(c.out, []byte(renderReport(meta, table, plots, lines)), 0o644); err != nil {
			return err
		}
		logf("wrote %s", c.out)
	}
	return nil
}

// plan is the size of every workload: the quick mode shrinks it.
type plan struct {
	mode        string
	rounds      int           // rounds of the unary and keepalive workloads
	warmup      time.Duration // unmeasured start of each unary round
	window      time.Duration // measured part of each unary round
	hotKeys     int           // key set of the hot serializable get (fits any cache)
	coldKeys    int           // key set of the cold serializable get, read cyclically (fits no LRU cache smaller than it)
	putKeys     int           // keys the put workloads write to
	putClients  []int         // C of the put workloads (the ops/s-against-clients plot)
	getClients  []int         // C of the hot serializable get workloads (the same plot)
	watchers    []int         // W of the watch fan-out workloads, against every target
	bigWatchers int           // W of the one watch workload run through the proxies only; 0: not run
	watchRounds map[int]int   // rounds per W
	watchPuts   map[int]int   // paced puts per watch round, per W
	leases      int           // L of the keepalive workload
	leaseRounds int
	leaseWindow time.Duration
	idleWindow  time.Duration // the idle workload's measured window per target
	idleTargets []string      // the idle workload's targets (nil: all but floorcache)
	downClients int           // clients of the etcd-down workload
	downWindow  time.Duration
	downRounds  int
}

func newPlan(c config) plan {
	// Eleven rounds of the unary and keepalive workloads, five of the W=1000 ones: the median of five moves less
	// than that of three (from one full run to the next on this shared machine, a three-round median moved by up to
	// 15%), and the rows read against a target of 1.05x or 1.1x need more: the same binary in two slots of one run
	// differed by 3% in its five-round median of CPU per cache hit, with rounds 10% apart. Seven were not enough:
	// two full runs of the same code (458b955, 9705145) had rounds of one target up to 40% apart, and their
	// seven-round medians of etcdproxy/floor moved by up to 20% (hot C=16 CPU per hit 1.19x, then 0.96x; put C=1
	// 0.95x, then 1.055x), each run missing a different 1.05x or 1.1x row. Five rounds put each of the five targets
	// once in each place of the rotation; eleven put every place twice, and one place three times.
	p := plan{
		mode: "full", rounds: 11, warmup: 300 * time.Millisecond, window: 2 * time.Second,
		hotKeys: 100, coldKeys: 50000, putKeys: 1000,
		putClients:  []int{1, 4, 16, 64},
		getClients:  []int{1, 4, 16, 64},
		watchers:    []int{1000, 10000},
		watchRounds: map[int]int{1000: 5, 10000: 3, 100000: 1},
		watchPuts:   map[int]int{1000: 30, 10000: 15, 100000: 10},
		leases:      1000, leaseRounds: 11, leaseWindow: 4 * time.Second,
		// Not the floors: they do nothing on their own, by construction (12 s plus the window each).
		idleWindow: 30 * time.Second, idleTargets: []string{direct, grpcProxy, etcdproxy},
		downClients: 8, downWindow: 4 * time.Second, downRounds: 2,
	}
	if c.watchers100k {
		p.bigWatchers = 100000
	}
	if c.quick {
		p = plan{
			mode: "quick", rounds: 3, warmup: 150 * time.Millisecond, window: 600 * time.Millisecond,
			hotKeys: 100, coldKeys: 20000, putKeys: 1000,
			putClients:  []int{1, 16},
			getClients:  []int{16},
			watchers:    []int{1000},
			watchRounds: map[int]int{1000: 1},
			watchPuts:   map[int]int{1000: 15},
			leases:      200, leaseRounds: 1, leaseWindow: 2 * time.Second,
			// The idle workload takes 12 s plus the window per proxy: quick mode measures etcdproxy against
			// etcd's own rate only.
			idleWindow: 10 * time.Second, idleTargets: []string{direct, etcdproxy},
			downClients: 8, downWindow: 3 * time.Second, downRounds: 1,
		}
	}
	if c.rounds > 0 {
		p.rounds = c.rounds
		for w := range p.watchRounds {
			p.watchRounds[w] = c.rounds
		}
		p.downRounds = c.rounds
		p.leaseRounds = c.rounds
	}
	return p
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, time.Now().Format("15:04:05 ")+format+"\n", args...)
}
