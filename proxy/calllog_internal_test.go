package proxy

import (
	"strings"
	"testing"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
	"google.golang.org/protobuf/types/known/anypb"
)

// TestRedactedShapes: secrets are redacted in every shape a message can hold them (a field, a list, a map's
// values, a nested message reached through a cycle, an Any), and the message logged is a copy.
func TestRedactedShapes(t *testing.T) {
	// message T { repeated string passwords = 1; map<string, bytes> token = 2; google.protobuf.Any any = 3;
	//             T child = 4; string name = 5; }
	opt := func(l descriptorpb.FieldDescriptorProto_Label, ty descriptorpb.FieldDescriptorProto_Type, name string,
		n int32, typeName string) *descriptorpb.FieldDescriptorProto {
		f := &descriptorpb.FieldDescriptorProto{Name: proto.String(name), Number: proto.Int32(n), Label: l.Enum(), Type: ty.Enum()}
		if typeName != "" {
			f.TypeName = proto.String(typeName)
		}
		return f
	}
	rep, optl := descriptorpb.FieldDescriptorProto_LABEL_REPEATED, descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL
	str, byt, msg := descriptorpb.FieldDescriptorProto_TYPE_STRING, descriptorpb.FieldDescriptorProto_TYPE_BYTES,
		descriptorpb.FieldDescriptorProto_TYPE_MESSAGE
	fdp := &descriptorpb.FileDescriptorProto{
		Name: proto.String("redact_test.proto"), Package: proto.String("redacttest"), Syntax: proto.String("proto3"),
		Dependency: []string{"google/protobuf/any.proto"},
		MessageType: []*descriptorpb.DescriptorProto{{
			Name: proto.String("T"),
			Field: []*descriptorpb.FieldDescriptorProto{
				opt(rep, str, "passwords", 1, ""),
				opt(rep, msg, "token", 2, ".redacttest.T.TokenEntry"),
				opt(optl, msg, "any", 3, ".google.protobuf.Any"),
				opt(optl, msg, "child", 4, ".redacttest.T"),
				opt(optl, str, "name", 5, ""),
			},
			NestedType: []*descriptorpb.DescriptorProto{{
				Name:    proto.String("TokenEntry"),
				Field:   []*descriptorpb.FieldDescriptorProto{opt(optl, str, "key", 1, ""), opt(optl, byt, "value", 2, "")},
				Options: &descriptorpb.MessageOptions{MapEntry: proto.Bool(true)},
			}},
		}},
	}
	fd, err := protodesc.NewFile(fdp, protoregistryFiles(t))
	if err != nil {
		t.Fatal(err)
	}
	td := fd.Messages().ByName("T")
	build := func() *dynamicpb.Message {
		m := dynamicpb.NewMessage(td)
		m.Mutable(td.Fields().ByName("passwords")).List().Append(protoreflect.ValueOfString("secret-list"))
		m.Mutable(td.Fields().ByName("token")).Map().Set(protoreflect.ValueOfString("k").MapKey(),
			protoreflect.ValueOfBytes([]byte("secret-map")))
		inner, _ := anypb.New(&pb.AuthenticateRequest{Name: "u", Password: "secret-any"})
		m.Set(td.Fields().ByName("any"), protoreflect.ValueOfMessage(inner.ProtoReflect()))
		child := dynamicpb.NewMessage(td)
		child.Mutable(td.Fields().ByName("passwords")).List().Append(protoreflect.ValueOfString("secret-child"))
		m.Set(td.Fields().ByName("child"), protoreflect.ValueOfMessage(child))
		m.Set(td.Fields().ByName("name"), protoreflect.ValueOfString("visible"))
		return m
	}
	m := build()
	out := protojson.Format(redacted(m))
	for _, secret := range []string{"secret-list", "secret-map", "secret-any", "secret-child"} {
		if strings.Contains(out, secret) {
			t.Errorf("%s logged: %s", secret, out)
		}
	}
	if !strings.Contains(out, "visible") {
		t.Errorf("a field that is no secret is not logged: %s", out)
	}
	if !proto.Equal(m, build()) {
		t.Error("redaction changed the message itself")
	}
	// etcd's messages with secrets, and one without (logged as it is, not copied).
	for _, c := range []proto.Message{&pb.AuthenticateRequest{Password: "secret"}, &pb.AuthenticateResponse{Token: "secret"},
		&pb.AuthUserAddRequest{Password: "secret", HashedPassword: "secret"},
		&pb.AuthUserChangePasswordRequest{Password: "secret", HashedPassword: "secret"}} {
		if out := protojson.Format(redacted(c)); strings.Contains(out, "secret") {
			t.Errorf("%T: %s", c, out)
		}
	}
	put := &pb.PutRequest{Key: []byte("k")}
	if redacted(put) != proto.Message(put) {
		t.Error("a message that can hold no secret was copied")
	}
}

func protoregistryFiles(t *testing.T) *protoregistry.Files {
	t.Helper()
	files := new(protoregistry.Files)
	if err := files.RegisterFile(anypb.File_google_protobuf_any_proto); err != nil {
		t.Fatal(err)
	}
	return files
}
