package main

import (
	"fmt"
	"runtime"

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/api/v3/version"
)

// Version is etcdproxy's version.
const Version = "0.1.0-dev"

func newVersionCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print etcdproxy's version, the etcd API it proxies, and the Go version",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			fmt.Fprintf(cmd.OutOrStdout(), "etcdproxy version: %s\netcd API version: %s\nGo version: %s\n",
				Version, version.Version, runtime.Version())
		},
	}
}
