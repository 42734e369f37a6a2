package main

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/etcdproxy/etcdproxy/internal/etcdapi"
	"google.golang.org/protobuf/compiler/protogen"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/pluginpb"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// The options buf.gen.yaml passes; TestBufGenOptions keeps the two in step.
const (
	genPackage = "github.com/etcdproxy/etcdproxy/gen"
	genRuntime = "github.com/etcdproxy/etcdproxy/forward"
	genParam   = "package=" + genPackage + ",runtime=" + genRuntime
)

// runPlugin runs the plugin in-process, as buf or protoc would, and returns its response.
func runPlugin(t *testing.T, files []*descriptorpb.FileDescriptorProto, toGenerate []string, param string) *pluginpb.CodeGeneratorResponse {
	t.Helper()
	req := &pluginpb.CodeGeneratorRequest{FileToGenerate: toGenerate, ProtoFile: files, Parameter: proto.String(param)}
	var flags flag.FlagSet
	cfg := registerFlags(&flags)
	p, err := protogen.Options{ParamFunc: flags.Set}.New(req)
	if err != nil {
		return &pluginpb.CodeGeneratorResponse{Error: proto.String(err.Error())}
	}
	if err := generate(p, cfg); err != nil {
		p.Error(err)
	}
	return p.Response()
}

func readTestdata(t *testing.T, names ...string) []*descriptorpb.FileDescriptorProto {
	t.Helper()
	var files []*descriptorpb.FileDescriptorProto
	for _, name := range names {
		b, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			t.Fatal(err)
		}
		f := &descriptorpb.FileDescriptorProto{}
		if err := prototext.Unmarshal(b, f); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		files = append(files, f)
	}
	return files
}

// render concatenates a response's files, each under a "-- name --" line.
func render(resp *pluginpb.CodeGeneratorResponse) []byte {
	var b bytes.Buffer
	for _, f := range resp.File {
		b.WriteString("-- " + f.GetName() + " --\n")
		b.WriteString(f.GetContent())
	}
	return b.Bytes()
}

func checkGolden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./protoc-gen-etcdproxy -update)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs from the plugin's output; if the change is intended, run go test ./protoc-gen-etcdproxy -update\ngot:\n%s", path, got)
	}
}

func TestGolden(t *testing.T) {
	for _, tc := range []struct {
		golden     string
		files      []string
		toGenerate []string
	}{
		{"echo.golden", []string{"echo.txtpb"}, []string{"echo/echo.proto"}},
		{"echo_admin.golden", []string{"echo.txtpb", "admin.txtpb", "nosvc.txtpb"},
			[]string{"echo/echo.proto", "echo/admin/admin.proto", "echo/nosvc.proto"}},
		// An import is not generated for: only Admin and Idle appear.
		{"admin_only.golden", []string{"echo.txtpb", "admin.txtpb"}, []string{"echo/admin/admin.proto"}},
		{"echo_v2.golden", []string{"echo_v2.txtpb"}, []string{"echo/echo.proto"}},
	} {
		t.Run(tc.golden, func(t *testing.T) {
			resp := runPlugin(t, readTestdata(t, tc.files...), tc.toGenerate, "package=example.com/proxy/gen,runtime=example.com/proxy/forward")
			if resp.Error != nil {
				t.Fatal(resp.GetError())
			}
			got := render(resp)
			checkGolden(t, tc.golden, got)
			// The output is byte-stable: a second run gives the same bytes.
			again := runPlugin(t, readTestdata(t, tc.files...), tc.toGenerate, "package=example.com/proxy/gen,runtime=example.com/proxy/forward")
			if !bytes.Equal(got, render(again)) {
				t.Error("two runs on the same input gave different output")
			}
		})
	}
}

