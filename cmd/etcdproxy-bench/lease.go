package main

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const (
	leaseTTL          = 6 // seconds: etcd's grpc-proxy renews upstream every TTL/3
	keepAliveInterval = 500 * time.Millisecond
	leasesPerStream   = 100
	renewedCounter    = "etcd_debugging_lease_renewed_total"
)

// keepAliveWorkload: L leases (TTL 6 s, granted straight to etcd before the round, revoked after it) kept alive
// through the target over L/100 LeaseKeepAlive streams on at most 10 connections. Each lease has one keepalive
// request outstanding at a time and sends the next 500 ms after the reply; latency is request -> reply for that
// lease id. Requests still unanswered 3 s after the window count as unanswered. etcd's renewals are its
// etcd_debugging_lease_renewed_total counter over the window. An op is one keepalive reply. It starts on fresh proxy
// processes (workload.fresh), so that its peak RSS is the leases'.
func (b *bench) keepAliveWorkload() workload {
	L := b.plan.leases
	return workload{
		name:   fmt.Sprintf("lease keepalive L=%d", L),
		rounds: b.plan.leaseRounds,
		fresh:  true,
		run: func(ctx context.Context, t *target, round int) (*measurement, error) {
			return b.keepAliveRound(ctx, t, L)
		},
	}
}

// kastream is one LeaseKeepAlive stream and its leases.
type kastream struct {
	stream pb.Lease_LeaseKeepAliveClient
	leases []int64

	mu          sync.Mutex // mu protects the fields below
	sent        map[int64]time.Time
	due         map[int64]time.Time
	lats        []time.Duration
	windowStart time.Time
	windowEnd   time.Time
	notFound    int
}

func (b *bench) keepAliveRound(ctx context.Context, t *target, L int) (*measurement, error) {
	ids, err := b.grantLeases(ctx, L)
	defer b.revokeLeases(ids)
	if err != nil {
		return nil, err
	}
	nStreams := max(1, (L+leasesPerStream-1)/leasesPerStream)
	nConns := min(nStreams, maxWatchConns)
	conns, closeAll, err := dialN(t.addr, nConns)
	if err != nil {
		return nil, err
	}
	defer closeAll()
	kctx, cancel := context.WithCancel(ctx)
	defer cancel()

	start := time.Now()
	warmup := keepAliveInterval * 2
	windowStart, windowEnd := start.Add(warmup), start.Add(warmup+b.plan.leaseWindow)
	streams := make([]*kastream, nStreams)
	for i := range streams {
		s, err := pb.NewLeaseClient(conns[i%nConns]).LeaseKeepAlive(kctx)
		if err != nil {
			return nil, fmt.Errorf("open keepalive stream: %w", err)
		}
		streams[i] = &kastream{stream: s, sent: map[int64]time.Time{}, due: map[int64]time.Time{},
			windowStart: windowStart, windowEnd: windowEnd}
	}
	for i, id := range ids {
		st := streams[i%nStreams]
		st.leases = append(st.leases, id)
		// Spread the first requests over one interval.
		st.due[id] = start.Add(time.Duration(i) * keepAliveInterval / time.Duration(len(ids)))
	}
	var wg sync.WaitGroup
	recvErrs := make([]error, nStreams)
	sendErrs := make([]error, nStreams)
	for i, st := range streams {
		wg.Add(2)
		go func() {
			defer wg.Done()
			recvErrs[i] = st.receive()
		}()
		go func() {
			defer wg.Done()
			sendErrs[i] = st.send(kctx)
		}()
	}

	time.Sleep(time.Until(windowStart))
	renew0, err0 := scrapeMetrics(ctx, b.metricsURL, renewedCounter)
	pr := b.startProbe(t)
	time.Sleep(time.Until(windowEnd))
	u := pr.stop()
	renew1, err1 := scrapeMetrics(ctx, b.metricsURL, renewedCounter)
	// The senders stop at windowEnd; give outstanding requests 3 s to be answered.
	outstanding := func() (n int) {
		for _, st := range streams {
			st.mu.Lock()
			for _, at := range st.sent {
				if !at.Before(windowStart) && at.Before(windowEnd) {
					n++
				}
			}
			st.mu.Unlock()
		}
		return n
	}
	for wait := time.Now().Add(3 * time.Second); outstanding() > 0 && time.Now().Before(wait) && ctx.Err() == nil; {
		time.Sleep(10 * time.Millisecond)
	}
	unanswered := outstanding()
	cancel()
	wg.Wait()
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}

	var lats []time.Duration
	notFound := 0
	for _, st := range streams {
		lats = append(lats, st.lats...)
		notFound += st.notFound
	}
	if len(lats) == 0 {
		return nil, fmt.Errorf("no keepalive answered: %v", firstRealErr(append(recvErrs, sendErrs...)))
	}
	m := &measurement{}
	m.add(mOps, float64(len(lats))/b.plan.leaseWindow.Seconds())
	latencyMetrics(m, lats)
	m.add(mUnanswer, float64(unanswered))
	if err := errors.Join(err0, err1); err == nil {
		m.add(mRenewals, (renew1[renewedCounter]-renew0[renewedCounter])/u.elapsed.Seconds())
	}
	u.addCPU(m, float64(len(lats)), false)
	var notes []string
	if notFound > 0 {
		notes = append(notes, fmt.Sprintf("%d replies with TTL 0 (lease not found)", notFound))
	}
	if err := firstRealErr(append(recvErrs, sendErrs...)); err != nil {
		notes = append(notes, fmt.Sprintf("stream error: %v", err))
	}
	if len(notes) > 0 {
		m.note = fmt.Sprint(notes)
	}
	return m, nil
}

