package main

import (
	"encoding/xml"
	"fmt"
	"math"
	"slices"
	"strings"
)

// A small SVG line-chart writer for the report's plots: a few series of (x, y) points, x on a log scale (watchers,
// clients: each point several times the last), y linear from 0. Hand-written so that the benchmark needs no
// plotting dependency and its output is byte-stable for the same numbers (committed next to BENCHMARKS.md).

type chart struct {
	title, xLabel, yLabel string
	series                []series
	// linearX puts x on a linear scale from its least to its greatest value, ticked at round steps (time series);
	// points then carry no marker of their own.
	linearX bool
	// marks are xs where something happened, drawn as grey vertical lines with one legend entry, marksLabel.
	marks      []float64
	marksLabel string
}

type series struct {
	name   string
	color  string
	dashed bool
	points []point // in increasing x
}

type point struct{ x, y float64 }

// The canvas, in SVG user units.
const (
	plotW, plotH                        = 720, 420
	padLeft, padRight, padTop, padBelow = 76, 150, 44, 56
)

// svg renders c as a standalone SVG document.
func (c chart) svg() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, `<?xml version="1.0" encoding="UTF-8"?>`+"\n"+
		`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n",
		plotW, plotH, plotW, plotH)
	fmt.Fprintf(&sb, `<rect width="%d" height="%d" fill="white"/>`+"\n", plotW, plotH)
	fmt.Fprintf(&sb, `<text x="%d" y="24" text-anchor="middle" font-size="14" font-weight="bold">%s</text>`+"\n",
		padLeft+(plotW-padLeft-padRight)/2, esc(c.title))
	sx, sy, yTicks := c.scales()
	c.axes(&sb, sx, sy, yTicks)
	for i, s := range c.series {
		s.render(&sb, sx, sy, c.linearX)
		s.legend(&sb, i)
	}
	c.renderMarks(&sb, sx)
	sb.WriteString("</svg>\n")
	return sb.String()
}

// scales maps data to canvas coordinates: x by log10 over the distinct xs (a single x sits in the middle), y
// linearly from 0 (or the least y, if below 0) to a round number above the greatest y; yTicks are its ticks.
func (c chart) scales() (sx, sy func(float64) float64, yTicks []float64) {
	xs := c.xs()
	left, width := float64(padLeft), float64(plotW-padLeft-padRight)
	inner := width * 0.05 // so that the first and last points do not sit on the axes
	scale := math.Log10
	if c.linearX {
		scale = func(x float64) float64 { return x }
	}
	lo, hi := 0.0, 1.0
	if len(xs) > 0 {
		lo, hi = scale(xs[0]), scale(xs[len(xs)-1])
	}
	sx = func(x float64) float64 {
		if hi == lo {
			return left + width/2
		}
		return left + inner + (scale(x)-lo)/(hi-lo)*(width-2*inner)
	}
	ymin, ymax := 0.0, 0.0
	for _, s := range c.series {
		for _, p := range s.points {
			ymin, ymax = min(ymin, p.y), max(ymax, p.y)
		}
	}
	step := niceStep((ymax - ymin) / 5)
	ymin, ymax = math.Floor(ymin/step)*step, math.Ceil(ymax/step)*step
	if ymax == ymin {
		ymax = ymin + step
	}
	for i := 0; ymin+float64(i)*step <= ymax+step/2; i++ {
		yTicks = append(yTicks, ymin+float64(i)*step) // not by adding steps up: no 0.6000000001
	}
	top, height := float64(padTop), float64(plotH-padTop-padBelow)
	sy = func(y float64) float64 { return top + height - (y-ymin)/(ymax-ymin)*height }
	return sx, sy, yTicks
}

// xs is every distinct x, sorted; positive ones only on a log scale (it has no place for x <= 0).
func (c chart) xs() []float64 {
	var xs []float64
	for _, s := range c.series {
		for _, p := range s.points {
			if (p.x > 0 || c.linearX) && !slices.Contains(xs, p.x) {
				xs = append(xs, p.x)
			}
		}
	}
	slices.Sort(xs)
	return xs
}

// xTicks are the data's xs on a log scale, and round steps across them on a linear one.
func (c chart) xTicks() []float64 {
	xs := c.xs()
	if !c.linearX || len(xs) < 2 {
		return xs
	}
	lo, hi := xs[0], xs[len(xs)-1]
	step := niceStep((hi - lo) / 8)
	var ticks []float64
	for i := math.Ceil(lo / step); i*step <= hi; i++ {
		ticks = append(ticks, i*step)
	}
	return ticks
}

// niceStep rounds raw up to 1, 2 or 5 times a power of ten.
func niceStep(raw float64) float64 {
	if raw <= 0 || math.IsNaN(raw) || math.IsInf(raw, 0) {
		return 1
	}
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5} {
		if raw <= m*mag {
			return m * mag
		}
	}
	return 10 * mag
}

// axes draws the frame, the y grid with its labels, the x ticks at the data's xs, and the axis labels.
func (c chart) axes(sb *strings.Builder, sx, sy func(float64) float64, yTicks []float64) {
	x0, x1 := float64(padLeft), float64(plotW-padRight)
	y0, y1 := float64(padTop), float64(plotH-padBelow)
	step := 1.0
	if len(yTicks) > 1 {
		step = yTicks[1] - yTicks[0]
	}
	for _, v := range yTicks {
		y := sy(v)
		fmt.Fprintf(sb, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#dddddd"/>`+"\n", x0, y, x1, y)
		fmt.Fprintf(sb, `<text x="%.1f" y="%.1f" text-anchor="end">%s</text>`+"\n", x0-6, y+4, esc(fmtAxis(v, step)))
	}
	for _, x := range c.xTicks() {
		px := sx(x)
		fmt.Fprintf(sb, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", px, y1, px, y1+5)
		fmt.Fprintf(sb, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n", px, y1+19, esc(fmtTick(x)))
	}
	fmt.Fprintf(sb, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="none" stroke="black"/>`+"\n",
		x0, y0, x1-x0, y1-y0)
	fmt.Fprintf(sb, `<text x="%.1f" y="%d" text-anchor="middle">%s</text>`+"\n", (x0+x1)/2, plotH-12, esc(c.xLabel))
	fmt.Fprintf(sb, `<text x="16" y="%.1f" text-anchor="middle" transform="rotate(-90 16 %.1f)">%s</text>`+"\n",
		(y0+y1)/2, (y0+y1)/2, esc(c.yLabel))
}

// fmtAxis writes a y tick with the decimals its step needs: 0 5 10, or 0 0.2 0.4.
func fmtAxis(v, step float64) string {
	decimals := max(0, int(-math.Floor(math.Log10(step)+1e-9)))
	return fmt.Sprintf("%.*f", decimals, v)
}

// fmtTick writes thousands as k: 1k, 10k, 100k.
func fmtTick(x float64) string {
	if x >= 1000 && math.Mod(x, 1000) == 0 {
		return fmt.Sprintf("%gk", x/1000)
	}
	return fmt.Sprintf("%g", x)
}

// render draws s as a line through its points, with a marker and a tooltip at each (none on a linear x scale: a
// time series has too many points for them).
func (s series) render(sb *strings.Builder, sx, sy func(float64) float64, linear bool) {
	fmt.Fprintf(sb, `<g class="series" data-series="%s">`+"\n", esc(s.name))
	var pts []string
	for _, p := range s.points {
		pts = append(pts, fmt.Sprintf("%.1f,%.1f", sx(p.x), sy(p.y)))
	}
	dash := ""
	if s.dashed {
		dash = ` stroke-dasharray="6 4"`
	}
	fmt.Fprintf(sb, `<polyline points="%s" fill="none" stroke="%s" stroke-width="2"%s/>`+"\n",
		strings.Join(pts, " "), s.color, dash)
	for _, p := range s.points {
		if linear {
			break
		}
		fmt.Fprintf(sb, `<circle cx="%.1f" cy="%.1f" r="3.5" fill="%s"><title>%s</title></circle>`+"\n",
			sx(p.x), sy(p.y), s.color, esc(fmt.Sprintf("%s: %s at %s", s.name, fmtNum(p.y), fmtTick(p.x))))
	}
	sb.WriteString("</g>\n")
}

// legend writes s's entry, the i-th, right of the plot.
func (s series) legend(sb *strings.Builder, i int) {
	x, y := float64(plotW-padRight+14), float64(padTop+10+i*22)
	dash := ""
	if s.dashed {
		dash = ` stroke-dasharray="6 4"`
	}
	fmt.Fprintf(sb, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="2"%s/>`+"\n",
		x, y, x+24, y, s.color, dash)
	fmt.Fprintf(sb, `<text x="%.1f" y="%.1f">%s</text>`+"\n", x+30, y+4, esc(s.name))
}

// renderMarks draws c's marks inside the plot and their legend entry below the series'.
func (c chart) renderMarks(sb *strings.Builder, sx func(float64) float64) {
	if len(c.marks) == 0 {
		return
	}
	const color = "#888888"
	y0, y1 := float64(padTop), float64(plotH-padBelow)
	sb.WriteString(`<g class="marks">` + "\n")
	xs := c.xs()
	for _, x := range c.marks {
		if len(xs) == 0 || x < xs[0] || x > xs[len(xs)-1] {
			continue // outside the data: off the plot
		}
		fmt.Fprintf(sb, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-dasharray="2 3"/>`+"\n",
			sx(x), y0, sx(x), y1, color)
	}
	sb.WriteString("</g>\n")
	lx, ly := float64(plotW-padRight+14), float64(padTop+10+len(c.series)*22)
	fmt.Fprintf(sb, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-dasharray="2 3"/>`+"\n",
		lx+12, ly-8, lx+12, ly+8, color)
	fmt.Fprintf(sb, `<text x="%.1f" y="%.1f">%s</text>`+"\n", lx+30, ly+4, esc(c.marksLabel))
}

// esc escapes s for XML text and attribute values.
func esc(s string) string {
	var sb strings.Builder
	_ = xml.EscapeText(&sb, []byte(s)) // a strings.Builder does not fail
	return sb.String()
}
