package namespace_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"reflect"
	"strings"
	"testing"

	"github.com/etcdproxy/etcdproxy/gen"
	_ "go.etcd.io/etcd/api/v3/etcdserverpb"
	_ "go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	_ "go.etcd.io/etcd/server/v3/etcdserver/api/v3lock/v3lockpb"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
)

// services maps each field of gen.Services to its gRPC service and the namespace type that decorates it ("" if
// none).
var services = map[string]struct{ service, decorator string }{
	"KV":          {"etcdserverpb.KV", "KV"},
	"Watch":       {"etcdserverpb.Watch", "Watch"},
	"Lease":       {"etcdserverpb.Lease", "Lease"},
	"Cluster":     {"etcdserverpb.Cluster", ""},
	"Maintenance": {"etcdserverpb.Maintenance", ""},
	"Auth":        {"etcdserverpb.Auth", ""},
	"Election":    {"v3electionpb.Election", "Election"},
	"Lock":        {"v3lockpb.Lock", "Lock"},
}

// notNamespaced are the RPCs whose messages name keys and that the namespace leaves as they are, with why.
var notNamespaced = map[string]string{
	"etcdserverpb.Auth.RoleGrantPermission":  "permissions are administered on etcd's real keys, as with etcd's grpc-proxy",
	"etcdserverpb.Auth.RoleRevokePermission": "permissions are administered on etcd's real keys, as with etcd's grpc-proxy",
	"etcdserverpb.Auth.RoleGet":              "permissions are administered on etcd's real keys, as with etcd's grpc-proxy",
}

// keyFields are the names of bytes fields that hold keys (or, for Election and Lock, names keys are made of).
var keyFields = map[protoreflect.Name]bool{"key": true, "range_end": true, "keys": true, "name": true}

// carriesKeys reports whether a message, or one it holds, has a key field or a key-value.
func carriesKeys(md protoreflect.MessageDescriptor, seen map[protoreflect.FullName]bool) bool {
	if md.FullName() == "mvccpb.KeyValue" {
		return true
	}
	if seen[md.FullName()] {
		return false
	}
	seen[md.FullName()] = true
	fields := md.Fields()
	for i := 0; i < fields.Len(); i++ {
		fd := fields.Get(i)
		if fd.Kind() == protoreflect.BytesKind && keyFields[fd.Name()] {
			return true
		}
		if fd.Message() != nil && carriesKeys(fd.Message(), seen) {
			return true
		}
	}
	return false
}

// declared lists the methods the package's own (non-test) files declare, as "Type.Method".
func declared(t *testing.T) map[string]bool {
	t.Helper()
	pkgs, err := parser.ParseDir(token.NewFileSet(), ".", func(fi fs.FileInfo) bool {
		return !strings.HasSuffix(fi.Name(), "_test.go")
	}, 0)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, p := range pkgs {
		for _, f := range p.Files {
			for _, d := range f.Decls {
				fd, ok := d.(*ast.FuncDecl)
				if !ok || fd.Recv == nil || !fd.Name.IsExported() {
					continue
				}
				typ := fd.Recv.List[0].Type
				if s, ok := typ.(*ast.StarExpr); ok {
					typ = s.X
				}
				if id, ok := typ.(*ast.Ident); ok {
					out[id.Name+"."+fd.Name.Name] = true
				}
			}
		}
	}
	return out
}

// TestEveryKeyedMethodReviewed: every RPC of every service the proxy serves whose request or response carries
// keys (a key, range end, name or key list field, or a key-value, at any depth) is decorated by the namespace or
// listed in notNamespaced with a reason. A new etcd RPC with keys, or a new key field in an old one, fails here
// until it is handled.
func TestEveryKeyedMethodReviewed(t *testing.T) {
	decl := declared(t)
	st := reflect.TypeOf(gen.Services{})
	for i := 0; i < st.NumField(); i++ {
		field := st.Field(i).Name
		svc, ok := services[field]
		if !ok {
			t.Errorf("gen.Services.%s: a service this test does not know; add it to services", field)
			continue
		}
		d, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName(svc.service))
		if err != nil {
			t.Fatalf("%s: %v", svc.service, err)
		}
		methods := d.(protoreflect.ServiceDescriptor).Methods()
		for j := 0; j < methods.Len(); j++ {
			m := methods.Get(j)
			full := svc.service + "." + string(m.Name())
			keyed := carriesKeys(m.Input(), map[protoreflect.FullName]bool{}) ||
				carriesKeys(m.Output(), map[protoreflect.FullName]bool{})
			handled := svc.decorator != "" && decl[svc.decorator+"."+string(m.Name())]
			_, listed := notNamespaced[full]
			switch {
			case keyed && !handled && !listed:
				t.Errorf("%s carries keys and the namespace does not handle it: decorate it in overrides/namespace "+
					"or list it in notNamespaced with a reason", full)
			case listed && (handled || !keyed):
				t.Errorf("%s is listed in notNamespaced but is handled or carries no keys", full)
			}
		}
	}
	for full := range notNamespaced {
		if _, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName(full)); err != nil {
			t.Errorf("notNamespaced lists %s, which is no RPC: %v", full, err)
		}
	}
}
