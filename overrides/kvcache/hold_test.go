package kvcache

import (
	"testing"
	"time"
)

// TestLinearizableHoldDecision: which batches are held back after a barrier returns, and for how many reads.
func TestLinearizableHoldDecision(t *testing.T) {
	for _, tc := range []struct {
		name            string
		served, waiting int // the barrier's reads; the reads that joined the next batch meanwhile (-1: none)
		hold            int // 0: not held
	}{
		{name: "one client reading in a loop is never held", served: 1, waiting: -1},
		{name: "nothing waits, several were served: held for them", served: 5, waiting: -1, hold: 5},
		{name: "some wait: held for those and the served", served: 3, waiting: 2, hold: 5},
		{name: "one served, one waiting: held for both", served: 1, waiting: 1, hold: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := &KV{}
			k.batches.rtt = 100 * time.Microsecond
			if tc.waiting >= 0 {
				k.batches.next = &batch{reads: tc.waiting, done: make(chan struct{})}
			}
			k.batches.mu.Lock()
			k.holdLocked(tc.served, time.Now())
			hold, held := k.batches.hold, k.batches.holdEnd
			k.batches.mu.Unlock()
			if k.batches.holdT != nil {
				k.batches.holdT.Stop()
			}
			if hold != tc.hold {
				t.Errorf("hold for %d reads, want %d", hold, tc.hold)
			}
			if tc.hold > 0 && time.Until(held) > holdRTTs*k.batches.rtt {
				t.Errorf("held until %v from now, more than %d round trips", time.Until(held), holdRTTs)
			}
		})
	}
}
