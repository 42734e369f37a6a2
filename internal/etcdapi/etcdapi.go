// Package etcdapi gives the descriptors of etcd's gRPC API exactly as compiled into the etcd Go packages pinned in
// go.mod (etcdserverpb, v3electionpb, v3lockpb), with everything they import. It is the generator's only input:
// no .proto file is copied into this repository, and nothing is fetched.
//
// etcd registers its files under bare names ("rpc.proto", "kv.proto") while their import lists say
// "etcd/api/mvccpb/kv.proto". Files() renames every file to the path its importers use (roots, which nobody
// imports, to their path in etcd's repository), and then checks that the result links: every import names a file
// of the set and every type reference resolves.
//
// It reads only what is compiled in, and must not depend on any package of the proxy: the generator, cmd/etcdapi and
// the tests that enumerate the API use it.
package etcdapi

import (
	"fmt"
	"path"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3lock/v3lockpb"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
)

// Root is a file that declares services to proxy, with the path it has in etcd's repository.
type Root struct {
	File protoreflect.FileDescriptor
	Path string
}

// Roots are the files whose services etcdproxy proxies.
func Roots() []Root {
	return []Root{
		{etcdserverpb.File_rpc_proto, "etcd/api/etcdserverpb/rpc.proto"},
		{v3electionpb.File_v3election_proto, "etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto"},
		{v3lockpb.File_v3lock_proto, "etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto"},
	}
}

// Files returns the roots and every file they import, transitively, renamed to their import paths, dependencies
// before dependents. The returned set links (protodesc.NewFiles accepts it).
func Files() (*descriptorpb.FileDescriptorSet, error) {
	c := collector{names: map[string]string{}, done: map[string]bool{}}
	for _, r := range Roots() {
		if err := c.name(r.File, r.Path); err != nil {
			return nil, err
		}
	}
	for _, r := range Roots() {
		if err := c.visit(r.File); err != nil {
			return nil, err
		}
	}
	set := &descriptorpb.FileDescriptorSet{File: c.files}
	if _, err := protodesc.NewFiles(set); err != nil {
		return nil, fmt.Errorf("etcd API descriptors do not link after renaming: %w", err)
	}
	return set, nil
}

// RootPaths returns the paths of the roots within the set Files returns.
func RootPaths() []string {
	var paths []string
	for _, r := range Roots() {
		paths = append(paths, r.Path)
	}
	return paths
}

type collector struct {
	names map[string]string // registered path -> path within the set
	done  map[string]bool   // registered paths already emitted
	files []*descriptorpb.FileDescriptorProto
}

// name records that the file registered as fd.Path() is called p in the set.
func (c *collector) name(fd protoreflect.FileDescriptor, p string) error {
	if prev, ok := c.names[fd.Path()]; ok && prev != p {
		return fmt.Errorf("%s is imported both as %s and as %s", fd.Path(), prev, p)
	}
	c.names[fd.Path()] = p
	return nil
}

// visit emits fd after everything it imports.
func (c *collector) visit(fd protoreflect.FileDescriptor) error {
	if c.done[fd.Path()] {
		return nil
	}
	c.done[fd.Path()] = true
	imports := fd.Imports()
	for i := 0; i < imports.Len(); i++ {
		imp, err := resolve(imports.Get(i).FileDescriptor)
		if err != nil {
			return fmt.Errorf("%s: %w", fd.Path(), err)
		}
		if err := c.name(imp, imports.Get(i).Path()); err != nil {
			return err
		}
		if err := c.visit(imp); err != nil {
			return err
		}
	}
	fdp := protodesc.ToFileDescriptorProto(fd)
	if p, ok := c.names[fd.Path()]; ok {
		fdp.Name = &p
	}
	c.files = append(c.files, fdp)
	return nil
}

// resolve returns the registered file behind an import. An import whose path is not registered (etcd's
// "etcd/api/mvccpb/kv.proto") is a placeholder: the file is registered under its base name ("kv.proto").
func resolve(imp protoreflect.FileDescriptor) (protoreflect.FileDescriptor, error) {
	if !imp.IsPlaceholder() {
		return imp, nil
	}
	if fd, err := protoregistry.GlobalFiles.FindFileByPath(imp.Path()); err == nil {
		return fd, nil
	}
	fd, err := protoregistry.GlobalFiles.FindFileByPath(path.Base(imp.Path()))
	if err != nil {
		return nil, fmt.Errorf("import %s is registered neither under that path nor as %s", imp.Path(), path.Base(imp.Path()))
	}
	return fd, nil
}

// bufImportField is the field number of buf's ImageFileExtension within an image file (buf.alpha.image.v1); its
// field 1 (is_import) marks a file that is present only because another file imports it.
const bufImportField = 8042

// Image encodes set as a buf image: a FileDescriptorSet in which every file that is not a root is marked as an
// import, so that `buf generate` asks plugins to generate for the roots only.
func Image(set *descriptorpb.FileDescriptorSet) ([]byte, error) {
	roots := map[string]bool{}
	for _, p := range RootPaths() {
		roots[p] = true
	}
	out := &descriptorpb.FileDescriptorSet{}
	for _, f := range set.File {
		f = proto.Clone(f).(*descriptorpb.FileDescriptorProto)
		if !roots[f.GetName()] {
			var ext []byte
			ext = protowire.AppendTag(ext, 1, protowire.VarintType)
			ext = protowire.AppendVarint(ext, 1)
			unknown := f.ProtoReflect().GetUnknown()
			unknown = protowire.AppendTag(unknown, bufImportField, protowire.BytesType)
			unknown = protowire.AppendBytes(unknown, ext)
			f.ProtoReflect().SetUnknown(unknown)
		}
		out.File = append(out.File, f)
	}
	return proto.MarshalOptions{Deterministic: true}.Marshal(out)
}
