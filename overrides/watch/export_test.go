package watch

import "sync/atomic"

// sharedCount is what SharedOffers counts.
var sharedCount atomic.Int64

func init() {
	f := func() { sharedCount.Add(1) }
	onShared.Store(&f)
}

// SharedOffers is the number of fanned-out responses offered as shared parts so far (encoding.go).
func SharedOffers() int64 { return sharedCount.Load() }
