package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Watch fan-out: W watchers of one key (or of one prefix), spread over W/100 gRPC Watch streams (100 watchers per
// stream, round-robin) on at most 10 connections, created in a burst (every stream sends its creates back to back,
// all streams at once) or one at a time (the next create is sent when the previous one's created response has
// arrived). Then P puts, paced, written straight to etcd by the benchmark's own connection (so that the put's
// acknowledgement time does not depend on the target); each watcher's receipt of each put's event is timed from
// the put's acknowledgement. Events are checked per watcher by revision: each put must arrive exactly once.
// An op is one event delivered to one watcher. Each watch workload starts on fresh proxy processes (workload.fresh),
// so that its peak RSS is the watchers' and not what the workloads before it left.

const (
	watchersPerStream = 100
	maxWatchConns     = 10
	watchWatcherGauge = "etcd_debugging_mvcc_watcher_total"
	watchStreamGauge  = "etcd_debugging_mvcc_watch_stream_total"
)

type watchSpec struct {
	watchers int
	prefix   bool
	burst    bool
	puts     int
}

func (s watchSpec) name() string {
	what, how := "one key", "one at a time"
	if s.prefix {
		what = "prefix"
	}
	if s.burst {
		how = "burst"
	}
	return fmt.Sprintf("watch W=%d %s, %s", s.watchers, what, how)
}

func (b *bench) watchWorkloads() []workload {
	var ws []workload
	for _, w := range b.plan.watchers {
		for _, prefix := range []bool{false, true} {
			for _, burst := range []bool{true, false} {
				spec := watchSpec{watchers: w, prefix: prefix, burst: burst, puts: b.plan.watchPuts[w]}
				ws = append(ws, workload{
					name:   spec.name(),
					rounds: b.plan.watchRounds[w],
					fresh:  true,
					run: func(ctx context.Context, t *target, round int) (*measurement, error) {
						return b.watchRound(ctx, t, spec)
					},
				})
			}
		}
	}
	if W := b.plan.bigWatchers; W > 0 {
		// Through the proxies only: it is a test of the proxy's fan-out (etcd holding 100,000 watchers itself, as
		// direct and floorrelay would, measures etcd). One key, burst: the case of the watchers plots.
		spec := watchSpec{watchers: W, burst: true, puts: b.plan.watchPuts[W]}
		ws = append(ws, workload{
			name:    spec.name(),
			rounds:  b.plan.watchRounds[W],
			targets: []string{grpcProxy, etcdproxy},
			fresh:   true,
			run: func(ctx context.Context, t *target, round int) (*measurement, error) {
				return b.watchRound(ctx, t, spec)
			},
		})
	}
	return ws
}

// wstream is one client Watch stream and the watchers it carries.
type wstream struct {
	stream  pb.Watch_WatchClient
	members []int32 // global indices of this stream's watchers in creation order; fixed before receiving starts

	// Owned by the receiving goroutine until done is closed.
	recs         []wrec
	canceled     int
	cancelReason string
	unknown      int
	err          error
	done         chan struct{}
}

// wrec is one event received by one watcher.
type wrec struct {
	watcher int32
	rev     int64
	at      time.Duration // since the round's start
}

// watchRound runs one round of spec against t.
func (b *bench) watchRound(ctx context.Context, t *target, spec watchSpec) (*measurement, error) {
	base, err := scrapeMetrics(ctx, b.metricsURL, watchWatcherGauge, watchStreamGauge)
	if err != nil {
		return nil, fmt.Errorf("etcd metrics: %w", err)
	}
	defer b.waitWatchersGone(ctx, base[watchWatcherGauge])

	W := spec.watchers
	nStreams := (W + watchersPerStream - 1) / watchersPerStream
	nConns := min(nStreams, maxWatchConns)
	conns, closeAll, err := dialN(t.addr, nConns)
	if err != nil {
		return nil, err
	}
	defer closeAll()
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()

	key, end := []byte("bench/watch/key"), []byte(nil)
	if spec.prefix {
		key = []byte("bench/watch/prefix/")
		end = []byte(clientv3.GetPrefixRangeEnd(string(key)))
	}
	create := &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{
		CreateRequest: &pb.WatchCreateRequest{Key: key, RangeEnd: end}}}

	t0 := time.Now()
	var created, received atomic.Int64
	poke := make(chan struct{}, 1)
	streams := make([]*wstream, nStreams)
	for i := range streams {
		s, err := pb.NewWatchClient(conns[i%nConns]).Watch(wctx)
		if err != nil {
			return nil, fmt.Errorf("open watch stream: %w", err)
		}
		streams[i] = &wstream{stream: s, done: make(chan struct{})}
	}
	for g := range W {
		st := streams[g%nStreams]
		st.members = append(st.members, int32(g))
	}
	for _, st := range streams {
		go st.receive(t0, &created, &received, poke)
	}
	defer func() {
		cancel()
		for _, st := range streams {
			<-st.done
		}
	}()

	// Wait until n watchers are created, a stream fails, or timeout passes.
	waitCreated := func(n int64, timeout time.Duration) error {
		timer := time.NewTimer(timeout)
		defer timer.Stop()
		for created.Load() < n {
			select {
			case <-poke:
			case <-timer.C:
				return fmt.Errorf("%d of %d watchers created after %v", created.Load(), W, time.Since(t0).Round(time.Millisecond))
			case <-ctx.Done():
				return ctx.Err()
			}
			for _, st := range streams {
				select {
				case <-st.done:
					return fmt.Errorf("watch stream ended while creating: %v", st.err)
				default:
				}
			}
		}
		return nil
	}
	createStart := time.Now()
	if spec.burst {
		var wg sync.WaitGroup
		sendErrs := make([]error, nStreams)
		for i, st := range streams {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range st.members {
					if err := st.stream.Send(create); err != nil {
						sendErrs[i] = err
						return
					}
				}
			}()
		}
		wg.Wait()
		if err := errors.Join(sendErrs...); err != nil {
			return nil, fmt.Errorf("send create: %w", err)
		}
		if err := waitCreated(int64(W), 120*time.Second); err != nil {
			return nil, err
		}
	} else {
		for g := range W {
			if err := streams[g%nStreams].stream.Send(create); err != nil {
				return nil, fmt.Errorf("send create: %w", err)
			}
			if err := waitCreated(int64(g+1), 10*time.Second); err != nil {
				return nil, err
			}
		}
	}
	createDur := time.Since(createStart)

	// Let the proxy settle (a coalescer may merge what the burst split), then count what etcd holds.
	time.Sleep(300 * time.Millisecond)
	upstream, err := scrapeMetrics(ctx, b.metricsURL, watchWatcherGauge, watchStreamGauge)
	if err != nil {
		return nil, fmt.Errorf("etcd metrics: %w", err)
	}

	// Paced puts: an interval that leaves the watchers time to drain (30 µs per watcher, at least 20 ms).
	interval := max(20*time.Millisecond, time.Duration(W)*30*time.Microsecond)
	revs := make([]int64, spec.puts)
	sent := make([]time.Duration, spec.puts)
	kv := pb.NewKVClient(b.direct)
	pr := b.startProbe(t)
	putStart := time.Since(t0)
	for i := range spec.puts {
		k := key
		if spec.prefix {
			k = fmt.Appendf(nil, "%s%d", key, i%16)
		}
		cctx, ccancel := context.WithTimeout(ctx, opTimeout)
		sent[i] = time.Since(t0)
		resp, err := kv.Put(cctx, &pb.PutRequest{Key: k, Value: value})
		ccancel()
		if err != nil {
			return nil, fmt.Errorf("put: %w", err)
		}
		revs[i] = resp.Header.Revision
		if i < spec.puts-1 {
			time.Sleep(interval)
		}
	}
	// Wait for delivery: every watcher every event, unless nothing arrives for 5 s (or 60 s pass).
	want := int64(W * spec.puts)
	deadline := time.Now().Add(60 * time.Second)
	lastProgress, lastN := time.Now(), received.Load()
	for received.Load() < want && time.Now().Before(deadline) && time.Since(lastProgress) < 5*time.Second {
		select {
		case <-poke:
		case <-time.After(20 * time.Millisecond):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if n := received.Load(); n != lastN {
			lastProgress, lastN = time.Now(), n
		}
	}
	deliverEnd := time.Since(t0)
	u := pr.stop()

	cancel()
	for _, st := range streams {
		<-st.done
	}

	// Check every watcher by revision and time first receipts.
	revIdx := make(map[int64]int, len(revs))
	for i, r := range revs {
		revIdx[r] = i
	}
	seen := make([]bool, W*spec.puts)
	lats := make([]time.Duration, 0, W*spec.puts)
	var dup, canceled, unknown int
	var reason string
	for _, st := range streams {
		canceled += st.canceled
		unknown += st.unknown
		if st.cancelReason != "" {
			reason = st.cancelReason
		}
		for _, r := range st.recs {
			i, ok := revIdx[r.rev]
			if !ok || seen[int(r.watcher)*spec.puts+i] {
				dup++
				continue
			}
			seen[int(r.watcher)*spec.puts+i] = true
			lats = append(lats, r.at-sent[i])
		}
	}
	delivered := len(lats)
	m := &measurement{}
	m.add(mCreateMs, ms(createDur))
	m.add(mUpWatch, upstream[watchWatcherGauge]-base[watchWatcherGauge])
	m.add(mUpStreams, upstream[watchStreamGauge]-base[watchStreamGauge])
	if d := deliverEnd - putStart; d > 0 {
		m.add(mOps, float64(delivered)/d.Seconds())
	}
	latencyMetrics(m, lats)
	m.add(mLost, float64(W*spec.puts-delivered))
	m.add(mDup, float64(dup))
	u.addCPU(m, float64(delivered), true)
	if canceled > 0 || unknown > 0 {
		m.note = fmt.Sprintf("%d watchers cancelled by the server (%q), %d responses for unknown watch ids", canceled, reason, unknown)
	}
	return m, nil
}

