package proxy

import (
	"context"
	"slices"
	"testing"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/api/v3/version"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/metadata"
)

// TestClientAPIVersion: etcd sees the client's own client-api-version (or none), not the one clientv3 stamps on
// the proxy's upstream calls; the proxy's own calls keep clientv3's.
func TestClientAPIVersion(t *testing.T) {
	key := rpctypes.MetadataClientAPIVersionKey
	stamped := func(in metadata.MD) context.Context {
		ctx := context.Background()
		if in != nil {
			ctx = metadata.NewIncomingContext(ctx, in)
		}
		return metadata.NewOutgoingContext(ctx, metadata.Pairs(key, version.APIVersion, "token", "t"))
	}
	for _, tc := range []struct {
		name string
		in   metadata.MD
		want []string
	}{
		{"an older client", metadata.Pairs(key, "3.5"), []string{"3.5"}},
		{"a client of the same version", metadata.Pairs(key, version.APIVersion), []string{version.APIVersion}},
		{"a client that sends none", metadata.Pairs("token", "t"), nil},
		{"the proxy's own call", nil, []string{version.APIVersion}},
	} {
		out, _ := metadata.FromOutgoingContext(clientAPIVersion(stamped(tc.in)))
		if got := out.Get(key); !slices.Equal(got, tc.want) {
			t.Errorf("%s: etcd would see %q, want %q", tc.name, got, tc.want)
		}
		if got := out.Get("token"); len(got) != 1 {
			t.Errorf("%s: other metadata lost: %v", tc.name, out)
		}
	}
}

// TestDialRecvLimitAlone: a receive limit without a send limit (etcdproxy start --max-recv-bytes=N, --max-send-bytes
// left at 0) is a valid configuration; clientv3 used to refuse it, the proxy's "no send limit" being above N.
func TestDialRecvLimitAlone(t *testing.T) {
	c, err := Dial(clientv3.Config{Endpoints: []string{"127.0.0.1:1"}, MaxCallRecvMsgSize: 3 << 20})
	if err != nil {
		t.Fatalf("Dial with only a receive limit: %v", err)
	}
	c.Close()
	if _, err := Dial(clientv3.Config{Endpoints: []string{"127.0.0.1:1"}, MaxCallSendMsgSize: 4 << 20,
		MaxCallRecvMsgSize: 3 << 20}); err == nil {
		t.Error("Dial with a send limit above the receive limit: no error (clientv3, and etcd grpc-proxy, refuse it)")
	}
}
