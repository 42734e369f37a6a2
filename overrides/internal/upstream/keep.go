// Package upstream owns how the overrides' long-lived upstream streams (the leader probe, the watch hub, the lease
// keepalive group, the read cache's invalidation watch) are opened and kept: on whose credentials (Creds, and the
// outgoing metadata with require-leader), shared by the clients with the same credentials (Pool), and reopened by
// one retry loop with backoff (Keep), so that a reconnect or credentials fix is made once. It must not know what
// a stream carries or what its end means: those, and each stream's metrics, stay with its override.
package upstream

import (
	"context"
	"time"

	"github.com/cenkalti/backoff/v5"
)

// Backoff bounds the wait between attempts.
type Backoff struct {
	// Min is the first wait after a failed attempt, and the wait again after an attempt that lasted longer than
	// Max; Max bounds the wait as quick failures repeat.
	Min, Max time.Duration
}

// jitter spreads the waits of many proxies that lost etcd at the same moment (±20%), so that they do not come
// back in step.
const jitter = 0.2

// Keep runs attempt until ctx ends. After each attempt that ends while ctx is live, ended (if not nil) gets its
// error; then the next attempt starts at once if attempt said fresh (its stream worked: the failure is new, not
// a repeat), else after a wait that doubles, with jitter, from b.Min to b.Max while attempts keep failing, and
// starts again from b.Min after an attempt that lasted longer than b.Max.
func Keep(ctx context.Context, b Backoff, attempt func() (fresh bool, err error), ended func(error)) {
	eb := &backoff.ExponentialBackOff{InitialInterval: b.Min, MaxInterval: b.Max, Multiplier: 2,
		RandomizationFactor: jitter}
	eb.Reset()
	for ctx.Err() == nil {
		start := time.Now()
		fresh, err := attempt()
		if ctx.Err() != nil {
			return
		}
		if ended != nil {
			ended(err)
		}
		if fresh {
			eb.Reset()
			continue
		}
		if since(start) > b.Max {
			eb.Reset()
		}
		if !wait(ctx, eb.NextBackOff()) {
			return
		}
	}
}

// wait waits d and says true, or says false as soon as ctx ends; since is time.Since. Variables so that a test can
// record the waits Keep asks for and take its attempts as lasting no time (export_test.go), instead of measuring
// the waits, and the attempts that decide them, with the clock of a machine too busy to keep to either.
var (
	wait = func(ctx context.Context, d time.Duration) bool {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
			return true
		}
	}
	since = time.Since
)
