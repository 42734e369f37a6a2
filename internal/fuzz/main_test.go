package fuzz_test

import (
	"fmt"
	"os"
	"runtime/debug"
	"testing"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
)

func TestMain(m *testing.M) {
	// Go's fuzzing coordinator discards its workers' output: a worker that dies (a panic in the proxy or in an
	// etcd member, both in this process) is reported only as "fuzzing process hung or terminated unexpectedly".
	// Its crash output also goes to a file in the temporary directory, removed when the process ends normally.
	var atExit []func()
	if f, err := os.CreateTemp("", fmt.Sprintf("etcdproxy-fuzz-crash-%d-*.log", os.Getpid())); err == nil {
		if err := debug.SetCrashOutput(f, debug.CrashOptions{}); err == nil {
			atExit = append(atExit, func() { os.Remove(f.Name()) })
		}
		f.Close()
	}
	proxytest.VerifyTestMain(m, atExit...)
}
