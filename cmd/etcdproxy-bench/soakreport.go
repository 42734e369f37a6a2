package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// trend is the verdict on one sampled quantity: after the warm-up, the median of the last third of the samples
// against the median of the first third, and the least-squares slope over all of them.
type trend struct {
	name        string
	unit        string
	first, last float64 // medians of the first and last thirds
	perHour     float64 // slope, per hour
	allowed     float64 // the last third's median may be at most this
	ok          bool
}

// trendOf judges ys sampled at ats (after warm): flat when last ≤ first·(1+rel) + abs. Fewer than 6 samples after
// the warm-up cannot show a trend: that is not flat either.
func trendOf(name, unit string, ats []time.Duration, ys []float64, warm time.Duration, rel, abs float64) trend {
	t := trend{name: name, unit: unit}
	var xs, vs []float64
	for i, at := range ats {
		if at >= warm {
			xs, vs = append(xs, at.Hours()), append(vs, ys[i])
		}
	}
	if len(vs) < 6 {
		return t
	}
	third := len(vs) / 3
	t.first, t.last = medianOf(vs[:third]), medianOf(vs[len(vs)-third:])
	t.allowed = t.first*(1+rel) + abs
	t.ok = t.last <= t.allowed
	t.perHour = slope(xs, vs)
	return t
}

// slope is the least-squares slope of vs against xs.
func slope(xs, vs []float64) float64 {
	var mx, mv float64
	for i := range xs {
		mx, mv = mx+xs[i], mv+vs[i]
	}
	n := float64(len(xs))
	mx, mv = mx/n, mv/n
	var num, den float64
	for i := range xs {
		num += (xs[i] - mx) * (vs[i] - mv)
		den += (xs[i] - mx) * (xs[i] - mx)
	}
	if den == 0 {
		return 0
	}
	return num / den
}

func (t trend) String() string {
	verdict := "flat"
	if !t.ok {
		verdict = "GROWING"
		if t.allowed == 0 {
			verdict = "too few samples after the warm-up"
		}
	}
	unit := ""
	if t.unit != "" {
		unit = " " + t.unit
	}
	return fmt.Sprintf("%s: median %s%s in the first third, %s in the last (allowed ≤ %s); slope %+.1f%s/h: %s",
		t.name, fmtNum(t.first), unit, fmtNum(t.last), fmtNum(t.allowed), t.perHour, unit, verdict)
}

// warmUp is the start of the run the trend leaves out: the caches, pools and the runtime's heap settle.
func warmUp(d time.Duration) time.Duration { return max(time.Minute, d/10) }

// report judges the run, writes the CSV, the plots and the summary, and fails when a check failed.
func (s *soak) report(res *soakResult) error {
	var ats []time.Duration
	var rss, gor []float64
	for _, smp := range res.samples {
		ats = append(ats, smp.at)
		rss, gor = append(rss, float64(smp.rss)/(1<<20)), append(gor, float64(smp.goroutines))
	}
	warm := warmUp(s.cfg.duration)
	trends := []trend{
		trendOf("RSS", "MiB", ats, rss, warm, 0.10, 16),
		trendOf("goroutines", "", ats, gor, warm, 0.05, 20),
	}
	for _, t := range trends {
		if !t.ok {
			res.failures = append(res.failures, t.String())
		}
	}
	summary := s.summary(res, trends)
	fmt.Print(summary)
	if s.cfg.out != "" {
		if err := s.writeOutputs(res, ats, rss, gor, summary); err != nil {
			return err
		}
	}
	if len(res.failures) > 0 {
		return fmt.Errorf("soak failed: %d checks (see the summary)", len(res.failures))
	}
	return nil
}

func (s *soak) writeOutputs(res *soakResult, ats []time.Duration, rss, gor []float64, summary string) error {
	if err := os.MkdirAll(s.cfg.out, 0o755); err != nil {
		return err
	}
	var csv strings.Builder
	csv.WriteString("seconds,rss_bytes,goroutines,events,puts,reads\n")
	for _, smp := range res.samples {
		fmt.Fprintf(&csv, "%.0f,%d,%d,%d,%d,%d\n", smp.at.Seconds(), smp.rss, smp.goroutines, smp.events, smp.puts, smp.reads)
	}
	files := map[string]string{
		"soak.csv": csv.String(),
		"soak.md":  summary,
	}
	var kills []float64 // minutes
	for _, e := range s.events.all() {
		if e.kill {
			kills = append(kills, e.at.Sub(res.started).Minutes())
		}
	}
	for name, c := range map[string]chart{
		"soak-rss.svg":        timeChart("etcdproxy RSS during the soak", "RSS MiB", "etcdproxy", ats, rss),
		"soak-goroutines.svg": timeChart("etcdproxy goroutines during the soak", "goroutines", "etcdproxy", ats, gor),
	} {
		c.marks, c.marksLabel = kills, "member killed"
		files[name] = c.svg()
	}
	for name, body := range files {
		p := filepath.Join(s.cfg.out, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			return err
		}
		logf("wrote %s", p)
	}
	return nil
}

