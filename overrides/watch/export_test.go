package watch

// SharedOffers is the number of fanned-out responses offered as shared parts so far (encoding.go).
func SharedOffers() int64 { return sharedOffers.Load() }
