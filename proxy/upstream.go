package proxy

import (
	"math"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Dial opens the upstream connection with the settings a transparent proxy needs, on top of cfg:
//
//   - clientv3's interceptor chain stays as it is (auth token refresh for the proxy's own credentials, API
//     version, backoff), but a unary call is attempted once (MaxUnaryRetries 1): the client behind the proxy
//     retries as it would against etcd, so a failure is not retried twice over and an error such as an invalid
//     auth token reaches the client at once instead of after up to 100 hidden retries.
//   - Message size limits default to math.MaxInt32 on both directions, so etcd's own limits decide and an
//     oversized request gets etcd's own error.
//   - Without a Logger, the client logs nothing: an etcd error on a client's request is the client's to see, not
//     a line in the proxy's log for every failed call.
func Dial(cfg clientv3.Config) (*clientv3.Client, error) {
	cfg.MaxUnaryRetries = 1
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.MaxCallSendMsgSize <= 0 {
		cfg.MaxCallSendMsgSize = math.MaxInt32
	}
	if cfg.MaxCallRecvMsgSize <= 0 {
		cfg.MaxCallRecvMsgSize = math.MaxInt32
	}
	return clientv3.New(cfg)
}
