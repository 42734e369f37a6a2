package main

import (
	"path"
	"strings"

	"google.golang.org/protobuf/compiler/protogen"
)

// Every name the plugin derives lives here. The names of etcd's own generated identifiers follow
// protoc-gen-go-grpc's conventions; ours are chosen to read well at the call site (gen.NewKV, gen.NewServices).

const (
	grpcPackage    = protogen.GoImportPath("google.golang.org/grpc")
	contextPackage = protogen.GoImportPath("context")

	// aggregateFile, aggregateType and aggregateConstructor name the cross-file aggregate.
	aggregateFile        = "services.etcdproxy.go"
	aggregateType        = "Services"
	aggregateConstructor = "NewServices"
	aggregateRegister    = "Register"
)

// generatedFileName is the name of the file generated for the proto file f: "rpc.proto" gives "rpc.etcdproxy.go".
func generatedFileName(f *protogen.File) string {
	return strings.TrimSuffix(path.Base(f.Desc.Path()), ".proto") + ".etcdproxy.go"
}

// passthroughType is the name of the generated passthrough type of s, e.g. KV.
func passthroughType(s *protogen.Service) string { return s.GoName }

// passthroughConstructor is the name of the function that builds the passthrough of s, e.g. NewKV.
func passthroughConstructor(s *protogen.Service) string { return "New" + s.GoName }

// serverInterface is etcd's server interface of s, e.g. etcdserverpb.KVServer.
func serverInterface(s *protogen.Service, pkg protogen.GoImportPath) protogen.GoIdent {
	return pkg.Ident(s.GoName + "Server")
}

// unsafeServer is etcd's Unsafe<Svc>Server, embedded so that an RPC added upstream without regeneration is a
// compile error rather than a silent Unimplemented.
func unsafeServer(s *protogen.Service, pkg protogen.GoImportPath) protogen.GoIdent {
	return pkg.Ident("Unsafe" + s.GoName + "Server")
}

// clientInterface is etcd's typed client interface of s, e.g. etcdserverpb.KVClient.
func clientInterface(s *protogen.Service, pkg protogen.GoImportPath) protogen.GoIdent {
	return pkg.Ident(s.GoName + "Client")
}

// clientConstructor is etcd's constructor of the typed client of s, e.g. etcdserverpb.NewKVClient.
func clientConstructor(s *protogen.Service, pkg protogen.GoImportPath) protogen.GoIdent {
	return pkg.Ident("New" + s.GoName + "Client")
}

// registerFunc is etcd's function that registers a server of s, e.g. etcdserverpb.RegisterKVServer.
func registerFunc(s *protogen.Service, pkg protogen.GoImportPath) protogen.GoIdent {
	return pkg.Ident("Register" + s.GoName + "Server")
}

// aggregateField is the field of the aggregate that holds the server of s.
func aggregateField(s *protogen.Service) string { return s.GoName }
