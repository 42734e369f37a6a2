// Command etcdproxy is a gRPC proxy for etcd v3, a drop-in replacement for `etcd grpc-proxy start`.
//
//	etcdproxy start [flags]   serve the etcd v3 API, forwarding to --endpoints (or to an embedded etcd)
//	etcdproxy version         print versions
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
