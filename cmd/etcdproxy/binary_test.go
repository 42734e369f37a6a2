package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/embedetcd"
	"github.com/etcdproxy/etcdproxy/internal/proxytest"
)

// The tests that run the built binary share one build (with -race when the tests run under -race, so that a race
// in the binary, exit code 66, fails them).

var binary struct {
	once sync.Once
	dir  string
	path string
	err  error
	out  []byte
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binary.dir != "" {
		_ = os.RemoveAll(binary.dir)
	}
	if code == 0 {
		// The in-process proxies of the TLS tests leave nothing running.
		if err := proxytest.LeftOver(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			code = 1
		}
	}
	os.Exit(code)
}

// binaryPath builds etcdproxy once for the package's tests, with the build tags `make build` gives it (makeTags),
// and etcdproxy-etcd beside it (as `make build` does: --embedded-etcd runs it).
func binaryPath(t *testing.T) string {
	t.Helper()
	binary.once.Do(func() {
		var tags string
		if tags, binary.err = makeTags(); binary.err != nil {
			return
		}
		if binary.dir, binary.err = os.MkdirTemp("", "etcdproxy-bin"); binary.err != nil {
			return
		}
		binary.path = filepath.Join(binary.dir, "etcdproxy")
		for _, b := range []struct{ out, pkg, tags string }{{binary.path, ".", tags},
			{filepath.Join(binary.dir, embeddedBinary), "../" + embeddedBinary, ""}} {
			args := []string{"build", "-o", b.out}
			if b.tags != "" {
				args = append(args, b.tags)
			}
			if raceEnabled {
				args = append(args, "-race")
			}
			if binary.out, binary.err = exec.Command("go", append(args, b.pkg)...).CombinedOutput(); binary.err != nil {
				return
			}
		}
	})
	if binary.err != nil {
		t.Fatalf("go build: %v\n%s", binary.err, binary.out)
	}
	return binary.path
}

// makeTags returns the Makefile's TAGS: the build-tags flag bin/etcdproxy is built with, for the tests to run
// what `make build` ships.
func makeTags() (string, error) {
	mk, err := os.ReadFile("../../Makefile")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(mk), "\n") {
		if v, ok := strings.CutPrefix(line, "TAGS :="); ok {
			return strings.TrimSpace(v), nil
		}
	}
	return "", fmt.Errorf("no TAGS := line in the Makefile")
}

// running is the binary started by runBinary.
type running struct {
	listen, metrics string // its --listen-addr, and a free host:port offered for --metrics-addr
	etcd            string // its embedded etcd's client address
	logs            *lockedBuffer
	cmd             *exec.Cmd
	exited          chan error
	stopped         bool
}

// runBinary starts the binary in work with an embedded etcd (data in work/data), on free loopback ports, under a
// systemd notify socket, with the flags extra returns for the metrics host:port it is given; it returns once the
// proxy told systemd it is ready. At cleanup it is stopped (stop), if the test did not stop it.
func runBinary(t *testing.T, work string, extra func(metrics string) []string) *running {
	t.Helper()
	ports, err := embedetcd.FreePorts(4)
	if err != nil {
		t.Fatal(err)
	}
	r := &running{listen: fmt.Sprintf("127.0.0.1:%d", ports[0]), metrics: fmt.Sprintf("127.0.0.1:%d", ports[1]),
		etcd: fmt.Sprintf("127.0.0.1:%d", ports[2])}
	startRunning(t, r, work, append([]string{"start", "--embedded-etcd", "--data-dir", filepath.Join(work, "data"),
		"--embedded-etcd-client-url", "http://" + r.etcd,
		"--embedded-etcd-peer-url", fmt.Sprintf("http://127.0.0.1:%d", ports[3]),
		"--listen-addr", r.listen}, extra(r.metrics)...))
	return r
}

// runProxy starts the binary in work in front of etcd at endpoints, on a free loopback port, with extra flags
// given that port; like runBinary, it returns once the proxy is ready and stops it at cleanup.
func runProxy(t *testing.T, work string, endpoints []string, extra func(listen string) []string) *running {
	t.Helper()
	ports, err := embedetcd.FreePorts(1)
	if err != nil {
		t.Fatal(err)
	}
	r := &running{listen: fmt.Sprintf("127.0.0.1:%d", ports[0])}
	startRunning(t, r, work, append([]string{"start", "--endpoints", strings.Join(endpoints, ","),
		"--listen-addr", r.listen}, extra(r.listen)...))
	return r
}

// startRunning runs the binary with args in work as r, and waits until it tells systemd it is ready.
func startRunning(t *testing.T, r *running, work string, args []string) {
	t.Helper()
	bin := binaryPath(t)
	r.logs, r.exited = &lockedBuffer{}, make(chan error, 1)
	sock := filepath.Join(work, "notify.sock")
	_ = os.Remove(sock) // a run before this one in work (a restart)
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer notify.Close()
	r.cmd = exec.Command(bin, args...)
	r.cmd.Dir = work
	// The race detector waits a second at exit by default (for late reports); a test that times the stop would
	// measure that wait, which a production build does not have.
	r.cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+sock, "GORACE=atexit_sleep_ms=0")
	r.cmd.Stdout, r.cmd.Stderr = r.logs, r.logs
	// A child the binary left running (an embedded etcd it failed to stop) holds the output pipe open: Wait does
	// not wait for it beyond this, so such a test fails instead of hanging.
	r.cmd.WaitDelay = 5 * time.Second
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { r.exited <- r.cmd.Wait() }()
	t.Cleanup(func() { r.stop(t) })
	// systemd hears READY=1 once the proxy serves.
	buf := make([]byte, 256)
	_ = notify.SetReadDeadline(time.Now().Add(30 * time.Second))
	n, err := notify.Read(buf)
	if err != nil || string(buf[:n]) != "READY=1" {
		t.Fatalf("no READY=1 from the proxy within 30s: %q, %v\nlogs:\n%s", buf[:n], err, r.logs.String())
	}
}

// kill ends the process with SIGKILL, as a crash would, and waits for it.
func (r *running) kill(t *testing.T) {
	t.Helper()
	r.stopped = true
	if err := r.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-r.exited
	if strings.Contains(r.logs.String(), "WARNING: DATA RACE") {
		t.Errorf("the race detector reported a race in the binary\nlogs:\n%s", r.logs.String())
	}
}

// stop sends SIGTERM and checks that the proxy exits 0 within 15 s, race-free.
func (r *running) stop(t *testing.T) {
	t.Helper()
	if r.stopped {
		return
	}
	r.stopped = true
	if err := r.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-r.exited:
		if strings.Contains(r.logs.String(), "WARNING: DATA RACE") {
			t.Errorf("the race detector reported a race in the binary (exit: %v)\nlogs:\n%s", err, r.logs.String())
		} else if err != nil {
			t.Errorf("exit after SIGTERM: %v\nlogs:\n%s", err, r.logs.String())
		}
	case <-time.After(15 * time.Second):
		_ = r.cmd.Process.Kill()
		<-r.exited
		t.Errorf("still running 15s after SIGTERM\nlogs:\n%s", r.logs.String())
	}
}

// lockedBuffer collects the process's output while the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
