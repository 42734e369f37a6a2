package proxy

import (
	"context"
	"encoding/json"
	"os"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/naming/endpoints"
	"go.uber.org/zap"
)

// Registration keeps this proxy registered under a prefix in etcd (--resolver-prefix, --resolver-ttl), the way
// etcd's ecosystem names a set of servers: key PREFIX/ADDR, value etcd's naming/endpoints record {Addr: ADDR,
// Metadata: {"name": hostname}} as etcd grpc-proxy writes it, attached to a session lease of TTL seconds. Clients
// find the live set with etcd's gRPC resolver (go.etcd.io/etcd/client/v3/naming/resolver, target
// etcd:///PREFIX). A proxy that dies leaves the set when its lease expires (TTL); a lost lease (etcd restarted,
// partition) is registered again, at most once a second; Close deregisters at once, so clients move before the
// proxy stops serving.
type Registration struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// registerRetry is the least time between two registration attempts (etcd grpc-proxy: one a second).
const registerRetry = time.Second

// Register starts keeping addr registered under prefix with c.
func Register(c *clientv3.Client, prefix, addr string, ttl int, lg *zap.Logger) *Registration {
	ctx, cancel := context.WithCancel(c.Ctx())
	r := &Registration{cancel: cancel, done: make(chan struct{})}
	go r.run(ctx, c, prefix, addr, ttl, lg)
	return r
}

// Close deregisters the proxy (its lease is revoked, so its key goes at once) and stops.
func (r *Registration) Close() {
	r.cancel()
	<-r.done
}

func (r *Registration) run(ctx context.Context, c *clientv3.Client, prefix, addr string, ttl int, lg *zap.Logger) {
	defer close(r.done)
	hostname, _ := os.Hostname()
	meta, _ := json.Marshal(struct {
		Name string `json:"name"`
	}{hostname})
	key := prefix + "/" + addr
	for {
		attempt := time.Now()
		if err := registerOnce(ctx, c, prefix, key, endpoints.Endpoint{Addr: addr, Metadata: string(meta)}, ttl, lg); err != nil &&
			ctx.Err() == nil {
			lg.Warn("registering the proxy failed; retrying", zap.String("key", key), zap.Error(err))
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Until(attempt.Add(registerRetry))):
		}
	}
}

// revokeTimeout bounds the deregistration on Close (with etcd unreachable, the key goes when its lease expires).
const revokeTimeout = 2 * time.Second

// registerOnce writes the proxy's record under a new lease and keeps the lease alive until ctx is done (then it
// revokes it, and the record goes with it) or the lease is lost.
func registerOnce(ctx context.Context, c *clientv3.Client, prefix, key string, ep endpoints.Endpoint, ttl int, lg *zap.Logger) error {
	lease, err := c.Grant(ctx, int64(ttl))
	if err != nil {
		return err
	}
	revoke := func() {
		rctx, cancel := context.WithTimeout(context.Background(), revokeTimeout)
		defer cancel()
		_, _ = c.Revoke(rctx, lease.ID)
	}
	kaCtx, stopKeepAlive := context.WithCancel(context.Background())
	defer stopKeepAlive()
	alive, err := c.KeepAlive(kaCtx, lease.ID)
	if err == nil {
		var em endpoints.Manager
		if em, err = endpoints.NewManager(c, prefix); err == nil {
			err = em.AddEndpoint(ctx, key, ep, clientv3.WithLease(lease.ID))
		}
	}
	if err != nil {
		revoke()
		return err
	}
	lg.Info("registered the proxy", zap.String("key", key), zap.Int("lease-ttl", ttl))
	for {
		select {
		case <-ctx.Done():
			stopKeepAlive()
			revoke()
			lg.Info("deregistered the proxy", zap.String("key", key))
			return nil
		case _, ok := <-alive:
			if !ok {
				lg.Warn("the proxy's registration lease was lost (etcd restarted, or a partition); registering again",
					zap.String("key", key))
				return nil
			}
		}
	}
}
