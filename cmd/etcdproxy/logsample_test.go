package main

import (
	"fmt"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// TestLogSampling: the proxy's log keeps zap's production sampling: per second, the first 100 entries of a level and
// message, then every 100th; a message's budget is its own (another message, or the same at another level, is not
// held back by it) and is shared by a logger's children (With, Named); a new second starts a new budget; the level
// enabled is the wrapped core's.
func TestLogSampling(t *testing.T) {
	core, logs := observer.New(zapcore.InfoLevel)
	now := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	clock := &fixedClock{now: now}
	// A sampler whose random seed puts the three messages below in slots of their own (two in a slot share a
	// budget, by design: one chance in 1024 per pair).
	var sampled zapcore.Core
	for {
		sampled = newSampler(core)
		c := sampled.(*sampler).counts
		flood := c.slot(zapcore.InfoLevel, "flood")
		if flood != c.slot(zapcore.InfoLevel, "rare") && flood != c.slot(zapcore.WarnLevel, "flood") {
			break
		}
	}
	lg := zap.New(sampled, zap.WithClock(clock))
	child := lg.With(zap.String("k", "v")).Named("child")

	for range 1000 {
		lg.Info("flood")
	}
	for range 50 {
		child.Info("flood")
	}
	lg.Info("rare")
	lg.Warn("flood")
	lg.Debug("flood") // below the level
	count := func(level zapcore.Level, msg string) int {
		return logs.Filter(func(e observer.LoggedEntry) bool { return e.Level == level && e.Message == msg }).Len()
	}
	// 1050 floods: the first 100, then the 200th, 300th, ..., 1000th: 109.
	if got := count(zapcore.InfoLevel, "flood"); got != 109 {
		t.Errorf("1050 entries of one message in a second: %d written, want 109", got)
	}
	if count(zapcore.InfoLevel, "rare") != 1 || count(zapcore.WarnLevel, "flood") != 1 {
		t.Error("another message, or the same at another level, was held back by a flood")
	}
	if count(zapcore.DebugLevel, "flood") != 0 || !lg.Core().Enabled(zapcore.InfoLevel) ||
		lg.Core().Enabled(zapcore.DebugLevel) || zapcore.LevelOf(lg.Core()) != zapcore.InfoLevel {
		t.Error("the sampler does not keep the wrapped core's level")
	}

	clock.now = now.Add(time.Second)
	for range 100 {
		lg.Info("flood")
	}
	if got := count(zapcore.InfoLevel, "flood"); got != 209 {
		t.Errorf("a new second: %d more written of 100, want all", got-109)
	}

	// Distinct messages each have a budget of their own (those whose hashes share a slot share one: 20 entries).
	logs.TakeAll()
	clock.now = now.Add(2 * time.Second)
	for i := range 200 {
		for range 10 {
			lg.Info(fmt.Sprint("message ", i))
		}
	}
	if got := logs.Len(); got != 2000 {
		t.Errorf("200 messages, 10 entries each: %d written, want 2000", got)
	}
}

type fixedClock struct{ now time.Time }

func (c *fixedClock) Now() time.Time                         { return c.now }
func (c *fixedClock) NewTicker(d time.Duration) *time.Ticker { return time.NewTicker(d) }
