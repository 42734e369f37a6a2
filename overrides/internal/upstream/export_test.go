package upstream

import (
	"context"
	"time"
)

// OnWait makes Keep, until the test ends, call asked with each wait it asks for before it waits it (as it does
// otherwise), and take every attempt as lasting no time, so that a busy machine that holds an attempt up does not
// start the backoff over. Keep must not run elsewhere meanwhile (wait and since are read with no lock).
func OnWait(t interface{ Cleanup(func()) }, asked func(time.Duration)) {
	wasWait, wasSince := wait, since
	wait = func(ctx context.Context, d time.Duration) bool {
		asked(d)
		return wasWait(ctx, d)
	}
	since = func(time.Time) time.Duration { return 0 }
	t.Cleanup(func() { wait, since = wasWait, wasSince })
}