// TestNewRPCIsProxied: an RPC added upstream gets its passthrough by regeneration alone.
func TestNewRPCIsProxied(t *testing.T) {
	const param = "package=example.com/proxy/gen,runtime=example.com/proxy/forward"
	v1 := render(runPlugin(t, readTestdata(t, "echo.txtpb"), []string{"echo/echo.proto"}, param))
	v2 := render(runPlugin(t, readTestdata(t, "echo_v2.txtpb"), []string{"echo/echo.proto"}, param))
	const method = "func (s *Echo) Shout(ctx context.Context, req *echopb.Ping) (*echopb.Pong, error) {\n\treturn forward.Unary(ctx, req, s.upstream.Shout)\n}"
	if bytes.Contains(v1, []byte(method)) {
		t.Fatal("v1 already has Shout")
	}
	if !bytes.Contains(v2, []byte(method)) {
		t.Errorf("v2 lacks the Shout passthrough:\n%s", v2)
	}
}

func TestOptionErrors(t *testing.T) {
	for _, tc := range []struct {
		param, files, want string
	}{
		{"runtime=example.com/forward", "echo.txtpb", "option package=IMPORT_PATH is required"},
		{"package=example.com/gen", "echo.txtpb", "option runtime=IMPORT_PATH is required"},
		{"package=example.com/go-gen,runtime=example.com/forward", "echo.txtpb", `"go-gen" is not a valid Go package name`},
		{"package=example.com/type,runtime=example.com/forward", "echo.txtpb", `"type" is not a valid Go package name`},
		{"package=example.com/gen,runtime=example.com/gen", "echo.txtpb", "the runtime must be a package of its own"},
		{"package=example.com/gen,runtime=example.com/forward,colour=blue", "echo.txtpb", "colour"},
		{"package=example.com/gen,runtime=example.com/forward", "nosvc.txtpb", "no service in the files to generate"},
	} {
		t.Run(tc.want, func(t *testing.T) {
			files := readTestdata(t, tc.files)
			resp := runPlugin(t, files, []string{files[0].GetName()}, tc.param)
			if !strings.Contains(resp.GetError(), tc.want) {
				t.Errorf("error %q, want it to contain %q", resp.GetError(), tc.want)
			}
			if len(resp.File) != 0 {
				t.Errorf("a failed run produced %d files", len(resp.File))
			}
		})
	}
}

func TestServiceNameCollision(t *testing.T) {
	files := readTestdata(t, "echo.txtpb", "admin.txtpb")
	files[1].Service[0].Name = proto.String("Echo")
	resp := runPlugin(t, files, []string{"echo/echo.proto", "echo/admin/admin.proto"}, "package=example.com/gen,runtime=example.com/forward")
	if !strings.Contains(resp.GetError(), "service echo.admin.Echo generates Echo, which echo.Echo already uses") {
		t.Errorf("error %q", resp.GetError())
	}
}

// TestGenIsFresh fails when gen/ is not exactly what the plugin produces from the etcd API pinned in go.mod (what
// `make generate` writes). It runs the plugin in-process, so CI needs no buf.
func TestGenIsFresh(t *testing.T) {
	set, err := etcdapi.Files()
	if err != nil {
		t.Fatal(err)
	}
	resp := runPlugin(t, set.File, etcdapi.RootPaths(), genParam)
	if resp.Error != nil {
		t.Fatal(resp.GetError())
	}
	var want []string
	for _, f := range resp.File {
		want = append(want, f.GetName())
		path := filepath.Join("..", "gen", f.GetName())
		if *update {
			if err := os.WriteFile(path, []byte(f.GetContent()), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(path)
		if err != nil || string(got) != f.GetContent() {
			t.Errorf("gen/%s is stale or edited by hand: run make generate", f.GetName())
		}
	}
	have, err := filepath.Glob(filepath.Join("..", "gen", "*"))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range have {
		if !slices.Contains(want, filepath.Base(p)) {
			t.Errorf("gen/%s is not generated: gen/ holds generated files only", filepath.Base(p))
		}
	}
}

// TestBufGenOptions keeps buf.gen.yaml (the user's make generate) and TestGenIsFresh on the same options.
func TestBufGenOptions(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "buf.gen.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"package=" + genPackage, "runtime=" + genRuntime, "strategy: all"} {
		if !bytes.Contains(b, []byte(want)) {
			t.Errorf("buf.gen.yaml lacks %q", want)
		}
	}
}