// send sends each lease's next keepalive when it is due, until the window ends.
func (st *kastream) send(ctx context.Context) error {
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	var batch []int64
	for {
		select {
		case <-ctx.Done():
			return nil
		case now := <-tick.C:
			if !now.Before(st.windowEnd) {
				return nil
			}
			batch = batch[:0]
			st.mu.Lock()
			for _, id := range st.leases {
				if due, ok := st.due[id]; ok && !due.After(now) {
					delete(st.due, id)
					st.sent[id] = time.Now()
					batch = append(batch, id)
				}
			}
			st.mu.Unlock()
			for _, id := range batch {
				if err := st.stream.Send(&pb.LeaseKeepAliveRequest{ID: id}); err != nil {
					return err
				}
			}
		}
	}
}

// receive matches replies to requests by lease id until the stream ends.
func (st *kastream) receive() error {
	for {
		resp, err := st.stream.Recv()
		if err != nil {
			return err
		}
		now := time.Now()
		st.mu.Lock()
		if sent, ok := st.sent[resp.ID]; ok {
			delete(st.sent, resp.ID)
			if !sent.Before(st.windowStart) && sent.Before(st.windowEnd) {
				st.lats = append(st.lats, now.Sub(sent))
			}
			st.due[resp.ID] = now.Add(keepAliveInterval)
		}
		if resp.TTL <= 0 {
			st.notFound++
		}
		st.mu.Unlock()
	}
}

// firstRealErr returns the first error that is not the end of the round (cancellation).
func firstRealErr(errs []error) error {
	for _, err := range errs {
		if err != nil && status.Code(err) != codes.Canceled && !errors.Is(err, context.Canceled) {
			return err
		}
	}
	return nil
}

// grantLeases grants n leases straight from etcd, 16 at a time.
func (b *bench) grantLeases(ctx context.Context, n int) ([]int64, error) {
	lc := pb.NewLeaseClient(b.direct)
	ids := make([]int64, n)
	errs := make([]error, 16)
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 16 {
				cctx, cancel := context.WithTimeout(ctx, opTimeout)
				resp, err := lc.LeaseGrant(cctx, &pb.LeaseGrantRequest{TTL: leaseTTL})
				cancel()
				if err != nil {
					errs[w] = err
					return
				}
				ids[i] = resp.ID
			}
		}()
	}
	wg.Wait()
	var granted []int64
	for _, id := range ids {
		if id != 0 {
			granted = append(granted, id)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return granted, fmt.Errorf("grant leases: %w", err)
	}
	return granted, nil
}

