// Package members answers Cluster.MemberList with the proxies instead of the etcd members, when the operator asked
// for it (--advertise-client-url given, or --resolver-prefix), so that clients which sync their endpoints from the
// member list (clientv3 AutoSyncInterval, etcdctl --discovery) stay on proxies. It owns the view of the registered
// proxies (a watch on the registration prefix) and nothing else: registration itself is proxy.Register, and the
// other Cluster RPCs pass through.
package members

import (
	"context"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"os"
	"slices"
	"sync"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/naming/endpoints"
	"go.uber.org/zap"
)

// Options say what MemberList answers. The zero value passes it through.
type Options struct {
	// Advertise is this proxy's client URL as clients should dial it; "" passes MemberList through to etcd.
	Advertise string
	// Prefix, if set, is where the proxies register (as stored in etcd: the namespace, then --resolver-prefix);
	// MemberList then lists every proxy registered there, this one included.
	Prefix string
}

// Cluster is the Cluster service with MemberList answered by the proxy.
type Cluster struct {
	pb.ClusterServer
	self endpoints.Endpoint
	lg   *zap.Logger

	// mu protects registered.
	mu         sync.RWMutex
	registered map[string]endpoints.Endpoint // by key, as the registration watch last reported

	cancel context.CancelFunc
	done   chan struct{}
}

// New wraps next. With o.Prefix it watches the registered proxies with c until Close.
func New(next pb.ClusterServer, c *clientv3.Client, lg *zap.Logger, o Options) *Cluster {
	hostname, _ := os.Hostname()
	cl := &Cluster{ClusterServer: next, self: endpoints.Endpoint{Addr: o.Advertise, Metadata: metadata(hostname)},
		lg: lg, registered: map[string]endpoints.Endpoint{}, done: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	cl.cancel = cancel
	if o.Advertise == "" || o.Prefix == "" {
		close(cl.done)
		return cl
	}
	go cl.follow(ctx, c, o.Prefix)
	return cl
}

// Close stops following the registrations.
func (cl *Cluster) Close() {
	cl.cancel()
	<-cl.done
}

// metadata is the record's metadata as proxy.Register and etcd grpc-proxy write it: {"name": hostname}, as a string.
func metadata(name string) string {
	b, _ := json.Marshal(struct {
		Name string `json:"name"`
	}{name})
	return string(b)
}

// followRetry is the least time between two starts of the registration watch (etcd grpc-proxy: one a second).
const followRetry = time.Second

// follow keeps cl.registered in step with the records under prefix: a read of the whole set, then a watch from
// the revision after it; a watch that ends (compaction, leader lost, etcd gone) starts over with a fresh read.
func (cl *Cluster) follow(ctx context.Context, c *clientv3.Client, prefix string) {
	defer close(cl.done)
	for ctx.Err() == nil {
		start := time.Now()
		if err := cl.followOnce(ctx, c, prefix+"/"); err != nil && ctx.Err() == nil {
			cl.lg.Warn("following the registered proxies failed; retrying", zap.String("prefix", prefix), zap.Error(err))
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Until(start.Add(followRetry))):
		}
	}
}

func (cl *Cluster) followOnce(ctx context.Context, c *clientv3.Client, prefix string) error {
	ctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	resp, err := c.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return err
	}
	set := map[string]endpoints.Endpoint{}
	for _, kv := range resp.Kvs {
		if ep, ok := record(kv.Value); ok {
			set[string(kv.Key)] = ep
		}
	}
	cl.mu.Lock()
	cl.registered = set
	cl.mu.Unlock()
	for wr := range c.Watch(ctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1)) {
		if err := wr.Err(); err != nil {
			return err
		}
		cl.mu.Lock()
		for _, ev := range wr.Events {
			ep, ok := record(ev.Kv.Value)
			if ev.Type == clientv3.EventTypeDelete || !ok {
				delete(cl.registered, string(ev.Kv.Key))
			} else {
				cl.registered[string(ev.Kv.Key)] = ep
			}
		}
		cl.mu.Unlock()
	}
	return ctx.Err()
}

// record decodes a registration as etcd's naming/endpoints writes it ({"Op":0,"Addr":...,"Metadata":...}); a value
// that is not one (or has no address) is no proxy.
func record(v []byte) (endpoints.Endpoint, bool) {
	var r struct {
		Addr     string
		Metadata any
	}
	if json.Unmarshal(v, &r) != nil || r.Addr == "" {
		return endpoints.Endpoint{}, false
	}
	return endpoints.Endpoint{Addr: r.Addr, Metadata: r.Metadata}, true
}

// MemberList answers with the proxies: this one, and with a prefix every proxy registered there. The header is
// etcd's (the call goes to etcd, so its errors and its consistency are etcd's, and a client that reads the
// cluster id from it sees etcd's).
func (cl *Cluster) MemberList(ctx context.Context, r *pb.MemberListRequest) (*pb.MemberListResponse, error) {
	resp, err := cl.ClusterServer.MemberList(ctx, r)
	if err != nil || cl.self.Addr == "" {
		return resp, err
	}
	return &pb.MemberListResponse{Header: resp.Header, Members: cl.list()}, nil
}

// list is the proxies by URL, each once, this one first-class with the others.
func (cl *Cluster) list() []*pb.Member {
	byAddr := map[string]*pb.Member{cl.self.Addr: member(cl.self)}
	cl.mu.RLock()
	for _, ep := range cl.registered {
		if _, ok := byAddr[ep.Addr]; !ok {
			byAddr[ep.Addr] = member(ep)
		}
	}
	cl.mu.RUnlock()
	ms := make([]*pb.Member, 0, len(byAddr))
	for _, m := range byAddr {
		ms = append(ms, m)
	}
	slices.SortFunc(ms, func(a, b *pb.Member) int {
		switch {
		case a.ClientURLs[0] < b.ClientURLs[0]:
			return -1
		case a.ClientURLs[0] > b.ClientURLs[0]:
			return 1
		}
		return 0
	})
	return ms
}

// member is a proxy as a member: its URL, the name it registered (a member without a name is skipped by clientv3's
// endpoint sync, so the URL stands in for one it did not give), and an id derived from the URL, the same on every
// proxy (etcd grpc-proxy gives every proxy id 0).
func member(ep endpoints.Endpoint) *pb.Member {
	var meta struct {
		Name string `json:"name"`
	}
	if s, ok := ep.Metadata.(string); ok {
		_ = json.Unmarshal([]byte(s), &meta)
	} else if m, ok := ep.Metadata.(map[string]any); ok {
		meta.Name, _ = m["name"].(string)
	}
	if meta.Name == "" {
		meta.Name = ep.Addr
	}
	h := fnv.New64a()
	fmt.Fprint(h, ep.Addr)
	id := h.Sum64()
	if id == 0 {
		id = 1
	}
	return &pb.Member{ID: id, Name: meta.Name, ClientURLs: []string{ep.Addr}}
}
