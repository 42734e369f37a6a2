// Package crashguard refuses the requests that would take an etcd member down instead of getting an answer: a
// client of the proxy must not be able to crash a member of the cluster behind it. It replaces Maintenance.Alarm
// and nothing else; every refusal names what etcd does with the request.
//
// Known today (etcd v3.7.3): an Alarm whose action is not GET, ACTIVATE or DEACTIVATE. etcd applies it through
// raft, its applier answers nil for an action it does not know, and the gRPC handler dereferences that answer: the
// member that served the call panics and its process exits (found by FuzzUnary, internal/fuzz).
//
// It must not change what etcd answers to any request it lets through.
package crashguard

import (
	"context"
	"fmt"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Maintenance is the Maintenance service with the crashing Alarm requests refused.
type Maintenance struct {
	pb.MaintenanceServer
}

// New wraps next.
func New(next pb.MaintenanceServer) *Maintenance { return &Maintenance{MaintenanceServer: next} }

// Alarm refuses an action etcd does not know, with InvalidArgument, and forwards the others.
func (m *Maintenance) Alarm(ctx context.Context, r *pb.AlarmRequest) (*pb.AlarmResponse, error) {
	switch r.Action {
	case pb.AlarmRequest_GET, pb.AlarmRequest_ACTIVATE, pb.AlarmRequest_DEACTIVATE:
		return m.MaintenanceServer.Alarm(ctx, r)
	}
	return nil, status.Error(codes.InvalidArgument, fmt.Sprintf("etcdproxy: unknown alarm action %d "+
		"(etcd knows GET, ACTIVATE and DEACTIVATE; etcd v3.7.3 crashes the member that serves any other)", r.Action))
}
