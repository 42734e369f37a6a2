package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
)

// Unary workloads: closed loops of C clients, each with its own gRPC connection, for a fixed window after a
// warm-up. An op is one RPC.

const (
	hitWarmup       = 1500 * time.Millisecond // the cache-hit workloads' warm-up: see getWorkload
	valueSize       = 256
	maxOpsPerClient = 2_000_000 // a bound on every loop, whatever the window
	opTimeout       = 5 * time.Second
)

var value = func() []byte {
	v := make([]byte, valueSize)
	for i := range v {
		v[i] = 'a' + byte(i%26)
	}
	return v
}()

func keys(prefix string, n int) [][]byte {
	ks := make([][]byte, n)
	for i := range ks {
		ks[i] = fmt.Appendf(nil, "%s%06d", prefix, i)
	}
	return ks
}

func (b *bench) unaryWorkloads() []workload {
	p := b.plan
	putKeys := keys("bench/put/", p.putKeys)
	hotKeys := keys("bench/hot/", p.hotKeys)
	// The cold key set has a fresh stretch of p.coldKeys keys per round, so that no round reads a key an earlier
	// round read (and that a cache which kept it could answer).
	coldKeys := keys("bench/cold/", p.coldKeys*p.rounds)
	var once sync.Once
	var preloadErr error
	preload := func(ctx context.Context) error {
		once.Do(func() {
			start := time.Now()
			preloadErr = b.preload(ctx, append(hotKeys, coldKeys...))
			logf("   preloaded %d keys in %v", len(hotKeys)+len(coldKeys), time.Since(start).Round(time.Millisecond))
		})
		return preloadErr
	}

	put := func(clients int) workload {
		return workload{
			name:   putName(clients),
			rounds: p.rounds,
			run: func(ctx context.Context, t *target, round int) (*measurement, error) {
				return b.closedLoop(ctx, t, clients, p.warmup, func(ctx context.Context, cc *grpc.ClientConn, rng *rand.Rand, _, _ int) error {
					_, err := pb.NewKVClient(cc).Put(ctx, &pb.PutRequest{Key: putKeys[rng.IntN(len(putKeys))], Value: value})
					return err
				})
			},
		}
	}
	var ws []workload
	for _, c := range p.putClients {
		ws = append(ws, put(c))
	}
	ws = append(ws, b.getWorkload(getSpec{name: fmt.Sprintf("get linearizable C=16 (%d keys)", p.hotKeys),
		clients: 16, keys: hotKeys}, preload), b.barrierAlone())
	for _, c := range p.getClients {
		ws = append(ws, b.getWorkload(getSpec{name: hotGetName(c, p.hotKeys), clients: c, serializable: true,
			keys: hotKeys}, preload))
	}
	ws = append(ws, b.getWorkload(getSpec{name: fmt.Sprintf("get serializable cold C=16 (%d fresh keys per round)",
		p.coldKeys), clients: 16, serializable: true, keys: coldKeys, cold: true}, preload))
	// The put rows above run before any read, on a proxy whose read cache has not been read: etcdproxy's keyspace
	// watch is not running then (it starts at the first cacheable read). This one shows what a write costs while
	// the cache is in use: one serializable read through the target before each round starts the watch (it runs
	// for --kv-cache-watch-idle, 30 s, after the last read: longer than a round), and etcd then sends the proxy
	// every write's event, which it reads and applies, and each write's reply waits for its event.
	inUse := put(1)
	inUse.name = putCacheInUseName
	inner := inUse.run
	inUse.run = func(ctx context.Context, t *target, round int) (*measurement, error) {
		conns, err := b.pool(t, 1)
		if err != nil {
			return nil, err
		}
		rctx, cancel := context.WithTimeout(ctx, opTimeout)
		_, err = pb.NewKVClient(conns[0]).Range(rctx, &pb.RangeRequest{Key: putKeys[0], Serializable: true})
		cancel()
		if err != nil {
			return nil, fmt.Errorf("the read that starts the cache's watch: %w", err)
		}
		return inner(ctx, t, round)
	}
	return append(ws, inUse)
}

// putCacheInUseName is the put workload run while etcdproxy's read cache is in use.
const putCacheInUseName = "put C=1, the read cache in use (its keyspace watch running)"

// barrierRate is the pace of the barrier-alone workload: about the rate at which etcdproxy sends its barrier reads
// in the linearizable get workload (16 clients, 14 to 16 reads per barrier here).
const barrierRate = 1000

