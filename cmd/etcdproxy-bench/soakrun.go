package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
)

// soakSample is one sample of the proxy and of the load.
type soakSample struct {
	at         time.Duration // since the load started
	rss        int64         // bytes
	goroutines int
	events     int64 // delivered to the watchers so far
	puts       int64
	reads      int64
}

// soakResult is what the soak measured and found.
type soakResult struct {
	started  time.Time
	wall     time.Duration
	samples  []soakSample
	failures []string // every check that failed
	notes    []string // figures for the summary

	puts, reads       counter
	badReads          atomic.Int64
	events            int64
	watchMismatch     int
	leaseReplies      int64
	leaseReconnects   int64
	etcdRevisionAtEnd int64
	proxyMetrics      map[string]float64 // soakProxyMetrics at the end
}

// soakProxyMetrics are the proxy's own counters the summary quotes.
var soakProxyMetrics = []string{
	"etcdproxy_kvcache_hits_total", "etcdproxy_kvcache_misses_total", "etcdproxy_kvcache_invalidations_total",
	"etcdproxy_watch_client_watchers", "etcdproxy_watch_upstream_watchers", "etcdproxy_watch_upstream_reconnects_total",
	"etcdproxy_watch_slow_consumer_detaches_total",
}

func (s *soak) run(ctx context.Context) (*soakResult, error) {
	direct, err := s.client(s.endpoints()...)
	if err != nil {
		return nil, err
	}
	defer direct.Close()
	through, err := s.client(s.addr)
	if err != nil {
		return nil, err
	}
	defer through.Close()
	resp, err := direct.Put(ctx, "soak/start", "")
	if err != nil {
		return nil, fmt.Errorf("first put: %w", err)
	}
	s.startRev = resp.Header.Revision

	// The watchers outlive the load: they are compared with etcd's own watch after the last write.
	wctx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	ref := watchReference(wctx, direct, s.cfg.keys, s.startRev)
	conns, closeConns, err := dialN(s.addr, maxWatchConns)
	if err != nil {
		return nil, err
	}
	defer closeConns()
	ws, err := openWatchers(wctx, conns, s.cfg.watchers, s.cfg.keys, s.startRev)
	if ws != nil {
		defer ws.wait()
		defer stopWatch()
	}
	if err != nil {
		return nil, err
	}
	lctx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	leases, err := grantSoakLeases(ctx, through, s.cfg.leases, s.cfg.leaseTTL)
	if err != nil {
		return nil, err
	}
	logf("soak: %d watchers created from revision %d, %d leases granted; load for %v", s.cfg.watchers, s.startRev+1,
		s.cfg.leases, s.cfg.duration)

	res := &soakResult{started: time.Now()}
	var wg sync.WaitGroup
	chaosErr := make(chan error, 1)
	s.startLoad(lctx, &wg, res, through, direct, conns, leases, chaosErr)
	samplerErr := s.sample(ctx, res, ws, chaosErr)
	stopLoad()
	wg.Wait()
	res.wall = time.Since(res.started)
	if samplerErr != nil {
		return nil, samplerErr
	}
	res.leaseReplies, res.leaseReconnects = leases.replies.Load(), leases.reconnects.Load()
	if m, err := scrapeMetrics(ctx, "http://"+s.addr+"/metrics", soakProxyMetrics...); err == nil {
		res.proxyMetrics = m
	} else {
		res.notes = append(res.notes, fmt.Sprintf("the proxy's metrics at the end: %v", err))
	}
	res.failures = append(res.failures, leases.check(ctx, direct)...)
	s.finishWatch(ctx, res, ws, ref, direct)
	return res, nil
}

