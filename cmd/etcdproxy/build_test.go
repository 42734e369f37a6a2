package main

import (
	"debug/elf"
	"strings"
	"testing"
)

// TestBinaryLinksNoTracing checks what the Makefile's TAGS buy (see the Makefile): the binary `make build` ships
// links neither gRPC's request tracing (golang.org/x/net/trace) nor html/template, which only it brought in. It
// fails if the tag is dropped from the Makefile, or if a gRPC-Go upgrade stops honouring it.
func TestBinaryLinksNoTracing(t *testing.T) {
	f, err := elf.Open(binaryPath(t))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	syms, err := f.Symbols()
	if err != nil {
		t.Fatal(err)
	}
	var grpcSyms int
	found := map[string]string{}
	for _, s := range syms {
		if strings.HasPrefix(s.Name, "google.golang.org/grpc.") {
			grpcSyms++
		}
		for _, pkg := range []string{"golang.org/x/net/trace.", "html/template."} {
			if strings.HasPrefix(s.Name, pkg) && found[pkg] == "" {
				found[pkg] = s.Name
			}
		}
	}
	if grpcSyms == 0 {
		t.Fatal("no gRPC symbol in the binary: its symbol table is not what this test reads")
	}
	for pkg, sym := range found {
		t.Errorf("the binary links %s (%s, among others)", strings.TrimSuffix(pkg, "."), sym)
	}
}