// revokeLeases revokes ids straight at etcd, 16 at a time, so that their expiry does not load the next round.
func (b *bench) revokeLeases(ids []int64) {
	lc := pb.NewLeaseClient(b.direct)
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < len(ids); i += 16 {
				cctx, cancel := context.WithTimeout(context.Background(), opTimeout)
				_, _ = lc.LeaseRevoke(cctx, &pb.LeaseRevokeRequest{ID: ids[i]})
				cancel()
			}
		}()
	}
	wg.Wait()
}

// etcdDownWorkload: etcd is killed (SIGKILL; it stays down: this workload runs last), then N clients, each with its
// own connection, loop LeaseGrant with a 2 s deadline per attempt against the target for a window. It counts
// attempts per second per client and the CPU of the proxy and of the benchmark process (the clients) over the
// window. A proxy that fails fast makes its clients spin; one that fails slow keeps them near one attempt per
// deadline.
func (b *bench) etcdDownWorkload() workload {
	p := b.plan
	return workload{
		name:   fmt.Sprintf("LeaseGrant, etcd down, N=%d, 2 s deadline", p.downClients),
		rounds: p.downRounds,
		setup: func(ctx context.Context) error {
			if b.etcd == nil {
				return errors.New("etcd was not started by the benchmark (-direct): not killing it")
			}
			b.etcd.kill()
			if b.etcd.alive() {
				return errors.New("etcd did not die")
			}
			logf("   killed etcd (pid %d)", b.etcdPID)
			return nil
		},
		run: func(ctx context.Context, t *target, round int) (*measurement, error) {
			return b.etcdDownRound(ctx, t)
		},
	}
}

func (b *bench) etcdDownRound(ctx context.Context, t *target) (*measurement, error) {
	const maxAttempts = 5_000_000
	n := b.plan.downClients
	conns, closeAll, err := dialN(t.addr, n)
	if err != nil {
		return nil, err
	}
	defer closeAll()
	attempts := make([]int, n)
	codes := make([]map[string]int, n)
	pr := b.startProbe(t)
	end := time.Now().Add(b.plan.downWindow)
	var wg sync.WaitGroup
	for c := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lc := pb.NewLeaseClient(conns[c])
			codes[c] = map[string]int{}
			for range maxAttempts {
				if !time.Now().Before(end) || ctx.Err() != nil {
					return
				}
				actx, cancel := context.WithTimeout(ctx, 2*time.Second)
				_, err := lc.LeaseGrant(actx, &pb.LeaseGrantRequest{TTL: 10})
				cancel()
				attempts[c]++
				codes[c][status.Code(err).String()]++
			}
		}()
	}
	wg.Wait()
	u := pr.stop()
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	total := 0
	all := map[string]int{}
	for c := range n {
		total += attempts[c]
		for k, v := range codes[c] {
			all[k] += v
		}
	}
	m := &measurement{}
	m.add(mAttempts, float64(total)/float64(n)/b.plan.downWindow.Seconds())
	if u.proxyOK {
		m.add(mProxyMsS, float64(u.proxyCPU.Milliseconds())/u.elapsed.Seconds())
	}
	m.add(mClientMsS, float64(u.selfCPU.Milliseconds())/u.elapsed.Seconds())
	m.addText(mErrCode, topCodes(all))
	return m, nil
}

// topCodes names the most frequent status code, and the runner-up if any.
func topCodes(all map[string]int) string {
	type kv struct {
		k string
		v int
	}
	var s []kv
	for k, v := range all {
		s = append(s, kv{k, v})
	}
	sort.Slice(s, func(i, j int) bool { return s[i].v > s[j].v || s[i].v == s[j].v && s[i].k < s[j].k })
	if len(s) == 0 {
		return "none"
	}
	if len(s) == 1 {
		return s[0].k
	}
	return s[0].k + " (then " + s[1].k + ")"
}
