package kvcache

import (
	"context"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Permissions change outside the keyspace, so the invalidation watch does not see them, yet a cached answer must
// never outlive the caller's right to read it. Two mechanisms bound that:
//   - an auth change made through this proxy flushes the cache before the call returns (Auth);
//   - an auth change made anywhere moves etcd's auth revision, which authWatch reads every Options.AuthPoll (1 s)
//     and flushes the cache on when it moved (so a permission revoked elsewhere stops being served within that
//     plus the time etcd takes to answer: authPollTimeout at most). AuthStatus goes through raft: one entry a second per proxy, which a fleet of idle proxies would keep
//     writing forever. So the poll stops once no cacheable read has come for authIdlePolls polls.
//
// The cache serves and stores only while the auth revision is followed (authKnown): from the first poll on, and
// again from the first poll after a failed one or after an idle stop. Going from followed to not flushes it (so
// nothing filled before is served after), and nothing is stored while not followed, so when the poll starts over
// there is nothing to vouch for. Cacheable reads while not followed go to etcd, and start the poll again.

// authIdlePolls is how many polls in a row without a cacheable read stop the poll (unless the last poll failed:
// then it goes on until one succeeds, so that the proxy knows, and says (Live), whether it can read the revision).
const authIdlePolls = 10

// authPollTimeout is the least time a poll may take before it counts as failed (flushing the cache). AuthStatus
// is a raft round trip: on a loaded cluster it can take longer than a short poll period, and a timeout as short as
// the period would flush the cache again and again exactly when etcd most needs the load taken off it. So a
// permission revoked elsewhere stops being served within the poll period plus the time etcd takes to answer, at
// most this.
const authPollTimeout = 3 * time.Second

// authWatch flushes the cache whenever etcd's auth revision changes, or when it cannot be read (the cache cannot
// vouch for entries then), until ctx ends.
func (k *KV) authWatch(ctx context.Context, cc grpc.ClientConnInterface, done chan<- struct{}) {
	defer close(done)
	auth := pb.NewAuthClient(cc)
	var last uint64 // the auth revision the cache's entries are vouched for at, while k.authKnown
	unknown := func(why string) {
		if k.authKnown.Swap(false) {
			k.watch.flush(why)
		}
	}
	idle := 0 // polls in a row with no cacheable read
	poll := k.opts.AuthPoll
	t := time.NewTicker(poll)
	defer t.Stop()
	for first := true; ; first = false {
		if !first {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if k.read.Swap(false) {
				idle = 0
			} else if idle++; idle >= authIdlePolls && !k.authFailing.Load() {
				unknown("no cacheable read for a while: etcd's auth revision is no longer followed")
				continue
			}
		}
		cctx, cancel := context.WithTimeout(ctx, max(poll, authPollTimeout))
		resp, err := auth.AuthStatus(cctx, &pb.AuthStatusRequest{})
		cancel()
		authPolls.Inc()
		switch {
		case err != nil:
			if ctx.Err() == nil {
				k.logger.Debug("cannot read etcd's auth revision; the read cache serves nothing until it can",
					zap.Error(err))
				unknown("the auth revision could not be read")
				k.authFailing.Store(true)
			}
		case !k.authKnown.Load():
			k.authFailing.Store(false)
			last = resp.AuthRevision
			k.authKnown.Store(true)
		case resp.AuthRevision != last:
			k.watch.flush("etcd's auth revision changed")
			last = resp.AuthRevision
		}
	}
}

// Auth flushes the cache after every Auth RPC that changes what a read may return, made through this proxy: every
// one but Authenticate, AuthStatus and the Get/List calls (TestEveryAuthChangeFlushes). Granting a permission can
// take a right away (it replaces the permission on the same range, READ by WRITE), and with JWT tokens any change
// of the auth revision invalidates every token issued before it.
type Auth struct {
	pb.AuthServer
	kv *KV
}

// NewAuth wraps base; kv is the cache to flush.
func NewAuth(base pb.AuthServer, kv *KV) *Auth { return &Auth{AuthServer: base, kv: kv} }

// changed flushes the cache unless etcd refused the change for sure (an error that does not leave its outcome open:
// a timeout or a lost connection may still have applied it). Deferred, so that a panic flushes too.
func (a *Auth) changed(err *error) {
	switch status.Code(*err) {
	case codes.InvalidArgument, codes.PermissionDenied, codes.FailedPrecondition, codes.NotFound,
		codes.AlreadyExists, codes.Unauthenticated, codes.Unimplemented, codes.OutOfRange:
		return
	}
	a.kv.watch.flush("an auth change went through the proxy")
}

// AuthEnable forwards the call, then flushes the cache.
func (a *Auth) AuthEnable(ctx context.Context, r *pb.AuthEnableRequest) (resp *pb.AuthEnableResponse, err error) {
	defer a.changed(&err)
	return a.AuthServer.AuthEnable(ctx, r)
}

// AuthDisable forwards the call, then flushes the cache.
func (a *Auth) AuthDisable(ctx context.Context, r *pb.AuthDisableRequest) (resp *pb.AuthDisableResponse, err error) {
	defer a.changed(&err)
	return a.AuthServer.AuthDisable(ctx, r)
}

// UserAdd forwards the call, then flushes the cache.
func (a *Auth) UserAdd(ctx context.Context, r *pb.AuthUserAddRequest) (resp *pb.AuthUserAddResponse, err error) {
	defer a.changed(&err)
	return a.AuthServer.UserAdd(ctx, r)
}

// UserDelete forwards the call, then flushes the cache.
func (a *Auth) UserDelete(ctx context.Context, r *pb.AuthUserDeleteRequest) (resp *pb.AuthUserDeleteResponse, err error) {
	defer a.changed(&err)
	return a.AuthServer.UserDelete(ctx, r)
}

// UserChangePassword forwards the call, then flushes the cache.
func (a *Auth) UserChangePassword(ctx context.Context, r *pb.AuthUserChangePasswordRequest) (resp *pb.AuthUserChangePasswordResponse, err error) {
	defer a.changed(&err)
	return a.AuthServer.UserChangePassword(ctx, r)
}

// UserGrantRole forwards the call, then flushes the cache.
func (a *Auth) UserGrantRole(ctx context.Context, r *pb.AuthUserGrantRoleRequest) (resp *pb.AuthUserGrantRoleResponse, err error) {
	defer a.changed(&err)
	return a.AuthServer.UserGrantRole(ctx, r)
}

// UserRevokeRole forwards the call, then flushes the cache.
func (a *Auth) UserRevokeRole(ctx context.Context, r *pb.AuthUserRevokeRoleRequest) (resp *pb.AuthUserRevokeRoleResponse, err error) {
	defer a.changed(&err)
	return a.AuthServer.UserRevokeRole(ctx, r)
}

// RoleAdd forwards the call, then flushes the cache.
func (a *Auth) RoleAdd(ctx context.Context, r *pb.AuthRoleAddRequest) (resp *pb.AuthRoleAddResponse, err error) {
	defer a.changed(&err)
	return a.AuthServer.RoleAdd(ctx, r)
}

// RoleDelete forwards the call, then flushes the cache.
func (a *Auth) RoleDelete(ctx context.Context, r *pb.AuthRoleDeleteRequest) (resp *pb.AuthRoleDeleteResponse, err error) {
	defer a.changed(&err)
	return a.AuthServer.RoleDelete(ctx, r)
}

// RoleGrantPermission forwards the call, then flushes the cache.
func (a *Auth) RoleGrantPermission(ctx context.Context, r *pb.AuthRoleGrantPermissionRequest) (resp *pb.AuthRoleGrantPermissionResponse, err error) {
	defer a.changed(&err)
	return a.AuthServer.RoleGrantPermission(ctx, r)
}

// RoleRevokePermission forwards the call, then flushes the cache.
func (a *Auth) RoleRevokePermission(ctx context.Context, r *pb.AuthRoleRevokePermissionRequest) (resp *pb.AuthRoleRevokePermissionResponse, err error) {
	defer a.changed(&err)
	return a.AuthServer.RoleRevokePermission(ctx, r)
}
