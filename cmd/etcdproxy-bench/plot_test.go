package main

import (
	"encoding/xml"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// svgSummary parses an SVG document to its end (failing on any XML error) and returns the root element's name and
// namespace, each series group's name with its number of point markers, and every text.
func svgSummary(t *testing.T, doc string) (root xml.Name, points map[string]int, order []string, texts []string) {
	t.Helper()
	points = map[string]int{}
	dec := xml.NewDecoder(strings.NewReader(doc))
	var group string
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			return root, points, order, texts
		}
		if err != nil {
			t.Fatalf("not valid XML: %v\n%s", err, doc)
		}
		switch e := tok.(type) {
		case xml.StartElement:
			if root.Local == "" {
				root = e.Name
			}
			for _, a := range e.Attr {
				if e.Name.Local == "g" && a.Name.Local == "data-series" {
					group = a.Value
					order = append(order, group)
				}
			}
			if e.Name.Local == "circle" {
				points[group]++
			}
		case xml.EndElement:
			if e.Name.Local == "g" {
				group = ""
			}
		case xml.CharData:
			if s := strings.TrimSpace(string(e)); s != "" {
				texts = append(texts, s)
			}
		}
	}
}

func TestChartSVG(t *testing.T) {
	c := chart{title: `CPU <per> event & "more"`, xLabel: "watchers W", yLabel: "µs/event", series: []series{
		{name: grpcProxy, color: "#e07b00", points: []point{{1000, 12.3}, {10000, 6.6}, {100000, 7.1}}},
		{name: floorRelay, color: "#999999", dashed: true, points: []point{{1000, 3}, {10000, 2.5}}},
		{name: etcdproxy, color: "#1f5fbf", points: []point{{1000, 6}, {10000, 3.37}, {100000, 3.1}}},
	}}
	doc := c.svg()
	root, points, order, texts := svgSummary(t, doc)
	if root.Local != "svg" || root.Space != "http://www.w3.org/2000/svg" {
		t.Errorf("root element %v, want svg in the SVG namespace", root)
	}
	if want := []string{grpcProxy, floorRelay, etcdproxy}; !slices.Equal(order, want) {
		t.Errorf("series %v, want %v", order, want)
	}
	for name, n := range map[string]int{grpcProxy: 3, floorRelay: 2, etcdproxy: 3} {
		if points[name] != n {
			t.Errorf("series %s: %d points, want %d", name, points[name], n)
		}
	}
	for _, want := range []string{c.title, "watchers W", "µs/event", "1k", "10k", "100k", "etcdproxy: 3.37 at 10k"} {
		if !slices.Contains(texts, want) {
			t.Errorf("no text %q in %q", want, texts)
		}
	}
	if !strings.Contains(doc, `stroke-dasharray`) {
		t.Error("the floor's line is not dashed")
	}
	if c.svg() != doc {
		t.Error("the same chart rendered twice differs")
	}
}

// TestChartSVGEdges: one x, all-zero values, negative values: still a valid document with finite coordinates.
func TestChartSVGEdges(t *testing.T) {
	for _, c := range []chart{
		{title: "one x", series: []series{{name: "a", points: []point{{16, 5}}}}},
		{title: "zeros", series: []series{{name: "a", points: []point{{1, 0}, {4, 0}}}}},
		{title: "negative", series: []series{{name: "a", points: []point{{1, -0.3}, {4, 0.2}}}}},
		{title: "empty"},
	} {
		doc := c.svg()
		svgSummary(t, doc)
		if strings.Contains(doc, "NaN") || strings.Contains(doc, "Inf") {
			t.Errorf("%s: non-finite coordinate in\n%s", c.title, doc)
		}
	}
}

func TestNiceStep(t *testing.T) {
	for raw, want := range map[float64]float64{0: 1, 0.7: 1, 1: 1, 1.2: 2, 3: 5, 7: 10, 2400: 5000, 0.013: 0.02} {
		if got := niceStep(raw); got != want {
			t.Errorf("niceStep(%v) = %v, want %v", raw, got, want)
		}
	}
}

// TestPlotsFromResults: the plots read the table's cells of the workloads they name, one series per target with
// a value, and only plots with a point are written.
func TestPlotsFromResults(t *testing.T) {
	b := &bench{plan: newPlan(config{watchers100k: true})}
	add := func(name, tgt string, m metric, v float64) {
		for _, r := range b.results {
			if r.name == name {
				r.add(tgt, &measurement{samples: []sample{{metric: m, value: v}}}, nil)
				return
			}
		}
		r := newWorkloadResult(name)
		r.add(tgt, &measurement{samples: []sample{{metric: m, value: v}}}, nil)
		b.results = append(b.results, r)
	}
	for i, w := range []int{1000, 10000, 100000} {
		name := watchSpec{watchers: w, burst: true}.name()
		add(name, etcdproxy, mProxyCPU, float64(6-i))
		add(name, grpcProxy, mProxyCPU, float64(12-i))
	}
	for _, c := range []int{1, 4, 16, 64} {
		add(hotGetName(c, b.plan.hotKeys), floorCache, mOps, float64(1000*c))
		add(hotGetName(c, b.plan.hotKeys), etcdproxy, mOps, float64(900*c))
	}
	dir := t.TempDir()
	files, err := writePlots(dir, b.plots())
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range files {
		names = append(names, f.file)
	}
	if want := []string{"bench-watch-cpu.svg", "bench-clients-get.svg"}; !slices.Equal(names, want) {
		t.Fatalf("wrote %v, want %v (the plots with data)", names, want)
	}
	doc, err := os.ReadFile(filepath.Join(dir, "bench-clients-get.svg"))
	if err != nil {
		t.Fatal(err)
	}
	_, points, order, _ := svgSummary(t, string(doc))
	if want := []string{floorCache, etcdproxy}; !slices.Equal(order, want) || points[etcdproxy] != 4 {
		t.Errorf("get plot: series %v with %v points, want %v with 4 each", order, points, want)
	}
}

func TestFmtAxis(t *testing.T) {
	for _, c := range []struct {
		v, step float64
		want    string
	}{{15, 5, "15"}, {0, 5, "0"}, {0.4, 0.2, "0.4"}, {25000, 5000, "25000"}, {0.05, 0.01, "0.05"}, {3, 1, "3"}} {
		if got := fmtAxis(c.v, c.step); got != c.want {
			t.Errorf("fmtAxis(%v, %v) = %q, want %q", c.v, c.step, got, c.want)
		}
	}
}
