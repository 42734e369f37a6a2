// Command apidiff lists the RPCs and message fields added or removed between two versions of etcd's gRPC API,
// from etcd's own .proto files (the etcd modules' sources, fetched by the go command from the Go module proxy).
// `make api-diff OTHER=v3.6.5` runs it against the version pinned in go.mod.
//
// etcd's files import gogoproto (before 3.7), google.api annotations and openapiv2 options, none of which matter
// for what is compared: those imports and every custom option are dropped before compiling.
//
// It reads only: it changes nothing in the repository and is not part of the etcdproxy binary.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/bufbuild/protocompile"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// files are etcd's API files: the import path etcd uses for each, and where it lives in which module.
var files = []struct{ path, module, dir string }{
	{"etcd/api/etcdserverpb/rpc.proto", "go.etcd.io/etcd/api/v3", "etcdserverpb/rpc.proto"},
	{"etcd/api/mvccpb/kv.proto", "go.etcd.io/etcd/api/v3", "mvccpb/kv.proto"},
	{"etcd/api/authpb/auth.proto", "go.etcd.io/etcd/api/v3", "authpb/auth.proto"},
	{"etcd/api/versionpb/version.proto", "go.etcd.io/etcd/api/v3", "versionpb/version.proto"},
	{"etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto", "go.etcd.io/etcd/server/v3", "etcdserver/api/v3election/v3electionpb/v3election.proto"},
	{"etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto", "go.etcd.io/etcd/server/v3", "etcdserver/api/v3lock/v3lockpb/v3lock.proto"},
}

func main() {
	from := flag.String("from", "", "etcd version to compare from, e.g. v3.7.3 (the pinned one)")
	to := flag.String("to", "", "etcd version to compare to, e.g. v3.6.5")
	flag.Parse()
	if *from == "" || *to == "" || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "usage: apidiff -from VERSION -to VERSION")
		os.Exit(2)
	}
	if err := run(*from, *to); err != nil {
		fmt.Fprintln(os.Stderr, "apidiff:", err)
		os.Exit(1)
	}
}

func run(from, to string) error {
	a, err := api(from)
	if err != nil {
		return fmt.Errorf("%s: %w", from, err)
	}
	b, err := api(to)
	if err != nil {
		return fmt.Errorf("%s: %w", to, err)
	}
	fmt.Printf("etcd API %s -> %s\n", from, to)
	n := 0
	for _, k := range sortedKeys(a, b) {
		switch {
		case a[k] != "" && b[k] == "":
			fmt.Printf("- %s %s\n", k, a[k])
			n++
		case a[k] == "" && b[k] != "":
			fmt.Printf("+ %s %s\n", k, b[k])
			n++
		case a[k] != b[k]:
			fmt.Printf("~ %s %s -> %s\n", k, a[k], b[k])
			n++
		}
	}
	fmt.Printf("%d differences (RPCs and message fields)\n", n)
	return nil
}

// api returns the RPCs and fields of etcd's API at version v: full name -> its shape.
func api(v string) (map[string]string, error) {
	dirs := map[string]string{}
	for _, f := range files {
		if _, ok := dirs[f.module]; ok {
			continue
		}
		dir, err := download(f.module, v)
		if err != nil {
			return nil, err
		}
		dirs[f.module] = dir
	}
	sources := map[string][]byte{}
	var paths []string
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(dirs[f.module], f.dir))
		if errors.Is(err, fs.ErrNotExist) && f.path != files[0].path {
			continue // not in this version (versionpb appeared in 3.6); compiling tells if something needs it
		}
		if err != nil {
			return nil, err
		}
		sources[f.path] = strip(b)
		paths = append(paths, f.path)
	}
	c := protocompile.Compiler{Resolver: protocompile.WithStandardImports(&protocompile.SourceResolver{
		Accessor: func(path string) (io.ReadCloser, error) {
			if b, ok := sources[path]; ok {
				return io.NopCloser(bytes.NewReader(b)), nil
			}
			return nil, os.ErrNotExist
		},
	})}
	compiled, err := c.Compile(context.Background(), paths...)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, fd := range compiled {
		services := fd.Services()
		for i := 0; i < services.Len(); i++ {
			methods := services.Get(i).Methods()
			for j := 0; j < methods.Len(); j++ {
				m := methods.Get(j)
				out["rpc "+string(m.FullName())] = fmt.Sprintf("(%s%s) returns (%s%s)",
					stream(m.IsStreamingClient()), m.Input().FullName(), stream(m.IsStreamingServer()), m.Output().FullName())
			}
		}
		addMessages(out, fd.Messages())
	}
	return out, nil
}

func addMessages(out map[string]string, msgs protoreflect.MessageDescriptors) {
	for i := 0; i < msgs.Len(); i++ {
		m := msgs.Get(i)
		fields := m.Fields()
		for j := 0; j < fields.Len(); j++ {
			f := fields.Get(j)
			kind := f.Kind().String()
			if f.Message() != nil {
				kind = string(f.Message().FullName())
			} else if f.Enum() != nil {
				kind = string(f.Enum().FullName())
			}
			out["field "+string(f.FullName())] = fmt.Sprintf("%d %s %s", f.Number(), f.Cardinality(), kind)
		}
		addMessages(out, m.Messages())
	}
}

func stream(s bool) string {
	if s {
		return "stream "
	}
	return ""
}

// download fetches module@version into the module cache and returns its directory.
func download(module, version string) (string, error) {
	out, err := exec.Command("go", "mod", "download", "-json", module+"@"+version).Output()
	if err != nil {
		return "", fmt.Errorf("go mod download %s@%s: %w", module, version, err)
	}
	var info struct{ Dir, Error string }
	if err := json.Unmarshal(out, &info); err != nil {
		return "", err
	}
	if info.Error != "" {
		return "", fmt.Errorf("go mod download %s@%s: %s", module, version, info.Error)
	}
	return info.Dir, nil
}

var (
	foreignImport = regexp.MustCompile(`(?m)^\s*import\s+"(gogoproto|google/api|protoc-gen-openapiv2)/[^"]*";\s*$`)
	fieldOption   = regexp.MustCompile(`\[\s*\([^\]]*\]`)
)

// strip drops imports of option-only files and every custom option, so that the files compile without them.
func strip(src []byte) []byte {
	src = foreignImport.ReplaceAll(src, nil)
	src = fieldOption.ReplaceAll(src, nil)
	// option (x) = ...; statements, whose values may be {...} blocks spanning lines.
	var out bytes.Buffer
	s := string(src)
	for {
		i := strings.Index(s, "option (")
		if i < 0 {
			out.WriteString(s)
			break
		}
		out.WriteString(s[:i])
		depth, j := 0, i
		for ; j < len(s); j++ {
			if s[j] == '{' {
				depth++
			} else if s[j] == '}' {
				depth--
			} else if s[j] == ';' && depth == 0 {
				break
			}
		}
		s = s[min(j+1, len(s)):]
	}
	return out.Bytes()
}

func sortedKeys(a, b map[string]string) []string {
	seen := map[string]bool{}
	var keys []string
	for _, m := range []map[string]string{a, b} {
		for k := range m {
			if !seen[k] {
				seen[k] = true
				keys = append(keys, k)
			}
		}
	}
	sort.Strings(keys)
	return keys
}
