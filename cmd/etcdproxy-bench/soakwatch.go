package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// tally is what one watcher (or etcd's own watch of one key) has received: exactly-once delivery means the same
// tally as etcd's for the key.
type tally struct {
	count  int64
	last   int64  // revision of the last event
	digest uint64 // a running hash of every revision received, in order
}

// add records the event at rev; it reports false when rev does not come after the last one (a duplicate, or out of
// order).
func (t *tally) add(rev int64) bool {
	ok := rev > t.last
	t.count++
	t.last = max(t.last, rev)
	t.digest = (t.digest ^ uint64(rev)) * 1099511628211 // FNV-1a's prime: order matters
	return ok
}

// soakKey is the i-th watched key.
func soakKey(i int) string { return fmt.Sprintf("soak/w/%03d", i) }

// soakWatchers are the W watchers through the proxy: 100 per stream, the streams spread over 10 connections; watcher
// g is on stream g%streams and watches key (g/streams)%K, so that every stream carries every key.
type soakWatchers struct {
	streams []*soakWatchStream
	keyOf   func(g int) int

	mu       sync.Mutex // mu protects failures
	failures []string
}

// soakWatchStream is one Watch stream and its watchers' tallies.
type soakWatchStream struct {
	stream  pb.Watch_WatchClient
	members []int // watcher indices in the order of their creates

	mu      sync.Mutex    // mu protects the fields below
	ids     map[int64]int // watch id -> index in members
	created int
	tallies []tally // by index in members
	done    chan struct{}
}

func (ws *soakWatchers) fail(format string, args ...any) {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	if len(ws.failures) < 1000 {
		ws.failures = append(ws.failures, fmt.Sprintf(format, args...))
	}
}

func (ws *soakWatchers) failed() []string {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	return append([]string(nil), ws.failures...)
}

// openWatchers opens the streams and creates every watcher from startRev, waiting until all are created.
func openWatchers(ctx context.Context, conns []*grpc.ClientConn, W, K int, startRev int64) (*soakWatchers, error) {
	nStreams := (W + watchersPerStream - 1) / watchersPerStream
	ws := &soakWatchers{keyOf: func(g int) int { return (g / nStreams) % K }}
	for i := range nStreams {
		st, err := pb.NewWatchClient(conns[i%len(conns)]).Watch(ctx)
		if err != nil {
			return nil, fmt.Errorf("open watch stream: %w", err)
		}
		ws.streams = append(ws.streams, &soakWatchStream{stream: st, ids: map[int64]int{}, done: make(chan struct{})})
	}
	for g := range W {
		st := ws.streams[g%nStreams]
		st.members = append(st.members, g)
	}
	for _, st := range ws.streams {
		st.tallies = make([]tally, len(st.members))
		go ws.receive(st)
		for _, g := range st.members {
			req := &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{
				Key: []byte(soakKey(ws.keyOf(g))), StartRevision: startRev + 1}}}
			if err := st.stream.Send(req); err != nil {
				return ws, fmt.Errorf("send create: %w", err)
			}
		}
	}
	deadline := time.Now().Add(2 * time.Minute)
	for n := ws.createdCount(); n < W; n = ws.createdCount() {
		if time.Now().After(deadline) {
			return ws, fmt.Errorf("%d of %d watchers created after 2m", n, W)
		}
		if f := ws.failed(); len(f) > 0 {
			return ws, fmt.Errorf("creating watchers: %s", f[0])
		}
		if err := sleepCtx(ctx, 100*time.Millisecond); err != nil {
			return ws, err
		}
	}
	return ws, nil
}

func (ws *soakWatchers) createdCount() int {
	n := 0
	for _, st := range ws.streams {
		st.mu.Lock()
		n += st.created
		st.mu.Unlock()
	}
	return n
}