// startLoad starts the writer, the readers, the keepalive streams and the chaos, each stopping with ctx.
func (s *soak) startLoad(ctx context.Context, wg *sync.WaitGroup, res *soakResult, through, direct *clientv3.Client,
	conns []*grpc.ClientConn, leases *soakLeases, chaosErr chan<- error) {
	goes := []func(){
		func() { s.write(ctx, through, &res.puts) },
		func() { s.read(ctx, through, &res.reads, &res.badReads) },
		func() { chaosErr <- s.chaos(ctx, direct) },
	}
	interval := time.Duration(s.cfg.leaseTTL) * time.Second / 3
	for i := 0; i < len(leases.ids); i += leasesPerStream {
		ids := leases.ids[i:min(i+leasesPerStream, len(leases.ids))]
		cc := conns[(i/leasesPerStream)%len(conns)]
		goes = append(goes, func() { leases.keepAlive(ctx, cc, ids, interval) })
	}
	for _, f := range goes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f()
		}()
	}
}

// sample samples the proxy every sampleEvery until the soak's duration has passed; it stops early, with an error,
// when the proxy exits or the chaos fails (a member that does not come back).
func (s *soak) sample(ctx context.Context, res *soakResult, ws *soakWatchers, chaosErr <-chan error) error {
	tick := time.NewTicker(s.cfg.sampleEvery)
	defer tick.Stop()
	end := time.After(s.cfg.duration)
	for {
		select {
		case <-ctx.Done():
			return errors.New("interrupted")
		case err := <-chaosErr:
			if err != nil {
				return fmt.Errorf("chaos: %w", err)
			}
		case <-end:
			return nil
		case <-tick.C:
			if !s.proxyP.alive() {
				return fmt.Errorf("etcdproxy exited (%v); log:\n%s", s.proxyP.waitErr, s.proxyP.logTail())
			}
			smp := soakSample{at: time.Since(res.started), events: ws.events(), puts: res.puts.ok.Load(),
				reads: res.reads.ok.Load()}
			var err error
			if smp.rss, err = statusBytes(s.proxyP.pid(), "VmRSS:"); err != nil {
				return err
			}
			m, err := scrapeMetrics(ctx, "http://"+s.addr+"/metrics", "go_goroutines")
			if err != nil {
				return fmt.Errorf("proxy metrics: %w", err)
			}
			smp.goroutines = int(m["go_goroutines"])
			res.samples = append(res.samples, smp)
			logf("soak: %v rss %.1f MiB, %d goroutines, %d events, %d puts, %d reads",
				smp.at.Round(time.Second), float64(smp.rss)/(1<<20), smp.goroutines, smp.events, smp.puts, smp.reads)
		}
	}
}

// finishWatch waits until etcd's own watch has the last revision and every watcher has caught up with it (or a
// minute has passed), then compares every watcher with etcd's watch of its key.
func (s *soak) finishWatch(ctx context.Context, res *soakResult, ws *soakWatchers, ref *reference, direct *clientv3.Client) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	resp, err := direct.Get(cctx, "soak/start")
	cancel()
	if err != nil {
		res.failures = append(res.failures, fmt.Sprintf("last revision: %v", err))
		return
	}
	res.etcdRevisionAtEnd = resp.Header.Revision
	deadline := time.Now().Add(time.Minute)
	for ref.last() < res.etcdRevisionAtEnd-1 && time.Now().Before(deadline) { // -1: soak/start is not watched
		_ = sleepCtx(ctx, 100*time.Millisecond)
	}
	want, refErr := ref.snapshot()
	if refErr != nil {
		res.failures = append(res.failures, fmt.Sprintf("etcd's own watch (the reference) failed: %v", refErr))
	}
	var described []string
	for {
		described, res.watchMismatch = ws.compare(want, 10)
		if res.watchMismatch == 0 || time.Now().After(deadline) {
			break
		}
		_ = sleepCtx(ctx, 200*time.Millisecond)
	}
	res.events = ws.events()
	res.failures = append(res.failures, ws.failed()...)
	if res.watchMismatch > 0 {
		res.failures = append(res.failures, fmt.Sprintf("%d of %d watchers did not receive exactly etcd's events", res.watchMismatch, s.cfg.watchers))
		res.failures = append(res.failures, described...)
	}
	var total int64
	for _, t := range want {
		total += t.count
	}
	res.notes = append(res.notes, fmt.Sprintf("etcd's own watch delivered %d events over %d keys; every watcher compared with it", total, s.cfg.keys))
}