// barrierAlone measures what etcdproxy's barrier read costs etcd by itself, straight at etcd: one client sends the
// same request (a linearizable count-only Range of one key) barrierRate times a second. It is the floor of the
// linearizable get's etcd CPU: a proxy that proves each batch of C reads linearizable with one linearizable request
// to etcd cannot cost etcd less than this row's etcd CPU µs/op divided by C per read.
func (b *bench) barrierAlone() workload {
	return workload{
		name:    fmt.Sprintf("barrier alone: linearizable count-only Range, 1 client, %d/s", barrierRate),
		rounds:  b.plan.rounds,
		targets: []string{direct},
		run: func(ctx context.Context, t *target, _ int) (*measurement, error) {
			conns, err := b.pool(t, 1)
			if err != nil {
				return nil, err
			}
			kv := pb.NewKVClient(conns[0])
			req := &pb.RangeRequest{Key: []byte("\x00etcdproxy/linearizable"), CountOnly: true}
			period := time.Second / barrierRate
			start := time.Now()
			warmEnd := start.Add(b.plan.warmup)
			end := warmEnd.Add(b.plan.window)
			var lats []time.Duration
			var pr *probe
			for next := start; ctx.Err() == nil; next = next.Add(period) {
				time.Sleep(time.Until(next))
				t0 := time.Now()
				if t0.After(end) {
					break
				}
				if pr == nil && !t0.Before(warmEnd) {
					pr = b.startProbe(t)
				}
				octx, cancel := context.WithTimeout(ctx, opTimeout)
				_, err := kv.Range(octx, req)
				cancel()
				if err != nil {
					return nil, fmt.Errorf("barrier read: %w", err)
				}
				if pr != nil {
					lats = append(lats, time.Since(t0))
				}
			}
			if pr == nil || len(lats) == 0 {
				return nil, errors.New("no op inside the window")
			}
			u := pr.stop()
			m := &measurement{}
			m.add(mOps, float64(len(lats))/b.plan.window.Seconds())
			latencyMetrics(m, lats)
			u.addCPU(m, float64(len(lats)), false)
			m.add(mErrors, 0)
			return m, nil
		},
	}
}

// getSpec is one Range workload.
type getSpec struct {
	name         string
	clients      int
	serializable bool
	keys         [][]byte
	cold         bool // each round reads its own stretch of keys, each key once (else: random keys)
}

func (b *bench) getWorkload(g getSpec, preload func(context.Context) error) workload {
	rounds := b.plan.rounds
	warmup := b.plan.warmup
	hit := g.serializable && !g.cold
	if hit {
		// Five targets in turn leave more than 10 s between two rounds of one target; etcdproxy's read cache,
		// after 10 s without a cacheable read, stops following etcd's auth revision (a raft entry a second) and
		// serves again from its first poll after the next read, up to a poll period (1 s) later. A warm-up longer
		// than that keeps the wake-up out of the window, for every target alike.
		warmup = max(warmup, hitWarmup)
	}
	w := workload{
		name:   g.name,
		rounds: rounds,
		setup:  preload,
		run: func(ctx context.Context, t *target, round int) (*measurement, error) {
			// Cold: the round's own stretch of the key set, split between the clients; each client walks
			// its part in order, so no key is read twice in the round unless a client wraps around its part
			// (the cache hit row shows whether etcdproxy's cache ever answered).
			stretch := g.keys
			if g.cold {
				n := len(g.keys) / rounds
				stretch = g.keys[(round%rounds)*n : (round%rounds+1)*n]
			}
			part := len(stretch) / g.clients
			return b.closedLoop(ctx, t, g.clients, warmup, func(ctx context.Context, cc *grpc.ClientConn, rng *rand.Rand, c, i int) error {
				var k []byte
				if g.cold {
					k = stretch[c*part+i%part]
				} else {
					k = stretch[rng.IntN(len(stretch))]
				}
				_, err := pb.NewKVClient(cc).Range(ctx, &pb.RangeRequest{Key: k, Serializable: g.serializable})
				return err
			})
		},
	}
	if hit {
		// Every read after the first of each key is a cache hit: floorcache is the floor.
		w.targets, w.floor = targetNames, floorCache
	}
	return w
}

// The names of the workloads the ops/s-against-clients plots read.
func putName(clients int) string { return fmt.Sprintf("put C=%d", clients) }

func hotGetName(clients, keys int) string {
	return fmt.Sprintf("get serializable hot C=%d (%d keys)", clients, keys)
}

