package main

import (
	"hash/maphash"
	"sync/atomic"
	"time"

	"go.uber.org/zap/zapcore"
)

// The proxy's log is sampled as zap's production configuration samples it (and etcd's logger): in each second, the
// first logSampleFirst entries of a level and message are written, then every logSampleThereafter-th. zap's own
// sampler keeps its counters in a fixed table of 4096 per level, 458 KB that every process holds whatever it logs:
// a quarter of an idle proxy's live heap, and so about twice that in RSS once the GC paces itself by it. This one
// keeps logSampleSlots counters for every level (16 KiB). Two messages whose (level, message) hashes fall in one
// slot share a budget, as two messages in one of zap's per-level slots do: with a few dozen distinct messages
// logged in a second, one pair in a few thousand.

const (
	logSampleTick       = time.Second
	logSampleFirst      = 100
	logSampleThereafter = 100
	logSampleSlots      = 1024
)

// sampler is a zapcore.Core that drops the entries above the budget of their level and message (above).
type sampler struct {
	zapcore.Core
	counts *sampleCounts
}

type sampleCounts struct {
	seed  maphash.Seed
	slots [logSampleSlots]sampleCount
}

// sampleCount counts the entries of a slot since start (UnixNano), the start of its current tick.
type sampleCount struct {
	start atomic.Int64
	n     atomic.Uint64
}

func newSampler(core zapcore.Core) zapcore.Core {
	return &sampler{Core: core, counts: &sampleCounts{seed: maphash.MakeSeed()}}
}

func (s *sampler) With(fields []zapcore.Field) zapcore.Core {
	return &sampler{Core: s.Core.With(fields), counts: s.counts} // one budget for a logger and its children
}

// Level reports the level of the core it wraps (zapcore.LevelOf asks for it).
func (s *sampler) Level() zapcore.Level { return zapcore.LevelOf(s.Core) }

func (s *sampler) Check(ent zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if !s.Enabled(ent.Level) {
		return ce
	}
	if n := s.counts.add(ent); n > logSampleFirst && (n-logSampleFirst)%logSampleThereafter != 0 {
		return ce
	}
	return s.Core.Check(ent, ce)
}

// slot returns the counter of level and message.
func (c *sampleCounts) slot(level zapcore.Level, message string) *sampleCount {
	var h maphash.Hash
	h.SetSeed(c.seed)
	h.WriteByte(byte(level))
	h.WriteString(message)
	return &c.slots[h.Sum64()%logSampleSlots]
}

// add counts ent in its slot and returns its number in the slot's current tick (1 for the first).
func (c *sampleCounts) add(ent zapcore.Entry) uint64 {
	slot := c.slot(ent.Level, ent.Message)
	now := ent.Time.UnixNano()
	start := slot.start.Load()
	if now < start+int64(logSampleTick) {
		return slot.n.Add(1)
	}
	// A new tick: the first entry to move start begins it; one that lost the race counts in it.
	if slot.start.CompareAndSwap(start, now) {
		slot.n.Store(1)
		return 1
	}
	return slot.n.Add(1)
}