func timeChart(title, yLabel, name string, ats []time.Duration, ys []float64) chart {
	sr := series{name: name, color: "#d62728"}
	for i, at := range ats {
		sr.points = append(sr.points, point{x: at.Minutes(), y: ys[i]})
	}
	return chart{title: title, xLabel: "minutes", yLabel: yLabel, series: []series{sr}, linearX: true}
}

// summary is the run's Markdown summary.
func (s *soak) summary(res *soakResult, trends []trend) string {
	var b strings.Builder
	c := s.cfg
	fmt.Fprintf(&b, "## Soak: %v, %s\n\n", c.duration, res.started.UTC().Format("2006-01-02 15:04 UTC"))
	fmt.Fprintf(&b, "Machine: %s, %s; load average after: %s.\n\n", cpuModel(), memTotal(), loadAvg())
	fmt.Fprintf(&b, "One etcdproxy process in front of three etcd members (processes). Load: %d watchers of %d keys "+
		"(100 per stream, 10 connections), %d leases (TTL %d s) renewed every TTL/3 over %d keepalive streams, "+
		"%d puts/s and %d serializable reads/s through the proxy; a member killed and restarted every %v, a "+
		"compaction every %v. Samples every %v; the trend leaves out the first %v.\n\n",
		c.watchers, c.keys, c.leases, c.leaseTTL, (c.leases+leasesPerStream-1)/leasesPerStream, c.writeRate,
		c.readRate, c.restartEvery, c.compactEvery, c.sampleEvery, warmUp(c.duration))
	putFail, putCodes := res.puts.failures()
	readFail, readCodes := res.reads.failures()
	rows := [][2]string{
		{"wall time of the load", res.wall.Round(time.Second).String()},
		{"samples", fmt.Sprint(len(res.samples))},
		{"puts through the proxy (failed: codes)", fmt.Sprintf("%d (%d: %s)", res.puts.ok.Load(), putFail, putCodes)},
		{"serializable reads through the proxy (failed: codes)", fmt.Sprintf("%d (%d: %s)", res.reads.ok.Load(), readFail, readCodes)},
		{"reads not self-consistent (must be 0)", fmt.Sprint(res.badReads.Load())},
		{"events delivered to the watchers", fmt.Sprint(res.events)},
		{"watchers whose events differ from etcd's own watch (must be 0)", fmt.Sprint(res.watchMismatch)},
		{"keepalive replies (streams reopened)", fmt.Sprintf("%d (%d)", res.leaseReplies, res.leaseReconnects)},
		{"etcd revision at the end", fmt.Sprint(res.etcdRevisionAtEnd)},
	}
	for _, name := range soakProxyMetrics {
		if v, ok := res.proxyMetrics[name]; ok {
			rows = append(rows, [2]string{"proxy: " + name, fmtNum(v)})
		}
	}
	b.WriteString("| | |\n|---|---|\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %s |\n", r[0], strings.ReplaceAll(r[1], "|", `\|`))
	}
	b.WriteString("\n")
	for _, t := range trends {
		fmt.Fprintf(&b, "- %s\n", t)
	}
	for _, n := range res.notes {
		fmt.Fprintf(&b, "- %s\n", n)
	}
	b.WriteString("\nWhat the soak did to the cluster:\n\n")
	for _, e := range s.events.all() {
		fmt.Fprintf(&b, "- %s (at %v) %s\n", e.at.UTC().Format("15:04:05"), e.at.Sub(res.started).Round(time.Second), e.what)
	}
	if len(res.failures) == 0 {
		b.WriteString("\n**Every check passed.**\n")
	} else {
		fmt.Fprintf(&b, "\n**%d checks failed:**\n\n", len(res.failures))
		for _, f := range res.failures {
			fmt.Fprintf(&b, "- %s\n", f)
		}
	}
	return b.String()
}