// receive reads st's responses until the stream ends. Watch ids are per stream and count up from 0 in creation
// order (etcd and its grpc-proxy both do so), so response id k belongs to the stream's k-th watcher, whatever
// order the created responses arrive in.
func (st *wstream) receive(t0 time.Time, created, received *atomic.Int64, poke chan struct{}) {
	defer close(st.done)
	for {
		resp, err := st.stream.Recv()
		if err != nil {
			st.err = err
			return
		}
		at := time.Since(t0)
		if resp.Created {
			created.Add(1)
			select {
			case poke <- struct{}{}:
			default:
			}
		}
		if resp.Canceled {
			st.canceled++
			st.cancelReason = resp.CancelReason
		}
		if len(resp.Events) == 0 {
			continue
		}
		if resp.WatchId < 0 || resp.WatchId >= int64(len(st.members)) {
			st.unknown++
			continue
		}
		w := st.members[resp.WatchId]
		for _, ev := range resp.Events {
			st.recs = append(st.recs, wrec{watcher: w, rev: ev.Kv.ModRevision, at: at})
		}
		if received.Add(int64(len(resp.Events))) >= 0 {
			select {
			case poke <- struct{}{}:
			default:
			}
		}
	}
}

// waitWatchersGone waits (up to 20 s) until etcd holds no more watchers than before the round, so that a round
// does not inherit the last one's teardown.
func (b *bench) waitWatchersGone(ctx context.Context, base float64) {
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		m, err := scrapeMetrics(ctx, b.metricsURL, watchWatcherGauge)
		if err == nil && m[watchWatcherGauge] <= base {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	logf("   etcd still holds watchers 20 s after the round")
}
