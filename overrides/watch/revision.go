package watch

import (
	"context"
	"sync"
	"time"

	"github.com/etcdproxy/etcdproxy/overrides/internal/upstream"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
)

// revisions answers "what is etcd's current revision?" with a header etcd filled, for the created and cancel
// responses the proxy writes itself (etcd puts its current revision there). It asks Maintenance.Status, which etcd
// serves to any authenticated caller (no key permission needed), with the credentials of the hub it belongs to.
//
// Requests are batched without delaying anyone: while one Status call is in flight, callers that arrive join the
// next round, which starts when the in-flight one ends. A caller is only ever answered by a round that started
// after it asked, so the revision is at least that of every write acknowledged before it asked.
type revisions struct {
	status func(context.Context, *pb.StatusRequest, ...grpc.CallOption) (*pb.StatusResponse, error)
	creds  upstream.Creds // the hub's

	// mu protects inflight and next.
	mu       sync.Mutex
	inflight bool
	next     *round // the round callers join; it has not started
}

// statusTimeout bounds one Status call; callers' own contexts bound their wait.
const statusTimeout = 10 * time.Second

type round struct {
	done chan struct{}
	hdr  *pb.ResponseHeader
	err  error
}

func newRevisions(cc grpc.ClientConnInterface, c upstream.Creds) *revisions {
	return &revisions{status: pb.NewMaintenanceClient(cc).Status, creds: c}
}

// current returns a header whose revision is etcd's current revision, read after the call began.
func (r *revisions) current(ctx context.Context) (*pb.ResponseHeader, error) {
	r.mu.Lock()
	rd := r.next
	if rd == nil {
		rd = &round{done: make(chan struct{})}
		r.next = rd
	}
	lead := !r.inflight
	if lead {
		r.inflight, r.next = true, nil
	}
	r.mu.Unlock()
	if lead {
		r.run(rd)
	}
	select {
	case <-rd.done:
		return rd.hdr, rd.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// run performs round rd, then starts the round that filled up meanwhile, if any.
func (r *revisions) run(rd *round) {
	ctx, cancel := context.WithTimeout(r.creds.Outgoing(context.Background(), false), statusTimeout)
	resp, err := r.status(ctx, &pb.StatusRequest{})
	cancel()
	if err == nil {
		rd.hdr = resp.Header
	}
	rd.err = err
	close(rd.done)
	r.mu.Lock()
	next := r.next
	r.next = nil
	r.inflight = next != nil
	r.mu.Unlock()
	if next != nil {
		go r.run(next)
	}
}
