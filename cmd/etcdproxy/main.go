// Command etcdproxy is a gRPC proxy for etcd v3, a drop-in replacement for `etcd grpc-proxy start`.
//
//	etcdproxy start [flags]   serve the etcd v3 API, forwarding to --endpoints (or to an embedded etcd)
//	etcdproxy version         print versions
//
// It owns the command line: the flags (etcd grpc-proxy's names and defaults) turned into proxy.Config, the connections
// to etcd, the listeners, registration and the signals. What the proxy does with a call belongs to package proxy and
// the overrides; the command must not reach into them beyond proxy.Config.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

func main() {
	root := &cobra.Command{
		Use:           "etcdproxy",
		Short:         "A gRPC proxy for etcd v3: a drop-in replacement for `etcd grpc-proxy start`",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newStartCommand(), newVersionCommand())
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "etcdproxy:", err)
		os.Exit(1)
	}
}
