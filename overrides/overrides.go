// Package overrides is the one composition point for hand-written overrides of the generated passthrough. An
// override wraps the service it replaces (embedding the server it is given, so a method it does not shadow falls
// through to the passthrough) and is wired here by one line.
package overrides

import (
	"github.com/etcdproxy/etcdproxy/gen"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Deps are the dependencies an override may take.
type Deps struct {
	// Upstream is the proxy's clientv3 connection to etcd.
	Upstream *clientv3.Client
	Logger   *zap.Logger
}

// Apply replaces services of s with their overrides, one line each, in the order they wrap.
func Apply(s *gen.Services, d Deps) {
	_, _ = s, d // No override yet: every RPC is the generated passthrough.
}
