// Command etcdapi writes the descriptors of the etcd API pinned in go.mod as a buf image, the input of
// `make generate`, and lists the RPCs it declares.
//
//	etcdapi -image FILE   write the image (etcd's files renamed to their import paths, imports marked)
//	etcdapi -rpcs         list every RPC: service, method and streaming shape
//
// It only reads the pinned descriptors (internal/etcdapi) and writes the one file it is given: gen/ is written by `make
// generate` (buf and protoc-gen-etcdproxy), never by it.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/etcdproxy/etcdproxy/internal/etcdapi"
	"google.golang.org/protobuf/reflect/protoreflect"
)

func main() {
	image := flag.String("image", "", "write the etcd API as a buf image to this file")
	rpcs := flag.Bool("rpcs", false, "list every RPC of the etcd API")
	flag.Usage = func() {
		fmt.Fprintln(flag.CommandLine.Output(), "usage: etcdapi -image FILE | -rpcs")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() > 0 || (*image == "" && !*rpcs) {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*image, *rpcs); err != nil {
		fmt.Fprintln(os.Stderr, "etcdapi:", err)
		os.Exit(1)
	}
}

func run(image string, rpcs bool) error {
	if rpcs {
		for _, r := range etcdapi.Roots() {
			services := r.File.Services()
			for i := 0; i < services.Len(); i++ {
				methods := services.Get(i).Methods()
				for j := 0; j < methods.Len(); j++ {
					fmt.Printf("%s %s\n", methods.Get(j).FullName(), shape(methods.Get(j)))
				}
			}
		}
	}
	if image == "" {
		return nil
	}
	set, err := etcdapi.Files()
	if err != nil {
		return err
	}
	b, err := etcdapi.Image(set)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(image), 0o755); err != nil {
		return err
	}
	return os.WriteFile(image, b, 0o644)
}

func shape(m protoreflect.MethodDescriptor) string {
	switch {
	case m.IsStreamingClient() && m.IsStreamingServer():
		return "bidi"
	case m.IsStreamingClient():
		return "client-streaming"
	case m.IsStreamingServer():
		return "server-streaming"
	default:
		return "unary"
	}
}
