package main

import (
	"os"
	"path/filepath"
)

// The report's plots (issue #14 item 7): proxy CPU per event and proxy RSS against the number of watchers, and
// ops/s against the number of clients for put and for the cache-hit get. Each point is a cell of the table.

// plotFile is a written plot: its file name (next to the report) and its title.
type plotFile struct{ file, title string }

type namedChart struct {
	file  string
	chart chart
}

// Each target's line: the floors dashed, as they are references, not contenders.
var seriesStyle = map[string]struct {
	color  string
	dashed bool
}{
	direct:     {"#555555", false},
	grpcProxy:  {"#e07b00", false},
	floorRelay: {"#999999", true},
	floorCache: {"#2a9d8f", true},
	etcdproxy:  {"#1f5fbf", false},
}

// plots are the charts of this run's results; writePlots leaves out those with no point.
func (b *bench) plots() []namedChart {
	p := b.plan
	ws := p.watchers
	if p.bigWatchers > 0 {
		ws = append(ws[:len(ws):len(ws)], p.bigWatchers)
	}
	watch := func(w int) string { return watchSpec{watchers: w, burst: true}.name() }
	hot := func(c int) string { return hotGetName(c, p.hotKeys) }
	const byW, byC = "watchers W (one key, burst; log scale)", "clients C (log scale)"
	return []namedChart{
		{"bench-watch-cpu.svg", chartOf(b.results, "Proxy CPU per event delivered", byW, "proxy CPU µs/event",
			ws, watch, mProxyCPU)},
		{"bench-watch-rss.svg", chartOf(b.results, "Proxy peak RSS", byW, "proxy peak RSS MB", ws, watch, mProxyRSS)},
		{"bench-clients-put.svg", chartOf(b.results, "put: ops/s against clients", byC, "ops/s",
			p.putClients, putName, mOps)},
		{"bench-clients-get.svg", chartOf(b.results, "get serializable hot: ops/s against clients", byC, "ops/s",
			p.getClients, hot, mOps)},
	}
}

// chartOf is metric m of the workloads named name(x) for each x, one series per target that has a value.
func chartOf(results []*workloadResult, title, xLabel, yLabel string, xs []int, name func(int) string, m metric) chart {
	byName := map[string]*workloadResult{}
	for _, r := range results {
		byName[r.name] = r
	}
	c := chart{title: title, xLabel: xLabel, yLabel: yLabel}
	for _, t := range targetNames {
		s := series{name: t, color: seriesStyle[t].color, dashed: seriesStyle[t].dashed}
		for _, x := range xs {
			if r := byName[name(x)]; r != nil {
				if v, ok := r.value(m, t); ok {
					s.points = append(s.points, point{float64(x), v})
				}
			}
		}
		if len(s.points) > 0 {
			c.series = append(c.series, s)
		}
	}
	return c
}

// writePlots writes every chart with a point into dir.
func writePlots(dir string, charts []namedChart) ([]plotFile, error) {
	var out []plotFile
	for _, nc := range charts {
		if len(nc.chart.series) == 0 {
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, nc.file), []byte(nc.chart.svg()), 0o644); err != nil {
			return out, err
		}
		out = append(out, plotFile{file: nc.file, title: nc.chart.title})
	}
	return out, nil
}
