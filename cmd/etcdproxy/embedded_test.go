package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
)

// children returns the pids of pid's child processes (Linux: /proc/PID/task/TID/children).
func children(t *testing.T, pid int) []int {
	t.Helper()
	tasks, err := filepath.Glob(filepath.Join("/proc", strconv.Itoa(pid), "task", "*", "children"))
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, f := range tasks {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // the thread ended
		}
		for _, s := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(s); err == nil {
				pids = append(pids, n)
			}
		}
	}
	return pids
}

// embeddedChild returns the pid of r's etcdproxy-etcd, checking that it is r's only child.
func embeddedChild(t *testing.T, r *running) int {
	t.Helper()
	kids := children(t, r.cmd.Process.Pid)
	if len(kids) != 1 {
		t.Fatalf("the proxy has children %v; want one, its etcdproxy-etcd", kids)
	}
	cmdline, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(kids[0]), "cmdline"))
	if err != nil || !strings.Contains(string(cmdline), embeddedBinary) {
		t.Fatalf("the proxy's child %d runs %q (%v); want %s", kids[0], cmdline, err, embeddedBinary)
	}
	t.Cleanup(func() { _ = syscall.Kill(kids[0], syscall.SIGKILL) }) // if a test failed with it running
	return kids[0]
}

// gone waits up to 10 s for pid to be gone (or a zombie: it has exited, its parent has not reaped it yet).
func gone(pid int) bool {
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
		if err != nil {
			return true
		}
		// pid (comm) STATE ...: comm may hold spaces, the state follows the last ')'.
		if f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:])); len(f) > 0 && f[0] == "Z" {
			return true
		}
	}
	return false
}

// TestEmbeddedEtcdEndsWithProxy: the embedded etcd is a child process that never outlives the proxy: it stops
// when the proxy stops (SIGTERM), and when the proxy is killed (SIGKILL: nothing of the proxy runs to stop it).
// Restarted on the same data, the member keeps what it had.
func TestEmbeddedEtcdEndsWithProxy(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	work := t.TempDir()
	none := func(string) []string { return nil }
	r := runBinary(t, work, none)
	put(t, r.listen, "k", "v")
	child := embeddedChild(t, r)
	r.stop(t)
	if !gone(child) {
		t.Fatalf("etcdproxy-etcd (pid %d) still runs 10 s after the proxy stopped", child)
	}

	r = runBinary(t, work, none)
	if got := getKey(t, r.listen, "k"); got != "v" {
		t.Fatalf("after a restart on the same data: k = %q; want v", got)
	}
	child = embeddedChild(t, r)
	r.kill(t)
	if !gone(child) {
		t.Fatalf("etcdproxy-etcd (pid %d) still runs 10 s after the proxy was killed", child)
	}
}

// TestProxyEndsWithEmbeddedEtcd: if the embedded etcd exits by itself (here killed), the proxy, which then has no
// upstream, exits with an error saying so, as it would have if the member had failed in its own process.
func TestProxyEndsWithEmbeddedEtcd(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	r := runBinary(t, t.TempDir(), func(string) []string { return nil })
	child := embeddedChild(t, r)
	if err := syscall.Kill(child, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	r.stopped = true
	select {
	case err := <-r.exited:
		if err == nil || !strings.Contains(r.logs.String(), "the embedded etcd exited: signal: killed") {
			t.Fatalf("the proxy exited with %v; want an error naming the embedded etcd's exit\nlogs:\n%s", err, r.logs.String())
		}
	case <-time.After(10 * time.Second):
		_ = r.cmd.Process.Kill()
		<-r.exited
		t.Fatalf("the proxy still runs 10 s after its embedded etcd was killed\nlogs:\n%s", r.logs.String())
	}
}

// TestEmbeddedBinaryMissing: without etcdproxy-etcd beside the binary or in PATH, --embedded-etcd fails at once
// with an error that says what is missing and how to get it; --embedded-etcd-binary naming a missing file says so.
func TestEmbeddedBinaryMissing(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	alone := filepath.Join(t.TempDir(), "etcdproxy")
	b, err := os.ReadFile(binaryPath(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(alone, b, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{nil, "--embedded-etcd: etcdproxy-etcd not found beside this binary (" + filepath.Join(filepath.Dir(alone), "etcdproxy-etcd") +
			") nor in PATH: `make build` builds it into bin/"},
		{[]string{"--embedded-etcd-binary", "/nonexistent/etcdproxy-etcd"},
			"--embedded-etcd: --embedded-etcd-binary: stat /nonexistent/etcdproxy-etcd: no such file or directory"},
	} {
		cmd := exec.Command(alone, append([]string{"start", "--embedded-etcd", "--data-dir", t.TempDir(),
			"--listen-addr", "127.0.0.1:0"}, c.args...)...)
		cmd.Env = append(os.Environ(), "PATH=", "GORACE=atexit_sleep_ms=0")
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), c.want) {
			t.Errorf("start --embedded-etcd %v: %v\n%s\nwant an error with %q", c.args, err, out, c.want)
		}
	}
}

// put writes key=value through the proxy at addr.
func put(t *testing.T, addr, key, value string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := proxytest.Client(t, addr).Put(ctx, key, value); err != nil {
		t.Fatalf("put through the proxy: %v", err)
	}
}

// getKey reads key (linearizable) through the proxy at addr; "" if there is none.
func getKey(t *testing.T, addr, key string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := proxytest.Client(t, addr).Get(ctx, key)
	if err != nil {
		t.Fatalf("get through the proxy: %v", err)
	}
	if len(r.Kvs) == 0 {
		return ""
	}
	return string(r.Kvs[0].Value)
}
