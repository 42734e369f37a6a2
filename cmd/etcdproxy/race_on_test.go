//go:build race

package main

// raceEnabled reports whether the tests run under the race detector: then the binary they start is built with it
// too.
const raceEnabled = true
