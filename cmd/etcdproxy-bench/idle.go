package main

import (
	"context"
	"fmt"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
)

// The idle workload (issue #14 item 6): what a proxy with no clients costs etcd, in raft proposals. A proxy that
// writes to raft while idle (etcdproxy's read cache polls AuthStatus, a raft entry, to follow the auth revision)
// costs every member of the cluster a log entry, an fsync and an apply, for each of a fleet of idle proxies.
//
// Each target is measured in turn, with every other proxy the benchmark started paused (SIGSTOP), so that etcd
// hears from that one only. A proxy is first sent one cacheable read (serializable Range), its last traffic; then
// the first idleFirst (etcdproxy polls the auth revision until it has seen authIdlePolls = 10 polls without a
// cacheable read, one a second), then, from idleSettle after the read, the idle window. direct has no read and
// only the idle window: it is etcd's own rate, the baseline the proxies' rates are read against.

const (
	proposalsCommitted = "etcd_server_proposals_committed_total"
	idleFirst          = 10 * time.Second
	// idleSettle: the poll stops at the 10th tick without a read, between 10 and 11 s after it; 2 s more cover
	// that tick and the last poll's commit.
	idleSettle = 12 * time.Second
)

func (b *bench) idleWorkload() workload {
	return workload{
		name:    fmt.Sprintf("idle: no client traffic, %v window", b.plan.idleWindow),
		rounds:  1,
		targets: b.plan.idleTargets,
		run: func(ctx context.Context, t *target, round int) (*measurement, error) {
			return b.idleRound(ctx, t)
		},
		derive: deriveIdle,
	}
}

func (b *bench) idleRound(ctx context.Context, t *target) (*measurement, error) {
	resume, err := b.pauseOthers(t)
	defer resume()
	if err != nil {
		return nil, err
	}
	m := &measurement{}
	if t.name != direct {
		conns, err := b.pool(t, 1)
		if err != nil {
			return nil, err
		}
		read := time.Now()
		cctx, cancel := context.WithTimeout(ctx, opTimeout)
		_, err = pb.NewKVClient(conns[0]).Range(cctx, &pb.RangeRequest{Key: []byte("bench/idle"), Serializable: true})
		cancel()
		if err != nil {
			return nil, fmt.Errorf("the read before the idle windows: %w", err)
		}
		rate, err := b.proposalRate(ctx, idleFirst)
		if err != nil {
			return nil, err
		}
		m.add(mPropFirst, rate)
		if err := sleepCtx(ctx, time.Until(read.Add(idleSettle))); err != nil {
			return nil, err
		}
	}
	pr := b.startProbe(t)
	rate, err := b.proposalRate(ctx, b.plan.idleWindow)
	u := pr.stop()
	if err != nil {
		return nil, err
	}
	m.add(mPropIdle, rate)
	if u.proxyOK {
		m.add(mProxyMsS, float64(u.proxyCPU.Microseconds())/1000/u.elapsed.Seconds())
	}
	return m, nil
}

// pauseOthers pauses every proxy the benchmark started but t; resume continues them (it is to be called even when
// err is not nil). Proxies given by endpoint (-grpc-proxy, -etcdproxy-addr) cannot be paused and stay up: idle,
// since nothing is sent to them, but their own background work counts in every target's window.
func (b *bench) pauseOthers(t *target) (resume func(), err error) {
	var paused []*proc
	resume = func() {
		for _, p := range paused {
			if err := p.resume(); err != nil {
				logf("   resume %s: %v", p.name, err)
			}
		}
	}
	for _, o := range b.targets {
		if o == t || o.proc == nil || !o.proc.alive() {
			continue
		}
		if err := o.proc.pause(); err != nil {
			return resume, fmt.Errorf("pause %s: %w", o.name, err)
		}
		paused = append(paused, o.proc)
	}
	return resume, nil
}

// proposalRate is etcd's committed proposals per second over the next d.
func (b *bench) proposalRate(ctx context.Context, d time.Duration) (float64, error) {
	m0, err := scrapeMetrics(ctx, b.metricsURL, proposalsCommitted)
	if err != nil {
		return 0, fmt.Errorf("etcd metrics: %w", err)
	}
	t0 := time.Now()
	if err := sleepCtx(ctx, d); err != nil {
		return 0, err
	}
	m1, err := scrapeMetrics(ctx, b.metricsURL, proposalsCommitted)
	if err != nil {
		return 0, fmt.Errorf("etcd metrics: %w", err)
	}
	return (m1[proposalsCommitted] - m0[proposalsCommitted]) / time.Since(t0).Seconds(), nil
}

// deriveIdle adds, for every proxy, its rates minus etcd's own (direct's idle rate): the proposals the proxy
// costs etcd.
func deriveIdle(res *workloadResult) {
	base, ok := res.value(mPropIdle, direct)
	if !ok {
		return
	}
	for _, t := range targetNames {
		if t == direct {
			continue
		}
		for _, d := range [][2]metric{{mPropFirst, mPropByFirst}, {mPropIdle, mPropByIdle}} {
			if v, ok := res.value(d[0], t); ok {
				res.record(t, sample{metric: d[1], value: v - base})
			}
		}
	}
}

// sleepCtx sleeps for d, or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
