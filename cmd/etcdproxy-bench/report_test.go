package main

import (
	"encoding/json"
	"errors"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func result(name, floor string, cells map[string]float64, m metric) *workloadResult {
	r := newWorkloadResult(name)
	if floor != "" {
		r.floor = floor
	}
	for tgt, v := range cells {
		r.add(tgt, &measurement{samples: []sample{{metric: m, value: v}}}, nil)
	}
	return r
}

// TestTableFloorColumn: every row has the five targets and three ratios; etcdproxy/floor divides by floorrelay,
// or by floorcache where the workload says so; a target a workload does not run reads n/a.
func TestTableFloorColumn(t *testing.T) {
	fwd := result("put C=1", "", map[string]float64{direct: 1000, grpcProxy: 700, floorRelay: 800, etcdproxy: 600}, mOps)
	hit := result("get hot", floorCache, map[string]float64{direct: 10000, floorRelay: 6000, floorCache: 20000,
		etcdproxy: 15000}, mOps)
	table := renderTable([]*workloadResult{fwd, hit})
	lines := strings.Split(strings.TrimSpace(table), "\n")
	if len(lines) != 4 {
		t.Fatalf("table:\n%s", table)
	}
	for _, l := range lines {
		if n := strings.Count(l, "|"); n != 12 {
			t.Errorf("%d cell borders, want 12 (11 columns): %s", n, l)
		}
	}
	for _, want := range []string{
		"| **put C=1** | ops/s ↑ | 1000 | 700 | 800 | n/a | 600 | 0.60× | 0.86× | 0.75× | 0.75× |",
		"| **get hot** | ops/s ↑ | 10000 | n/a | 6000 | 20000 | 15000 | 1.50× | — | 0.75× | 0.75× |",
	} {
		if !strings.Contains(table, want) {
			t.Errorf("no row %q in\n%s", want, table)
		}
	}
	js, err := jsonLines(meta{}, []*workloadResult{hit})
	if err != nil {
		t.Fatal(err)
	}
	var l jsonLine
	if err := json.Unmarshal([]byte(js[1]), &l); err != nil {
		t.Fatal(err)
	}
	if l.Floor != floorCache || l.VsFloor == nil || *l.VsFloor != 0.75 {
		t.Errorf("JSON line: floor %q, etcdproxy_vs_floor %v; want floorcache, 0.75", l.Floor, l.VsFloor)
	}
}

// TestPairedRatio: the paired ratio divides values of the same round, by the round that measured them (not by
// their place in the list, which a failed round shifts), and takes the median of the quotients; the machine's
// drift between rounds, which moves the ratio of medians, cancels in it. Derived and summed rows have none.
func TestPairedRatio(t *testing.T) {
	r := newWorkloadResult("hot")
	r.floor = floorCache
	// Each round the machine is slower by half again; etcdproxy costs 1.05× the floor in every round. Round 2's
	// floor fails: etcdproxy's round 2 has no pair, and its round 3 must pair with the floor's round 3.
	speed := []float64{1, 1.5, 2.25, 3.4, 5}
	for round, k := range speed {
		for _, tgt := range []string{floorCache, etcdproxy} {
			if tgt == floorCache && round == 2 {
				r.add(tgt, nil, errors.New("timed out"))
				continue
			}
			v := 40 * k
			if tgt == etcdproxy {
				v *= 1.05
				if round == 4 {
					v = 40 * speed[0] // the last round alone: a quotient of 0.2, which the median leaves out
				}
			}
			r.add(tgt, &measurement{samples: []sample{{metric: mProxyCPU, value: v}, {metric: mErrors, value: 1}}}, nil)
		}
	}
	got, ok := r.pairedRatio(mProxyCPU, etcdproxy, floorCache)
	if !ok || math.Abs(got-1.05) > 1e-9 {
		t.Errorf("paired ratio %v (%v), want 1.05", got, ok)
	}
	if rom, _ := r.ratio(mProxyCPU, etcdproxy, floorCache); math.Abs(rom-1.05) < 0.1 {
		t.Errorf("ratio of medians %v: the test's drift does not move it, so it tests nothing", rom)
	}
	if _, ok := r.pairedRatio(mErrors, etcdproxy, floorCache); ok {
		t.Error("a summed row has a paired ratio")
	}
	r.record(etcdproxy, sample{metric: mPropByIdle, value: 1})
	r.record(floorCache, sample{metric: mPropByIdle, value: 1})
	if _, ok := r.pairedRatio(mPropByIdle, etcdproxy, floorCache); ok {
		t.Error("a derived row (no round) has a paired ratio")
	}
	js, err := jsonLines(meta{}, []*workloadResult{r})
	if err != nil {
		t.Fatal(err)
	}
	var l jsonLine
	for _, line := range js[1:] {
		if err := json.Unmarshal([]byte(line), &l); err != nil {
			t.Fatal(err)
		}
		if l.Metric == mProxyCPU.name {
			break
		}
	}
	if l.Metric != mProxyCPU.name || l.PairedVsFloor == nil || math.Abs(*l.PairedVsFloor-1.05) > 1e-9 {
		t.Errorf("JSON line %s: etcdproxy_vs_floor_paired %v, want 1.05", l.Metric, l.PairedVsFloor)
	}
}

// TestWorkloadTargets: floorcache runs only where a workload names it; a missing binary reads "not run" only in the
// workloads that would have run it.
func TestWorkloadTargets(t *testing.T) {
	def := workload{}
	if !def.runs(floorRelay) || def.runs(floorCache) || !def.runs(direct) {
		t.Error("default targets: want every target but floorcache")
	}
	hot := workload{targets: targetNames}
	if !hot.runs(floorCache) {
		t.Error("a workload naming floorcache does not run it")
	}
	b := &bench{missing: map[string]string{floorCache: "not run: no binary or endpoint given"}}
	res := b.runWorkload(t.Context(), workload{name: "w", targets: []string{grpcProxy, etcdproxy}})
	if _, ok := res.skipped[floorCache]; ok {
		t.Error("floorcache marked not run in a workload that does not run it")
	}
	res = b.runWorkload(t.Context(), workload{name: "w", targets: targetNames})
	if res.cell(mOps, floorCache) != "not run" {
		t.Errorf("floorcache cell %q in a workload that runs it, with no binary: want not run", res.cell(mOps, floorCache))
	}
}

// TestDeriveIdle: the proposals from a proxy are its rate minus direct's idle rate, for both windows.
func TestDeriveIdle(t *testing.T) {
	r := newWorkloadResult("idle")
	r.add(direct, &measurement{samples: []sample{{metric: mPropIdle, value: 0.1}}}, nil)
	r.add(etcdproxy, &measurement{samples: []sample{{metric: mPropFirst, value: 1.1}, {metric: mPropIdle, value: 0.1}}}, nil)
	r.add(grpcProxy, &measurement{samples: []sample{{metric: mPropFirst, value: 0.1}, {metric: mPropIdle, value: 0.2}}}, nil)
	deriveIdle(r)
	for _, c := range []struct {
		m    metric
		tgt  string
		want float64
	}{{mPropByFirst, etcdproxy, 1}, {mPropByIdle, etcdproxy, 0}, {mPropByFirst, grpcProxy, 0}, {mPropByIdle, grpcProxy, 0.1}} {
		if v, ok := r.value(c.m, c.tgt); !ok || v < c.want-1e-9 || v > c.want+1e-9 {
			t.Errorf("%s %s = %v (%v), want %v", c.tgt, c.m.name, v, ok, c.want)
		}
	}
	if _, ok := r.value(mPropByIdle, direct); ok {
		t.Error("direct has a proposals-from-the-proxy row")
	}
	if r.rounds[etcdproxy] != 1 {
		t.Errorf("derived rows counted as rounds: %d", r.rounds[etcdproxy])
	}
}

func TestPlanDescribe(t *testing.T) {
	full := newPlan(config{watchers100k: true}).describe()
	for _, want := range []string{"put C=1,4,16,64", "hot get C=1,4,16,64", "1 with W=100000 (proxies only)", "idle 30s window"} {
		if !strings.Contains(full, want) {
			t.Errorf("full plan %q: no %q", full, want)
		}
	}
}

func TestReportLinksPlots(t *testing.T) {
	r := renderReport(meta{}, tableHead, []plotFile{{file: "bench-watch-cpu.svg", title: "Proxy CPU per event delivered"}}, nil)
	for _, want := range []string{"## Plots", "![Proxy CPU per event delivered](bench-watch-cpu.svg)", "etcdproxy/floor",
		"-floorcache .build/floorcache"} {
		if !strings.Contains(r, want) {
			t.Errorf("report has no %q", want)
		}
	}
	if r := renderReport(meta{}, tableHead, nil, nil); strings.Contains(r, "## Plots") {
		t.Error("a report without plots has a Plots section")
	}
}

// TestWorkloadList: the sweeps, the cache-hit floor, the through-proxy-only 100,000 watchers, and the idle workload
// before the one that kills etcd.
func TestWorkloadList(t *testing.T) {
	byName := func(ws []workload) map[string]workload {
		m := map[string]workload{}
		for _, w := range ws {
			m[w.name] = w
		}
		return m
	}
	b := &bench{plan: newPlan(config{watchers100k: true})}
	ws := b.workloads()
	full := byName(ws)
	for _, c := range []int{1, 4, 16, 64} {
		if _, ok := full[putName(c)]; !ok {
			t.Errorf("no %s", putName(c))
		}
		hot, ok := full[hotGetName(c, b.plan.hotKeys)]
		if !ok || !hot.runs(floorCache) || hot.floor != floorCache {
			t.Errorf("%s: present %v, runs floorcache %v, floor %q", hotGetName(c, b.plan.hotKeys), ok,
				hot.runs(floorCache), hot.floor)
		}
	}
	big, ok := full[watchSpec{watchers: 100000, burst: true}.name()]
	if !ok || big.runs(direct) || big.runs(floorRelay) || !big.runs(etcdproxy) || !big.runs(grpcProxy) {
		t.Errorf("100,000 watchers: present %v, want grpc-proxy and etcdproxy only, got targets %v", ok, big.targets)
	}
	if n := len(ws); !strings.HasPrefix(ws[n-2].name, "idle") || !strings.Contains(ws[n-1].name, "etcd down") {
		t.Errorf("last workloads %q, %q: want idle, then etcd down", ws[n-2].name, ws[n-1].name)
	}

	b = &bench{plan: newPlan(config{quick: true, watchers100k: true})}
	quick := byName(b.workloads())
	if _, ok := quick[watchSpec{watchers: 100000, burst: true}.name()]; ok {
		t.Error("quick mode runs 100,000 watchers")
	}
	for name, w := range quick {
		if strings.HasPrefix(name, "idle") && (w.runs(grpcProxy) || !w.runs(etcdproxy) || !w.runs(direct)) {
			t.Errorf("quick idle targets %v, want direct and etcdproxy", w.targets)
		}
	}
}

// TestLinkage: a binary built with cgo names an interpreter (dynamic), one built with CGO_ENABLED=0 does not
// (static), and a file that is not ELF is unknown; the static one is built with a tag, which buildTags reads.
func TestLinkage(t *testing.T) {
	if testing.Short() {
		t.Skip("builds two binaries")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "main.go")
	if err := os.WriteFile(src, []byte("package main\n\nimport \"net\"\n\nfunc main() { net.LookupHost(\"localhost\") }\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ cgo, tags, want string }{{"0", "grpcnotrace", "static"}, {"1", "", "dynamic"}} {
		out := filepath.Join(dir, "bin"+tc.cgo)
		cmd := exec.Command("go", "build", "-o", out, "-tags="+tc.tags, src)
		cmd.Env = append(os.Environ(), "CGO_ENABLED="+tc.cgo)
		if b, err := cmd.CombinedOutput(); err != nil {
			if tc.cgo == "1" {
				t.Logf("no cgo build here (%v: %s): the dynamic case is not checked", err, b)
				continue
			}
			t.Fatalf("go build: %v: %s", err, b)
		}
		if got := linkage(out); got != tc.want {
			t.Errorf("CGO_ENABLED=%s: %s, want %s", tc.cgo, got, tc.want)
		}
		if got := buildTags(out); got != tc.tags {
			t.Errorf("CGO_ENABLED=%s: build tags %q, want %q", tc.cgo, got, tc.tags)
		}
	}
	if got := linkage(src); got != "unknown" {
		t.Errorf("a Go source file: %s, want unknown", got)
	}
	if got := buildTags(src); got != "" {
		t.Errorf("a Go source file: build tags %q, want none", got)
	}
}
