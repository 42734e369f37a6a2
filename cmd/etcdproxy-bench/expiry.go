package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

const (
	expiryTTL        = 3 // seconds
	expiryLeases     = 20
	expiryKeepAlives = 5 // per lease, keepAliveInterval apart
	expiryPrefix     = "bench/expiry/"
)

// expiryWorkload: how long a lease outlives its client. 20 leases (TTL 3 s), granted straight at etcd, each with
// a key attached, are kept alive through the target, each on its own LeaseKeepAlive stream: 5 requests 500 ms
// apart, each sent after the previous reply. Then the client goes away (its stream is cancelled), as a crashed
// client would. A watch straight at etcd sees each key deleted when etcd expires the lease; the metric is the time
// from the lease's last keepalive request to that delete. etcd expires a lease TTL after its last renewal, give or
// take its expiry check (every 500 ms), so direct etcd reads about TTL to TTL + 0.5 s; a proxy that renews leases
// on its own reads more.
func (b *bench) expiryWorkload() workload {
	return workload{
		name:   fmt.Sprintf("lease expiry after the client's last keepalive, TTL=%d s", expiryTTL),
		rounds: b.plan.leaseRounds,
		run: func(ctx context.Context, t *target, round int) (*measurement, error) {
			return b.expiryRound(ctx, t, fmt.Sprintf("%s%s/%d/", expiryPrefix, t.name, round))
		},
	}
}

func (b *bench) expiryRound(ctx context.Context, t *target, prefix string) (*measurement, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// The watch that times each expiry, straight at etcd, open before any key exists.
	wc, err := pb.NewWatchClient(b.direct).Watch(ctx)
	if err != nil {
		return nil, fmt.Errorf("watch: %w", err)
	}
	if err := wc.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{
		Key: []byte(prefix), RangeEnd: []byte(clientv3.GetPrefixRangeEnd(prefix))}}}); err != nil {
		return nil, fmt.Errorf("watch: %w", err)
	}
	if resp, err := wc.Recv(); err != nil || !resp.Created {
		return nil, fmt.Errorf("watch not created: %v", err)
	}
	var mu sync.Mutex
	deleted := map[string]time.Time{}
	watchErr := make(chan error, 1)
	go func() {
		for {
			resp, err := wc.Recv()
			if err != nil {
				watchErr <- err
				return
			}
			now := time.Now()
			mu.Lock()
			for _, ev := range resp.Events {
				if ev.Type == mvccpb.DELETE {
					deleted[string(ev.Kv.Key)] = now
				}
			}
			mu.Unlock()
		}
	}()

	// The leases and their keys, straight at etcd.
	lc, kv := pb.NewLeaseClient(b.direct), pb.NewKVClient(b.direct)
	ids := make([]int64, expiryLeases)
	for i := range ids {
		cctx, ccancel := context.WithTimeout(ctx, opTimeout)
		g, err := lc.LeaseGrant(cctx, &pb.LeaseGrantRequest{TTL: expiryTTL})
		if err == nil {
			ids[i] = g.ID
			_, err = kv.Put(cctx, &pb.PutRequest{Key: fmt.Appendf(nil, "%s%d", prefix, i), Value: value, Lease: g.ID})
		}
		ccancel()
		if err != nil {
			b.revokeLeases(ids[:i+1])
			return nil, fmt.Errorf("grant and attach: %w", err)
		}
	}

	// The clients, through the target: one stream per lease, on a few connections.
	conns, closeAll, err := dialN(t.addr, 4)
	if err != nil {
		b.revokeLeases(ids)
		return nil, err
	}
	defer closeAll()
	last := make([]time.Time, len(ids))
	errs := make([]error, len(ids))
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Bounded, so that a target that never answers cannot hold the round.
			sctx, scancel := context.WithTimeout(ctx, expiryKeepAlives*keepAliveInterval+opTimeout)
			defer scancel() // the client goes away
			st, err := pb.NewLeaseClient(conns[i%len(conns)]).LeaseKeepAlive(sctx)
			if err != nil {
				errs[i] = err
				return
			}
			for k := range expiryKeepAlives {
				if k > 0 {
					time.Sleep(keepAliveInterval)
				}
				last[i] = time.Now()
				if err := st.Send(&pb.LeaseKeepAliveRequest{ID: id}); err != nil {
					errs[i] = err
					return
				}
				resp, err := st.Recv()
				if err != nil {
					errs[i] = err
					return
				}
				if resp.TTL <= 0 {
					errs[i] = fmt.Errorf("lease %x answered TTL %d while kept alive", id, resp.TTL)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		b.revokeLeases(ids)
		return nil, fmt.Errorf("keepalive: %w", err)
	}

	// Wait for every key to go, up to 3 TTLs after the last keepalive.
	deadline := slices.MaxFunc(last, func(a, b time.Time) int { return a.Compare(b) }).Add(3 * expiryTTL * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		mu.Lock()
		n := len(deleted)
		mu.Unlock()
		if n == len(ids) {
			break
		}
		select {
		case err := <-watchErr:
			b.revokeLeases(ids)
			return nil, fmt.Errorf("watch: %w", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	// What expired by now, before the revoke below deletes the keys of the leases that did not.
	mu.Lock()
	var after []time.Duration
	for i := range ids {
		if at, ok := deleted[fmt.Sprintf("%s%d", prefix, i)]; ok {
			after = append(after, at.Sub(last[i]))
		}
	}
	mu.Unlock()
	b.revokeLeases(ids)
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}

	m := &measurement{}
	m.add(mNotExpired, float64(len(ids)-len(after)))
	if len(after) > 0 {
		slices.Sort(after)
		m.add(mExpiryP50, after[len(after)/2].Seconds())
		m.add(mExpiryMax, after[len(after)-1].Seconds())
	}
	return m, nil
}
