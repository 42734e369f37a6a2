package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// The embedded etcd of --embedded-etcd runs as a child process, etcdproxy-etcd (cmd/etcdproxy-etcd), so that this
// binary does not link etcd's server (about 5 MB of resident memory in every proxy process, for init functions a
// proxy has no use for). The child gets its own process group, so a Ctrl-C at a terminal reaches the proxy only,
// which drains its clients and then stops the member; the child also stops when its standard input, a pipe the
// proxy holds, ends: when the proxy exits, however it exits.

const embeddedBinary = "etcdproxy-etcd"

// embeddedReadyTimeout bounds the wait for the member to serve (the member itself gives up after 30 s).
const embeddedReadyTimeout = 60 * time.Second

// embeddedStopTimeout bounds the wait for the member to stop after SIGTERM; then it is killed.
const embeddedStopTimeout = 15 * time.Second

// findEmbeddedBinary returns the path of etcdproxy-etcd: --embedded-etcd-binary if given, else the one beside this
// executable (where `make build` puts it), else the one on PATH.
func findEmbeddedBinary(given string) (string, error) {
	if given != "" {
		// Absolute: a name without a slash would be looked up in PATH when run, not where it was checked.
		abs, err := filepath.Abs(given)
		if err == nil {
			_, err = os.Stat(abs)
		}
		if err != nil {
			return "", fmt.Errorf("--embedded-etcd-binary: %w", err)
		}
		return abs, nil
	}
	var beside string
	if self, err := os.Executable(); err == nil {
		beside = filepath.Join(filepath.Dir(self), embeddedBinary)
		if fi, err := os.Stat(beside); err == nil && !fi.IsDir() {
			return beside, nil
		}
	}
	if p, err := exec.LookPath(embeddedBinary); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("%s not found beside this binary (%s) nor in PATH: `make build` builds it into bin/, "+
		"`go build ./cmd/%s` anywhere; or name it with --embedded-etcd-binary", embeddedBinary, beside, embeddedBinary)
}

// embeddedEtcd is a running etcdproxy-etcd.
type embeddedEtcd struct {
	cmd      *exec.Cmd
	stdin    io.WriteCloser
	exited   chan struct{} // closed when the child has exited; err is then its exit
	err      error
	died     chan error // the child's exit, if it exits before stop is called
	stopOnce sync.Once
	stopping chan struct{}
	lg       *zap.Logger
}

// startEmbedded starts etcdproxy-etcd with the member's data in dir and waits until it serves; it returns the
// member's client URL. Its logs go to this process's standard error.
func startEmbedded(bin, dir, clientURL, peerURL string, lg *zap.Logger) (*embeddedEtcd, string, error) {
	cmd := exec.Command(bin, "--data-dir", dir, "--client-url", clientURL, "--peer-url", peerURL, "--log-level", "warn")
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, "", err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, "", err
	}
	if err := cmd.Start(); err != nil {
		return nil, "", fmt.Errorf("starting %s: %w", bin, err)
	}
	e := &embeddedEtcd{cmd: cmd, stdin: stdin, exited: make(chan struct{}), died: make(chan error, 1),
		stopping: make(chan struct{}), lg: lg}
	ready := make(chan string, 1)
	go func() {
		// The first line is the member's client URL; anything after it is passed on to the log.
		r := bufio.NewScanner(stdout)
		if r.Scan() {
			ready <- strings.TrimSpace(r.Text())
		}
		close(ready)
		for r.Scan() {
			lg.Info("embedded etcd", zap.String("output", r.Text()))
		}
	}()
	go func() {
		// Wait closes stdout once the child has exited, perhaps while the reader above still reads it (which os/exec
		// calls incorrect because output can be lost): the child writes nothing after its URL, and a child that
		// exits before its URL is read is reported as having exited before serving, which it did as good as.
		e.err = cmd.Wait()
		close(e.exited)
		select {
		case <-e.stopping:
		default:
			e.died <- exitError(e.err)
		}
	}()
	timer := time.NewTimer(embeddedReadyTimeout)
	defer timer.Stop()
	select {
	case url, ok := <-ready:
		if ok && url != "" {
			return e, url, nil
		}
	case <-timer.C:
		e.stop()
		return nil, "", fmt.Errorf("%s did not serve within %v", bin, embeddedReadyTimeout)
	}
	// No URL: the child's output ended (it exits), or it wrote an empty line (it should not).
	select {
	case <-e.exited:
		return nil, "", fmt.Errorf("%s exited before serving: %w (its log is above)", bin, exitError(e.err))
	case <-timer.C:
		e.stop()
		return nil, "", fmt.Errorf("%s gave no client URL and did not exit within %v", bin, embeddedReadyTimeout)
	}
}

// exitError describes how the child exited.
func exitError(err error) error {
	if err == nil {
		return errors.New("exit status 0")
	}
	return err
}

// stop stops the member (SIGTERM, then SIGKILL after embeddedStopTimeout) and waits for it to exit.
func (e *embeddedEtcd) stop() {
	e.stopOnce.Do(func() {
		close(e.stopping)
		_ = e.cmd.Process.Signal(syscall.SIGTERM)
		_ = e.stdin.Close()
		select {
		case <-e.exited:
		case <-time.After(embeddedStopTimeout):
			e.lg.Warn("the embedded etcd did not stop in time: killed", zap.Duration("timeout", embeddedStopTimeout))
			_ = e.cmd.Process.Kill()
			<-e.exited
		}
	})
}
