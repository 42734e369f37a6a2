package upstream

import (
	"context"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc/metadata"
)

// Creds are the credentials etcd checks a call against: the auth token and the authorization metadata. Clients
// with equal Creds may share an upstream stream; etcd checks what travels on it against those credentials. The
// zero Creds are the proxy's own calls': their connection carries the proxy's credentials, if it has any.
type Creds struct {
	Token, Authorization string
}

// CredsOf returns the credentials of the client call whose server context is ctx.
func CredsOf(ctx context.Context) Creds {
	// Two lookups rather than metadata.FromIncomingContext, which copies every key: this runs on every cache hit.
	first := func(k string) string {
		if v := metadata.ValueFromIncomingContext(ctx, k); len(v) > 0 {
			return v[0]
		}
		return ""
	}
	return Creds{Token: first(rpctypes.TokenFieldNameGRPC), Authorization: first("authorization")}
}

// Outgoing returns ctx with the outgoing metadata of an upstream call made on behalf of c: c's credentials and,
// if requireLeader, etcd's require-leader key (hasleader=true), with which a member that loses the cluster ends
// the stream (and refuses to open it) instead of serving it from a store that may be stale. Every long-lived
// upstream stream of the overrides is opened with it; it replaces what ctx carried out.
func (c Creds) Outgoing(ctx context.Context, requireLeader bool) context.Context {
	md := metadata.MD{}
	if c.Token != "" {
		md.Set(rpctypes.TokenFieldNameGRPC, c.Token)
	}
	if c.Authorization != "" {
		md.Set("authorization", c.Authorization)
	}
	if requireLeader {
		md.Set(rpctypes.MetadataRequireLeaderKey, rpctypes.MetadataHasLeader)
	}
	return metadata.NewOutgoingContext(ctx, md)
}
