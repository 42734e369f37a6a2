package upstream_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/overrides/internal/upstream"
)

// TestKeepBacksOff: quick failures wait longer and longer (within Max, with jitter), a fresh end retries at once
// and starts the backoff over, and Keep returns when its context ends, without a last ended call. The waits checked
// are those Keep asks for (OnWait), not those a busy machine measures; the clock only shows that each was waited.
func TestKeepBacksOff(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	b := upstream.Backoff{Min: 10 * time.Millisecond, Max: 80 * time.Millisecond}
	var starts []time.Time
	type wait struct { // exported fields, which fmt prints with their String methods
		After int // the attempt the wait followed, from 1
		D     time.Duration
	}
	var waits []wait
	upstream.OnWait(t, func(d time.Duration) { waits = append(waits, wait{len(starts), d}) })
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
	// After attempts 1-4: growing backoff (10, 20, 40, 80 ms ±20%); after the fresh fifth attempt: none; after the
	// sixth and seventh: 10 and 20 ms again; after the eighth, which ended the context: none.
	want := []wait{{1, b.Min}, {2, 2 * b.Min}, {3, 4 * b.Min}, {4, 8 * b.Min}, {6, b.Min}, {7, 2 * b.Min}}
	if len(waits) != len(want) {
		t.Fatalf("waits asked for (after attempt, wait): %v; want about %v", waits, want)
	}
	for i, w := range waits {
		// ±20%, and a µs for the backoff's rounding.
		lo, hi := want[i].D*8/10-time.Microsecond, want[i].D*12/10+time.Microsecond
		if w.After != want[i].After || w.D < lo || w.D > hi {
			t.Errorf("wait %d: %v after attempt %d, want %v-%v after attempt %d", i+1, w.D, w.After, lo, hi, want[i].After)
		}
		if w.After >= len(starts) {
			continue
		}
		if got := starts[w.After].Sub(starts[w.After-1]); got < w.D {
			t.Errorf("attempt %d started %v after attempt %d, before the %v wait was over", w.After+1, got, w.After, w.D)
		}
	}
}
