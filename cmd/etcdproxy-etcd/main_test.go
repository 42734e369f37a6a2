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
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
)

// TestServesUntilStdinEnds: the member serves once its client URL is written, and stops (run returns) when its
// standard input ends, which is how it follows the proxy that started it.
func TestServesUntilStdinEnds(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ports, err := embedetcd.FreePorts(2)
	if err != nil {
		t.Fatal(err)
	}
	client := fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	stdinR, stdinW := io.Pipe()
	stdoutR, stdoutW := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run([]string{"--data-dir", t.TempDir(), "--client-url", client,
			"--peer-url", fmt.Sprintf("http://127.0.0.1:%d", ports[1]), "--log-level", "error"}, stdinR, stdoutW)
		_ = stdoutW.Close()
	}()
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
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run after standard input ended: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("still running 15 s after standard input ended")
	}
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
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ports, err := embedetcd.FreePorts(2)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		done <- run([]string{"--data-dir", t.TempDir(), "--client-url", fmt.Sprintf("http://127.0.0.1:%d", ports[0]),
			"--peer-url", fmt.Sprintf("http://127.0.0.1:%d", ports[1]), "--log-level", "error"}, strings.NewReader(""), io.Discard)
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("still running 30 s after starting with its standard input ended")
	}
}
