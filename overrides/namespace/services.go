package namespace

import (
	"context"

	"github.com/etcdproxy/etcdproxy/gen"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	v3electionpb "go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	v3lockpb "go.etcd.io/etcd/server/v3/etcdserver/api/v3lock/v3lockpb"
	"google.golang.org/grpc"
)

// Apply confines every keyed service of s to prefix; an empty prefix changes nothing. It must be applied after
// every other override (outermost), so that they see namespaced keys.
func Apply(s *gen.Services, prefix string) {
	if prefix == "" {
		return
	}
	s.KV = NewKV(s.KV, prefix)
	s.Watch = NewWatch(s.Watch, prefix)
	s.Lease = NewLease(s.Lease, prefix)
	s.Election = NewElection(s.Election, prefix)
	s.Lock = NewLock(s.Lock, prefix)
}

// Watch confines watches to the namespace: created ranges are prefixed, event keys stripped. Cancel and progress
// requests, and created, cancelled, compacted and progress responses, have no keys and pass as they are.
type Watch struct {
	pb.WatchServer
	ns prefix
}

// NewWatch wraps base in the namespace prefix.
func NewWatch(base pb.WatchServer, prefix string) *Watch {
	return &Watch{WatchServer: base, ns: newPrefix(prefix)}
}

// Watch serves one client stream through the wrapped server.
func (w *Watch) Watch(stream grpc.BidiStreamingServer[pb.WatchRequest, pb.WatchResponse]) error {
	return w.WatchServer.Watch(&watchStream{BidiStreamingServer: stream, ns: w.ns})
}

type watchStream struct {
	grpc.BidiStreamingServer[pb.WatchRequest, pb.WatchResponse]
	ns prefix
}

func (s *watchStream) Recv() (*pb.WatchRequest, error) {
	req, err := s.BidiStreamingServer.Recv()
	if err != nil {
		return req, err
	}
	if c := req.GetCreateRequest(); c != nil {
		c.Key, c.RangeEnd = s.ns.watchInterval(c.Key, c.RangeEnd)
	}
	return req, nil
}

func (s *watchStream) Send(resp *pb.WatchResponse) error {
	return s.BidiStreamingServer.Send(s.ns.watchResponse(resp))
}

func (n prefix) watchResponse(resp *pb.WatchResponse) *pb.WatchResponse {
	if len(resp.GetEvents()) == 0 {
		return resp
	}
	c := shallow(resp)
	c.Events = make([]*mvccpb.Event, len(resp.Events))
	for i, ev := range resp.Events {
		if ev != nil {
			e := shallow(ev)
			e.Kv, e.PrevKv = n.kv(ev.Kv), n.kv(ev.PrevKv)
			ev = e
		}
		c.Events[i] = ev
	}
	return c
}

// Lease confines the keys LeaseTimeToLive lists to the namespace. The other Lease RPCs have no keys.
type Lease struct {
	pb.LeaseServer
	ns prefix
}

// NewLease wraps base in the namespace prefix.
func NewLease(base pb.LeaseServer, prefix string) *Lease {
	return &Lease{LeaseServer: base, ns: newPrefix(prefix)}
}

// LeaseTimeToLive lists, with keys=true, the lease's keys in the namespace, stripped; keys outside it are left out.
func (l *Lease) LeaseTimeToLive(ctx context.Context, req *pb.LeaseTimeToLiveRequest) (*pb.LeaseTimeToLiveResponse, error) {
	resp, err := l.LeaseServer.LeaseTimeToLive(ctx, req)
	if err != nil || len(resp.GetKeys()) == 0 {
		return resp, err
	}
	c := shallow(resp)
	c.Keys = nil
	for _, k := range resp.Keys {
		if l.ns.inside(k) {
			c.Keys = append(c.Keys, l.ns.strip(k))
		}
	}
	return c, nil
}

// Election confines elections to the namespace: names and leader keys are prefixed, returned ones stripped.
type Election struct {
	v3electionpb.ElectionServer
	ns prefix
}

// NewElection wraps base in the namespace prefix.
func NewElection(base v3electionpb.ElectionServer, prefix string) *Election {
	return &Election{ElectionServer: base, ns: newPrefix(prefix)}
}

