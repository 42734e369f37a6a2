// Command protoc-gen-etcdproxy is a protoc plugin that generates, for every gRPC service in its input, a passthrough
// server: a type that implements the service's server interface by forwarding each call to an upstream connection
// through the etcdproxy runtime (package forward). It also generates one aggregate that builds every service from
// one upstream connection and registers them all on a grpc.Server.
//
// Options (buf.gen.yaml `opt:` or protoc `--etcdproxy_opt=`):
//
//	package=IMPORT_PATH   Go import path of the generated package (required)
//	runtime=IMPORT_PATH   Go import path of the runtime package the generated code calls (required)
//
// It generates for every file to generate that declares a service; all services land in the one package named
// by `package`, so run it with buf's `strategy: all`.
//
// It owns the shape of gen/ (names, types, registration); what a forwarded call does at run time belongs to package
// forward, and must not be written into the generated code.
package main

import (
	"flag"
	"fmt"
	"os"

	"google.golang.org/protobuf/compiler/protogen"
)

// version is the plugin's version; it appears in every generated file.
const version = "v0.1.0"

func main() {
	if len(os.Args) == 2 && (os.Args[1] == "--version" || os.Args[1] == "-version") {
		fmt.Println("protoc-gen-etcdproxy", version)
		return
	}
	if len(os.Args) > 1 {
		fmt.Fprintln(os.Stderr, "protoc-gen-etcdproxy: a protoc plugin; run it from buf or protoc, not by hand (flags: --version)")
		os.Exit(2)
	}
	var flags flag.FlagSet
	cfg := registerFlags(&flags)
	protogen.Options{ParamFunc: flags.Set}.Run(func(p *protogen.Plugin) error {
		return generate(p, cfg)
	})
}

// Config holds the plugin's options.
type Config struct {
	// Package is the Go import path of the generated package.
	Package string
	// Runtime is the Go import path of the runtime package that generated methods call.
	Runtime string
}

func registerFlags(flags *flag.FlagSet) *Config {
	cfg := &Config{}
	flags.StringVar(&cfg.Package, "package", "", "Go import path of the generated package")
	flags.StringVar(&cfg.Runtime, "runtime", "", "Go import path of the runtime package the generated code calls")
	return cfg
}
