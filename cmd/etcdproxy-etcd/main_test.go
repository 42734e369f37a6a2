package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/embedetcd"
	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
)

// startMember runs run on free loopback ports in a goroutine, with stdin and stdout; it returns the member's
// client URL and run's result.
func startMember(t *testing.T, stdin io.Reader, stdout io.Writer) (client string, done <-chan error) {
	t.Helper()
	ports, err := embedetcd.FreePorts(2)
	if err != nil {
		t.Fatal(err)
	}
	client = fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	ended := make(chan error, 1)
	dir := t.TempDir()
	go func() {
		ended <- run([]string{"--data-dir", dir, "--client-url", client,
			"--peer-url", fmt.Sprintf("http://127.0.0.1:%d", ports[1]), "--log-level", "error"}, stdin, stdout)
	}()
	return client, ended
}

// returns fails unless run ends with nil within d; why says what should have ended it.
func returns(t *testing.T, done <-chan error, d time.Duration, why string) {
	t.Helper()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run after %s: %v", why, err)
		}
	case <-time.After(d):
		t.Fatalf("still running %v after %s", d, why)
	}
}

// leavesNothing fails t if goroutines that were not running before (goleak.IgnoreCurrent) still are, those that
// belong to etcd itself aside (proxytest.LeakOptions), once the stopped member's have had the time a loaded
// machine may take to end: proxytest.LeftOver waits up to 10 s, where goleak.VerifyNone gives up after half a
// second.
func leavesNothing(t *testing.T, before goleak.Option) {
	t.Helper()
	if err := proxytest.LeftOver(before); err != nil {
		t.Error(err)
	}
}

// TestServesUntilStdinEnds: the member serves once its client URL is written, and stops (run returns) when its
// standard input ends, which is how it follows the proxy that started it.
func TestServesUntilStdinEnds(t *testing.T) {
	defer leavesNothing(t, goleak.IgnoreCurrent())
	stdinR, stdinW := io.Pipe()
	stdoutR, stdoutW := io.Pipe()
	defer stdoutR.Close() // ends the copy below
	client, done := startMember(t, stdinR, stdoutW)
	line, err := bufio.NewReader(stdoutR).ReadString('\n')
	if err != nil || line != client+"\n" {
		t.Fatalf("first output %q, %v; want the client URL %s and a newline", line, err, client)
	}
	go func() { _, _ = io.Copy(io.Discard, stdoutR) }()
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{client}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Put(ctx, "k", "v"); err != nil {
		t.Fatalf("put: %v", err)
	}
	_ = c.Close()
	_ = stdinW.Close()
	returns(t, done, 15*time.Second, "standard input ended")
}

// TestFlagErrors: what the member needs is checked before anything starts.
func TestFlagErrors(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "d")
	for _, c := range []struct {
		args []string
		want string
	}{
		{nil, "--data-dir, --client-url and --peer-url are required"},
		{[]string{"--data-dir", dir, "--client-url", "http://127.0.0.1:1"}, "--data-dir, --client-url and --peer-url are required"},
		{[]string{"--data-dir", dir, "--client-url", "http://127.0.0.1:1", "--peer-url", "http://127.0.0.1:2", "--log-level", "loud"},
			"--log-level: "},
		{[]string{"stray"}, `unexpected argument "stray"`},
		{[]string{"--nope"}, "flag provided but not defined: -nope"},
	} {
		err := run(c.args, strings.NewReader(""), io.Discard)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("run %v: %v; want an error with %q", c.args, err, c.want)
		}
	}
}

// TestProxyGoneWhileStarting: a proxy that is gone before the member serves (its standard input already ended)
// gets a member that stops as soon as it has started: run returns, the member stopped, instead of serving on.
func TestProxyGoneWhileStarting(t *testing.T) {
	defer leavesNothing(t, goleak.IgnoreCurrent())
	_, done := startMember(t, strings.NewReader(""), io.Discard)
	returns(t, done, 30*time.Second, "starting with its standard input ended")
}
