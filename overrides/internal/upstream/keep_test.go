package upstream_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/overrides/internal/upstream"
)

// TestKeepBacksOff: quick failures wait longer and longer (within Max, with jitter), a fresh end retries at once
// and starts the backoff over, and Keep returns when its context ends, without a last ended call.
func TestKeepBacksOff(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	b := upstream.Backoff{Min: 10 * time.Millisecond, Max: 80 * time.Millisecond}
	var starts []time.Time
	var ends int
	fail := errors.New("down")
	upstream.Keep(ctx, b, func() (bool, error) {
		starts = append(starts, time.Now())
		if len(starts) == 8 {
			cancel()
		}
		return len(starts) == 5, fail // the fifth attempt "worked"
	}, func(err error) {
		if !errors.Is(err, fail) {
			t.Errorf("ended with %v", err)
		}
		ends++
	})
	if len(starts) != 8 || ends != 7 {
		t.Fatalf("%d attempts, %d ends; want 8 and 7", len(starts), ends)
	}
	waits := make([]time.Duration, 0, len(starts)-1)
	for i := 1; i < len(starts); i++ {
		waits = append(waits, starts[i].Sub(starts[i-1]))
	}
	// Waits 1-4: growing backoff (10, 20, 40, 80 ms ±20%); after the fresh fifth attempt: none; then 10 ms again.
	for i, w := range waits[:4] {
		want := b.Min << i
		if w < want*8/10 || w > want*12/10+30*time.Millisecond {
			t.Errorf("wait %d: %v, want about %v", i+1, w, want)
		}
	}
	if waits[4] > 5*time.Millisecond {
		t.Errorf("after a fresh end the next attempt waited %v", waits[4])
	}
	if waits[5] > 2*b.Min+30*time.Millisecond {
		t.Errorf("the backoff did not start over after a fresh end: waited %v", waits[5])
	}
}
