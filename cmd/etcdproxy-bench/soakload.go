package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// counter counts calls and their failures by gRPC code, keeping the first message of each code.
type counter struct {
	ok    atomic.Int64
	mu    sync.Mutex // mu protects errs and first
	errs  map[string]int
	first map[string]string
}

func (c *counter) record(err error) {
	if err == nil {
		c.ok.Add(1)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.errs == nil {
		c.errs, c.first = map[string]int{}, map[string]string{}
	}
	code := status.Code(err).String()
	if errors.Is(err, context.DeadlineExceeded) && status.Code(err) == codes.Unknown {
		code = "client timeout (5 s)" // the soak's own deadline, not a status from the proxy
	}
	c.errs[code]++
	if _, ok := c.first[code]; !ok {
		c.first[code] = err.Error()
	}
}

// failures returns the number of failed calls and, for each code, its count and first message.
func (c *counter) failures() (n int, byCode string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var parts []string
	for code, v := range c.errs {
		n += v
		parts = append(parts, fmt.Sprintf("%d %s, first %q", v, code, c.first[code]))
	}
	slices.Sort(parts)
	if len(parts) == 0 {
		return 0, "none"
	}
	return n, strings.Join(parts, "; ")
}

// paced calls f rate times a second until ctx ends.
func paced(ctx context.Context, rate int, f func(i int)) {
	if rate <= 0 {
		return
	}
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			f(i)
		}
	}
}

// write puts to the watched keys through the proxy, in turn, at the configured rate.
func (s *soak) write(ctx context.Context, c *clientv3.Client, puts *counter) {
	pad := strings.Repeat("x", 100)
	paced(ctx, s.cfg.writeRate, func(i int) {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		_, err := c.Put(cctx, soakKey(i%s.cfg.keys), fmt.Sprintf("%d-%s", i, pad))
		if ctx.Err() == nil {
			puts.record(err)
		}
	})
}

// read gets a random watched key, serializable, through the proxy, at the configured rate; an answer that is not
// self-consistent (another key, more than one, a value newer than its header) counts as a bad read.
func (s *soak) read(ctx context.Context, c *clientv3.Client, reads *counter, bad *atomic.Int64) {
	paced(ctx, s.cfg.readRate, func(int) {
		key := soakKey(rand.IntN(s.cfg.keys))
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		resp, err := c.Get(cctx, key, clientv3.WithSerializable())
		if ctx.Err() != nil {
			return
		}
		reads.record(err)
		if err == nil && (len(resp.Kvs) > 1 || len(resp.Kvs) == 1 &&
			(string(resp.Kvs[0].Key) != key || resp.Kvs[0].ModRevision > resp.Header.Revision)) {
			bad.Add(1)
		}
	})
}

// soakLeases are the leases kept alive through the proxy.
type soakLeases struct {
	ids        []int64
	replies    atomic.Int64
	reconnects atomic.Int64
	mu         sync.Mutex // mu protects lost
	lost       map[int64]bool
}

// grantLeases grants n leases of ttl seconds through the proxy, 16 at a time.
func grantSoakLeases(ctx context.Context, c *clientv3.Client, n int, ttl int64) (*soakLeases, error) {
	l := &soakLeases{ids: make([]int64, n), lost: map[int64]bool{}}
	var wg sync.WaitGroup
	errs := make([]error, 16)
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n && errs[w] == nil; i += 16 {
				resp, err := c.Grant(ctx, ttl)
				if err != nil {
					errs[w] = fmt.Errorf("grant: %w", err)
					return
				}
				l.ids[i] = int64(resp.ID)
			}
		}()
	}
	wg.Wait()
	return l, errors.Join(errs...)
}

// keepAlive renews ids over one LeaseKeepAlive stream on cc every interval until ctx ends, reopening the stream
// when it breaks (as a client does); a reply with TTL 0 is a lost lease.
func (l *soakLeases) keepAlive(ctx context.Context, cc *grpc.ClientConn, ids []int64, interval time.Duration) {
	for ctx.Err() == nil {
		sctx, cancel := context.WithCancel(ctx)
		st, err := pb.NewLeaseClient(cc).LeaseKeepAlive(sctx)
		if err == nil {
			recvDone := make(chan struct{})
			go func() {
				defer close(recvDone)
				defer cancel()
				l.receive(st)
			}()
			l.send(sctx, st, ids, interval)
			cancel()
			<-recvDone
		}
		cancel()
		if ctx.Err() != nil {
			return
		}
		l.reconnects.Add(1)
		_ = sleepCtx(ctx, 500*time.Millisecond)
	}
}

func (l *soakLeases) send(ctx context.Context, st pb.Lease_LeaseKeepAliveClient, ids []int64, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		for _, id := range ids {
			if err := st.Send(&pb.LeaseKeepAliveRequest{ID: id}); err != nil {
				return
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func (l *soakLeases) receive(st pb.Lease_LeaseKeepAliveClient) {
	for {
		resp, err := st.Recv()
		if err != nil {
			return
		}
		l.replies.Add(1)
		if resp.TTL <= 0 {
			l.mu.Lock()
			l.lost[resp.ID] = true
			l.mu.Unlock()
		}
	}
}

// check asks etcd itself (not the proxy) for every lease's remaining TTL: each must be alive.
func (l *soakLeases) check(ctx context.Context, c *clientv3.Client) []string {
	var out []string
	l.mu.Lock()
	for id := range l.lost {
		out = append(out, fmt.Sprintf("lease %x: a keepalive reply said it was gone", id))
	}
	l.mu.Unlock()
	for _, id := range l.ids {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		resp, err := c.TimeToLive(cctx, clientv3.LeaseID(id))
		cancel()
		switch {
		case err != nil:
			out = append(out, fmt.Sprintf("lease %x: TimeToLive: %v", id, err))
		case resp.TTL <= 0:
			out = append(out, fmt.Sprintf("lease %x expired", id))
		}
	}
	return out
}

// chaos restarts a member every restartEvery, in turn, and compacts every compactEvery to the revision seen one
// period before, until ctx ends.
func (s *soak) chaos(ctx context.Context, direct *clientv3.Client) error {
	restart := time.NewTicker(s.cfg.restartEvery)
	defer restart.Stop()
	compact := time.NewTicker(s.cfg.compactEvery)
	defer compact.Stop()
	var prev int64
	for next := 0; ; {
		select {
		case <-ctx.Done():
			return nil
		case <-restart.C:
			if err := s.restartMember(ctx, next%len(s.members)); err != nil && ctx.Err() == nil {
				return err
			}
			next++
		case <-compact.C:
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			resp, err := direct.Get(cctx, "soak/start")
			if err == nil && prev > 0 {
				_, err = direct.Compact(cctx, prev)
				if err == nil {
					s.events.add("compacted at revision %d", prev)
				}
			}
			cancel()
			if err != nil && ctx.Err() == nil {
				s.events.add("compaction skipped: %v", err)
			} else if err == nil {
				prev = resp.Header.Revision
			}
		}
	}
}
