package fuzz_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/proxy"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// stepTimeout bounds every wait for an answer that etcd gives at once: a proxy that takes longer hangs.
const stepTimeout = 10 * time.Second

// fuzzEnv is a proxytest environment (the proxy configured as `etcdproxy start` runs it) whose proxy logs its
// errors to an observer, so that a target fails on a panic that the proxy's recovery interceptors caught: they
// turn it into codes.Internal and a log line, which a comparison of status codes alone would report less clearly.
type fuzzEnv struct {
	*proxytest.Env
	logs *observer.ObservedLogs
}

func startEnv(tb testing.TB) *fuzzEnv {
	tb.Helper()
	core, logs := observer.New(zapcore.ErrorLevel)
	env := proxytest.Start(tb, proxytest.Options{
		// bcrypt.MinCost: every UserAdd and UserChangePassword hashes a password.
		Configure: func(c *embed.Config) { c.BcryptCost = 4 },
		Proxy:     func(c *proxy.Config) { c.Logger = zap.New(core) },
	})
	return &fuzzEnv{Env: env, logs: logs}
}

// checkNoPanic fails t if the proxy logged a panic since the last check; it forgets the other errors it logged.
func (e *fuzzEnv) checkNoPanic(t *testing.T) {
	t.Helper()
	for _, l := range e.logs.TakeAll() {
		if strings.Contains(l.Message, "panic") {
			t.Fatalf("the proxy panicked: %s %v", l.Message, l.ContextMap())
		}
	}
}

// statusOf is the status a call ended with, a stream's clean end (io.EOF) counting as OK.
func statusOf(err error) *status.Status {
	if errors.Is(err, io.EOF) {
		return status.New(codes.OK, "")
	}
	return status.Convert(err)
}

// sameStatus reports how the statuses of a call through the proxy and straight to etcd differ ("" if they do
// not): code and message. A proxy that ran out of time where etcd answered is reported as a hang.
func sameStatus(proxyErr, etcdErr error) string {
	p, e := statusOf(proxyErr), statusOf(etcdErr)
	if p.Code() == e.Code() && p.Message() == e.Message() {
		return ""
	}
	if p.Code() == codes.DeadlineExceeded {
		return fmt.Sprintf("the proxy hung: no answer before the deadline (%q), where etcd answered %v: %q", p.Message(),
			e.Code(), e.Message())
	}
	return fmt.Sprintf("the proxy answered %v: %q, etcd %v: %q", p.Code(), p.Message(), e.Code(), e.Message())
}

// received is one message of a stream, or the status it ended with.
type received[T any] struct {
	msg T
	err error
}

// recvLoop receives from a stream until it ends, passing on what keep accepts and the end, until ctx ends. Its
// caller cancels ctx and waits for the returned channel to close, so that no receiver outlives an input.
func recvLoop[T any](ctx context.Context, recv func() (T, error), keep func(T) bool, out chan<- received[T]) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			m, err := recv()
			if err == nil && !keep(m) {
				continue
			}
			select {
			case out <- received[T]{msg: m, err: err}:
			case <-ctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()
	return done
}

// next waits up to stepTimeout for the next message of in; ok is false if none came.
func next[T any](in <-chan received[T]) (r received[T], ok bool) {
	timer := time.NewTimer(stepTimeout)
	defer timer.Stop()
	select {
	case r = <-in:
		return r, true
	case <-timer.C:
		return r, false
	}
}