// preload writes ks with 256-byte values straight to etcd, 128 keys per Txn (etcd's --max-txn-ops default).
func (b *bench) preload(ctx context.Context, ks [][]byte) error {
	kv := pb.NewKVClient(b.direct)
	for i := 0; i < len(ks); i += 128 {
		var ops []*pb.RequestOp
		for _, k := range ks[i:min(i+128, len(ks))] {
			ops = append(ops, &pb.RequestOp{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: k, Value: value}}})
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := kv.Txn(cctx, &pb.TxnRequest{Success: ops})
		cancel()
		if err != nil {
			return fmt.Errorf("preload: %w", err)
		}
	}
	return nil
}

// closedLoop runs op in a loop on clients clients, each with its own connection and random source; op gets the
// client's index and the number of ops it started before. Only ops started inside the window, after warmup,
// count; the CPU of
// etcd, of the proxy and of this process (the clients), and etcdproxy's cache hits and misses, are measured over
// the same window.
func (b *bench) closedLoop(ctx context.Context, t *target, clients int, warmup time.Duration,
	op func(ctx context.Context, cc *grpc.ClientConn, rng *rand.Rand, client, seq int) error) (*measurement, error) {
	conns, err := b.pool(t, clients)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	warmEnd := start.Add(warmup)
	end := warmEnd.Add(b.plan.window)
	lats := make([][]time.Duration, clients)
	errs := make([]int, clients)
	firstErr := make([]error, clients)
	var wg sync.WaitGroup
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(c), uint64(start.UnixNano())))
			lats[c] = make([]time.Duration, 0, 1<<14)
			for i := range maxOpsPerClient {
				t0 := time.Now()
				if t0.After(end) || ctx.Err() != nil {
					return
				}
				octx, cancel := context.WithTimeout(ctx, opTimeout)
				err := op(octx, conns[c], rng, c, i)
				cancel()
				d := time.Since(t0)
				if t0.Before(warmEnd) {
					continue
				}
				if err != nil {
					errs[c]++
					if firstErr[c] == nil {
						firstErr[c] = err
					}
					continue
				}
				lats[c] = append(lats[c], d)
			}
		}()
	}
	time.Sleep(time.Until(warmEnd))
	cache0, cacheErr0 := b.cacheCounters(ctx, t)
	pr := b.startProbe(t)
	wg.Wait()
	u := pr.stop()
	cache1, cacheErr1 := b.cacheCounters(ctx, t)
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}

	var all []time.Duration
	nerr := 0
	for c := range clients {
		all = append(all, lats[c]...)
		nerr += errs[c]
	}
	first := errors.Join(firstErr...)
	for _, err := range firstErr {
		if err != nil {
			first = err // one error, not one line per client
			break
		}
	}
	if len(all) == 0 {
		if first == nil {
			// A stall longer than the window (a busy machine): every op started in the warm-up.
			return nil, errors.New("no op started inside the window")
		}
		return nil, fmt.Errorf("every op failed: %w", first)
	}
	m := &measurement{}
	m.add(mOps, float64(len(all))/b.plan.window.Seconds())
	latencyMetrics(m, all)
	u.addCPU(m, float64(len(all)), false)
	m.add(mClientCPU, float64(u.selfCPU.Microseconds())/float64(len(all)))
	if cacheErr0 == nil && cacheErr1 == nil {
		hits, misses := cache1[cacheHits]-cache0[cacheHits], cache1[cacheMisses]-cache0[cacheMisses]
		if hits+misses > 0 {
			m.add(mCacheHit, 100*hits/(hits+misses))
		}
		if batches := cache1[linBatches] - cache0[linBatches]; batches > 0 {
			m.add(mPerBarrier, (cache1[linHits]-cache0[linHits])/batches)
			if u.etcdOK {
				m.add(mBarrierCPU, float64(u.etcdCPU.Microseconds())/batches)
			}
		}
	}
	m.add(mErrors, float64(nerr))
	if nerr > 0 {
		m.note = fmt.Sprintf("%d errors, first: %v", nerr, first)
	}
	return m, nil
}

// etcdproxy's read cache counters (the ops of the window include the warmup's last ones, which is why the hit rate
// of a hot workload can read slightly below 100).
const (
	cacheHits   = "etcdproxy_kvcache_hits_total"
	cacheMisses = "etcdproxy_kvcache_misses_total"
	linHits     = "etcdproxy_kvcache_linearizable_hits_total"
	linBatches  = "etcdproxy_kvcache_linearizable_batches_total"
)

// cacheCounters scrapes etcdproxy's cache counters from its HTTP endpoint (served on its gRPC port); other targets
// have none.
func (b *bench) cacheCounters(ctx context.Context, t *target) (map[string]float64, error) {
	if t.name != etcdproxy {
		return nil, errors.New("no cache counters")
	}
	return scrapeMetrics(ctx, "http://"+t.addr+"/metrics", cacheHits, cacheMisses, linHits, linBatches)
}