// Campaign prefixes the election's name and strips the leader key of the answer.
func (e *Election) Campaign(ctx context.Context, req *v3electionpb.CampaignRequest) (*v3electionpb.CampaignResponse, error) {
	req.Name = e.ns.name(req.Name)
	resp, err := e.ElectionServer.Campaign(ctx, req)
	if err != nil || resp.GetLeader() == nil {
		return resp, err
	}
	c := shallow(resp)
	c.Leader = e.ns.stripLeaderKey(resp.Leader)
	return c, nil
}

// Proclaim prefixes the leader key.
func (e *Election) Proclaim(ctx context.Context, req *v3electionpb.ProclaimRequest) (*v3electionpb.ProclaimResponse, error) {
	e.ns.leaderKey(req.Leader)
	return e.ElectionServer.Proclaim(ctx, req)
}

// Leader prefixes the election's name and strips the leader's key-value.
func (e *Election) Leader(ctx context.Context, req *v3electionpb.LeaderRequest) (*v3electionpb.LeaderResponse, error) {
	req.Name = e.ns.name(req.Name)
	resp, err := e.ElectionServer.Leader(ctx, req)
	if err != nil {
		return resp, err
	}
	return e.ns.leaderResponse(resp), nil
}

// Observe prefixes the election's name and strips every leader's key-value.
func (e *Election) Observe(req *v3electionpb.LeaderRequest, stream grpc.ServerStreamingServer[v3electionpb.LeaderResponse]) error {
	req.Name = e.ns.name(req.Name)
	return e.ElectionServer.Observe(req, &observeStream{ServerStreamingServer: stream, ns: e.ns})
}

type observeStream struct {
	grpc.ServerStreamingServer[v3electionpb.LeaderResponse]
	ns prefix
}

func (s *observeStream) Send(resp *v3electionpb.LeaderResponse) error {
	return s.ServerStreamingServer.Send(s.ns.leaderResponse(resp))
}

// Resign prefixes the leader key.
func (e *Election) Resign(ctx context.Context, req *v3electionpb.ResignRequest) (*v3electionpb.ResignResponse, error) {
	e.ns.leaderKey(req.Leader)
	return e.ElectionServer.Resign(ctx, req)
}

// leaderKey prefixes a client's leader key in place; nil (etcd's "no leader key given") stays nil.
func (n prefix) leaderKey(l *v3electionpb.LeaderKey) {
	if l != nil {
		l.Name, l.Key = n.name(l.Name), n.key(l.Key)
	}
}

func (n prefix) stripLeaderKey(l *v3electionpb.LeaderKey) *v3electionpb.LeaderKey {
	c := shallow(l)
	c.Name, c.Key = n.strip(l.Name), n.strip(l.Key)
	return c
}

func (n prefix) leaderResponse(r *v3electionpb.LeaderResponse) *v3electionpb.LeaderResponse {
	if r.GetKv() == nil {
		return r
	}
	c := shallow(r)
	c.Kv = n.kv(r.Kv)
	return c
}

// Lock confines locks to the namespace: names are prefixed, the lock key stripped, and prefixed again on Unlock.
type Lock struct {
	v3lockpb.LockServer
	ns prefix
}

// NewLock wraps base in the namespace prefix.
func NewLock(base v3lockpb.LockServer, prefix string) *Lock {
	return &Lock{LockServer: base, ns: newPrefix(prefix)}
}

// Lock prefixes the lock's name and strips the key of the answer.
func (l *Lock) Lock(ctx context.Context, req *v3lockpb.LockRequest) (*v3lockpb.LockResponse, error) {
	req.Name = l.ns.name(req.Name)
	resp, err := l.LockServer.Lock(ctx, req)
	if err != nil || len(resp.GetKey()) == 0 {
		return resp, err
	}
	c := shallow(resp)
	c.Key = l.ns.strip(resp.Key)
	return c, nil
}

// Unlock prefixes the lock key; the empty key stays empty (etcd refuses to delete it).
func (l *Lock) Unlock(ctx context.Context, req *v3lockpb.UnlockRequest) (*v3lockpb.UnlockResponse, error) {
	req.Key = l.ns.key(req.Key)
	return l.LockServer.Unlock(ctx, req)
}
