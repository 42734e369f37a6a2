package kvcache

import (
	"context"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// Permissions change outside the keyspace, so the invalidation watch does not see them, yet a cached answer must
// never outlive the caller's right to read it. Two mechanisms bound that:
//   - an auth change made through this proxy flushes the cache before the call returns (Auth);
//   - an auth change made anywhere moves etcd's auth revision, which authWatch reads every Options.AuthPoll (1 s)
//     and flushes the cache on when it moved (so a permission revoked elsewhere stops being served within about
//     that). AuthStatus goes through raft: one entry a second per proxy, a negligible load, but one that etcd's
//     Status (raft index) shows.

// authWatch flushes the cache whenever etcd's auth revision changes, or when it cannot be read (the cache cannot
// vouch for entries then), until ctx ends.
func (k *KV) authWatch(ctx context.Context, cc grpc.ClientConnInterface, done chan<- struct{}) {
	defer close(done)
	auth := pb.NewAuthClient(cc)
	var last uint64
	known := false
	poll := k.opts.AuthPoll
	t := time.NewTicker(poll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cctx, cancel := context.WithTimeout(ctx, poll)
		resp, err := auth.AuthStatus(cctx, &pb.AuthStatusRequest{})
		cancel()
		switch {
		case err != nil:
			if ctx.Err() == nil {
				k.logger.Debug("cannot read etcd's auth revision; flushing the read cache", zap.Error(err))
				k.watch.flush("the auth revision could not be read")
			}
			known = false
		case known && resp.AuthRevision != last:
			k.watch.flush("etcd's auth revision changed")
			last = resp.AuthRevision
		default:
			last, known = resp.AuthRevision, true
		}
	}
}

// Auth flushes the cache after every auth change made through this proxy.
type Auth struct {
	pb.AuthServer
	kv *KV
}

// NewAuth wraps base; kv is the cache to flush.
func NewAuth(base pb.AuthServer, kv *KV) *Auth { return &Auth{AuthServer: base, kv: kv} }

func (a *Auth) changed(err error) {
	if err == nil {
		a.kv.watch.flush("an auth change went through the proxy")
	}
}

// AuthEnable forwards the call, then flushes the cache.
func (a *Auth) AuthEnable(ctx context.Context, r *pb.AuthEnableRequest) (*pb.AuthEnableResponse, error) {
	resp, err := a.AuthServer.AuthEnable(ctx, r)
	a.changed(err)
	return resp, err
}

// AuthDisable forwards the call, then flushes the cache.
func (a *Auth) AuthDisable(ctx context.Context, r *pb.AuthDisableRequest) (*pb.AuthDisableResponse, error) {
	resp, err := a.AuthServer.AuthDisable(ctx, r)
	a.changed(err)
	return resp, err
}

// UserDelete forwards the call, then flushes the cache.
func (a *Auth) UserDelete(ctx context.Context, r *pb.AuthUserDeleteRequest) (*pb.AuthUserDeleteResponse, error) {
	resp, err := a.AuthServer.UserDelete(ctx, r)
	a.changed(err)
	return resp, err
}

// UserChangePassword forwards the call, then flushes the cache.
func (a *Auth) UserChangePassword(ctx context.Context, r *pb.AuthUserChangePasswordRequest) (*pb.AuthUserChangePasswordResponse, error) {
	resp, err := a.AuthServer.UserChangePassword(ctx, r)
	a.changed(err)
	return resp, err
}

// UserRevokeRole forwards the call, then flushes the cache.
func (a *Auth) UserRevokeRole(ctx context.Context, r *pb.AuthUserRevokeRoleRequest) (*pb.AuthUserRevokeRoleResponse, error) {
	resp, err := a.AuthServer.UserRevokeRole(ctx, r)
	a.changed(err)
	return resp, err
}

// RoleDelete forwards the call, then flushes the cache.
func (a *Auth) RoleDelete(ctx context.Context, r *pb.AuthRoleDeleteRequest) (*pb.AuthRoleDeleteResponse, error) {
	resp, err := a.AuthServer.RoleDelete(ctx, r)
	a.changed(err)
	return resp, err
}

// RoleRevokePermission forwards the call, then flushes the cache.
func (a *Auth) RoleRevokePermission(ctx context.Context, r *pb.AuthRoleRevokePermissionRequest) (*pb.AuthRoleRevokePermissionResponse, error) {
	resp, err := a.AuthServer.RoleRevokePermission(ctx, r)
	a.changed(err)
	return resp, err
}