// receive reads st until it ends; anything but the soak's own cancellation is a failure.
func (ws *soakWatchers) receive(st *soakWatchStream) {
	defer close(st.done)
	for {
		resp, err := st.stream.Recv()
		if err != nil {
			if status.Code(err) != codes.Canceled && !errors.Is(err, context.Canceled) {
				ws.fail("a watch stream ended: %v", err)
			}
			return
		}
		ws.handle(st, resp)
	}
}

func (ws *soakWatchers) handle(st *soakWatchStream, resp *pb.WatchResponse) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if resp.Created {
		if st.created >= len(st.members) {
			ws.fail("an unexpected created response (watch id %d)", resp.WatchId)
			return
		}
		st.ids[resp.WatchId] = st.created
		st.created++
	}
	i, ok := st.ids[resp.WatchId]
	if !ok {
		ws.fail("a response for unknown watch id %d", resp.WatchId)
		return
	}
	g := st.members[i]
	if resp.Canceled {
		ws.fail("watcher %d cancelled: %q (compact revision %d)", g, resp.CancelReason, resp.CompactRevision)
		return
	}
	key := soakKey(ws.keyOf(g))
	for _, ev := range resp.Events {
		if string(ev.Kv.Key) != key {
			ws.fail("watcher %d of %s got an event of %q", g, key, ev.Kv.Key)
			continue
		}
		if !st.tallies[i].add(ev.Kv.ModRevision) {
			ws.fail("watcher %d of %s: revision %d again or out of order (last %d)", g, key, ev.Kv.ModRevision,
				st.tallies[i].last)
		}
	}
}

// events is the number of events received by every watcher so far.
func (ws *soakWatchers) events() int64 {
	var n int64
	for _, st := range ws.streams {
		st.mu.Lock()
		for _, t := range st.tallies {
			n += t.count
		}
		st.mu.Unlock()
	}
	return n
}

// compare returns the watchers whose tally is not want's for their key (at most limit described), and their number.
func (ws *soakWatchers) compare(want []tally, limit int) (described []string, n int) {
	for _, st := range ws.streams {
		st.mu.Lock()
		for i, g := range st.members {
			k := ws.keyOf(g)
			if got := st.tallies[i]; got != want[k] {
				n++
				if len(described) < limit {
					described = append(described, fmt.Sprintf("watcher %d of %s: %d events up to revision %d, etcd %d up to %d",
						g, soakKey(k), got.count, got.last, want[k].count, want[k].last))
				}
			}
		}
		st.mu.Unlock()
	}
	return described, n
}

// stop ends every stream and waits for the receivers.
func (ws *soakWatchers) stop() {
	for _, st := range ws.streams {
		_ = st.stream.CloseSend()
	}
}

func (ws *soakWatchers) wait() {
	for _, st := range ws.streams {
		<-st.done
	}
}

// reference is etcd's own watch of the K keys, straight from the cluster: what every watcher must have received.
type reference struct {
	mu      sync.Mutex // mu protects the fields below
	tallies []tally
	err     error
	done    chan struct{}
}

func watchReference(ctx context.Context, c *clientv3.Client, K int, startRev int64) *reference {
	r := &reference{tallies: make([]tally, K), done: make(chan struct{})}
	index := map[string]int{}
	for k := range K {
		index[soakKey(k)] = k
	}
	wch := c.Watch(ctx, "soak/w/", clientv3.WithPrefix(), clientv3.WithRev(startRev+1))
	go func() {
		defer close(r.done)
		for resp := range wch {
			r.mu.Lock()
			if err := resp.Err(); err != nil && r.err == nil && ctx.Err() == nil {
				r.err = err
			}
			for _, ev := range resp.Events {
				if k, ok := index[string(ev.Kv.Key)]; ok {
					r.tallies[k].add(ev.Kv.ModRevision)
				}
			}
			r.mu.Unlock()
		}
	}()
	return r
}

func (r *reference) snapshot() ([]tally, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]tally(nil), r.tallies...), r.err
}

// last is the highest revision etcd's watch has delivered.
func (r *reference) last() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	var m int64
	for _, t := range r.tallies {
		m = max(m, t.last)
	}
	return m
}
