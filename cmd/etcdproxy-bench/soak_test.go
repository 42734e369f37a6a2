package main

import (
	"math"
	"slices"
	"strings"
	"testing"
	"time"
)

// samplesOf returns n samples 10 s apart with y = f(i).
func samplesOf(n int, f func(i int) float64) ([]time.Duration, []float64) {
	var ats []time.Duration
	var ys []float64
	for i := range n {
		ats, ys = append(ats, time.Duration(i)*10*time.Second), append(ys, f(i))
	}
	return ats, ys
}

func TestTrend(t *testing.T) {
	warm := time.Minute // the first 6 samples
	for _, tc := range []struct {
		name string
		f    func(i int) float64
		ok   bool
	}{
		{"flat", func(int) float64 { return 100 }, true},
		{"a sawtooth (GC) around a flat mean", func(i int) float64 { return 100 + float64(i%4)*8 }, true},
		{"growth inside the slack", func(i int) float64 { return 100 + float64(i)*0.05 }, true},
		{"a leak", func(i int) float64 { return 100 + float64(i) }, false},
		// A warm-up spike is left out; a late spike of one sample does not move a median.
		{"warm-up spike", func(i int) float64 { return map[bool]float64{true: 500, false: 100}[i < 5] }, true},
		{"one late spike", func(i int) float64 { return map[bool]float64{true: 900, false: 100}[i == 50] }, true},
		{"a step up that stays", func(i int) float64 { return map[bool]float64{true: 150, false: 100}[i > 40] }, false},
	} {
		ats, ys := samplesOf(66, tc.f)
		tr := trendOf("RSS", "MiB", ats, ys, warm, 0.10, 5)
		if tr.ok != tc.ok {
			t.Errorf("%s: ok=%v, want %v (%s)", tc.name, tr.ok, tc.ok, tr)
		}
	}
	ats, ys := samplesOf(10, func(int) float64 { return 1 })
	if tr := trendOf("RSS", "MiB", ats, ys, warm, 0.1, 5); tr.ok || !strings.Contains(tr.String(), "too few samples") {
		t.Errorf("4 samples after the warm-up judged: %s", tr)
	}
	ats, ys = samplesOf(366, func(i int) float64 { return 50 + float64(i)/360*12 }) // 12 per hour
	if tr := trendOf("g", "", ats, ys, warm, 0.1, 5); math.Abs(tr.perHour-12) > 0.01 {
		t.Errorf("slope %v per hour, want 12", tr.perHour)
	}
}

func TestTally(t *testing.T) {
	var a, b tally
	for _, r := range []int64{3, 5, 9} {
		if !a.add(r) {
			t.Fatalf("revision %d after %d refused", r, a.last)
		}
	}
	if a.add(9) {
		t.Error("a duplicate revision was accepted")
	}
	for _, r := range []int64{3, 9, 5} {
		b.add(r)
	}
	if a.count != 4 || b.count != 3 {
		t.Errorf("counts %d, %d", a.count, b.count)
	}
	// Same revisions in another order: a different digest, so a reordering cannot pass as exactly once.
	var c tally
	for _, r := range []int64{3, 5, 9} {
		c.add(r)
	}
	if b.digest == c.digest || b.last != c.last {
		t.Errorf("digests of 3,9,5 and 3,5,9 equal (%x) or lasts differ (%d, %d)", b.digest, b.last, c.last)
	}
}

// TestTimeChartSVG: a linear time axis, ticked at round minutes, with no per-point markers.
func TestTimeChartSVG(t *testing.T) {
	ats, ys := samplesOf(361, func(i int) float64 { return 40 + float64(i%7) })
	c := timeChart("RSS", "RSS MiB", "etcdproxy RSS", ats, ys)
	c.marks, c.marksLabel = []float64{5, 25, 61}, "member killed" // 61: after the last sample, not drawn
	doc := c.svg()
	if n := strings.Count(doc, `stroke-dasharray="2 3"`); n != 3 {
		t.Errorf("%d mark lines (with the legend's), want 2 + 1", n)
	}
	_, points, order, texts := svgSummary(t, doc)
	if !slices.Equal(order, []string{"etcdproxy RSS"}) || points["etcdproxy RSS"] != 0 {
		t.Errorf("series %v with %v markers, want one series without markers", order, points)
	}
	for _, want := range []string{"minutes", "RSS MiB", "0", "10", "30", "60", "member killed"} {
		if !slices.Contains(texts, want) {
			t.Errorf("no text %q in %q", want, texts)
		}
	}
	if strings.Contains(doc, "NaN") || strings.Contains(doc, "Inf") {
		t.Error("non-finite coordinate")
	}
	if n := strings.Count(doc, ","); n < 361 {
		t.Errorf("polyline has %d coordinates, want every sample", n)
	}
}
