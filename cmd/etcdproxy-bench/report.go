package main

import (
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// direction says which way a metric improves.
type direction int

const (
	neutral direction = iota
	higherBetter
	lowerBetter
)

// aggregate says how a metric's per-round values become one cell.
type aggregate int

const (
	median aggregate = iota
	sum              // counts that must add up over rounds (events lost, errors)
)

type metric struct {
	name   string
	better direction
	agg    aggregate
	text   bool // a word, not a number (an error code)
}

// label is the metric's name with its direction: ↑ higher is better, ↓ lower is better.
func (m metric) label() string {
	switch m.better {
	case higherBetter:
		return m.name + " ↑"
	case lowerBetter:
		return m.name + " ↓"
	}
	return m.name
}

var (
	mOps        = metric{name: "ops/s", better: higherBetter}
	mP50        = metric{name: "p50 ms", better: lowerBetter}
	mP99        = metric{name: "p99 ms", better: lowerBetter}
	mErrors     = metric{name: "errors", better: lowerBetter, agg: sum}
	mEtcdCPU    = metric{name: "etcd CPU µs/op", better: lowerBetter}
	mProxyCPU   = metric{name: "proxy CPU µs/op", better: lowerBetter}
	mProxyRSS   = metric{name: "proxy peak RSS MB", better: lowerBetter}
	mEtcdRSS    = metric{name: "etcd peak RSS MB", better: lowerBetter}
	mCreateMs   = metric{name: "create all ms", better: lowerBetter}
	mUpWatch    = metric{name: "etcd watchers", better: lowerBetter}
	mUpStreams  = metric{name: "etcd watch streams", better: lowerBetter}
	mLost       = metric{name: "events lost (must be 0)", better: lowerBetter, agg: sum}
	mDup        = metric{name: "events duplicated (must be 0)", better: lowerBetter, agg: sum}
	mRenewals   = metric{name: "etcd renewals/s", better: neutral}
	mUnanswer   = metric{name: "keepalives unanswered", better: lowerBetter, agg: sum}
	mAttempts   = metric{name: "attempts/s per client", better: lowerBetter}
	mProxyMsS   = metric{name: "proxy CPU ms/s", better: lowerBetter}
	mClientMsS  = metric{name: "client CPU ms/s", better: lowerBetter}
	mErrCode    = metric{name: "error code", text: true}
	mClientCPU  = metric{name: "bench client CPU µs/op", better: neutral}
	mCacheHit   = metric{name: "etcdproxy cache hits %", better: neutral}
	mPerBarrier = metric{name: "etcdproxy reads per barrier", better: neutral}
	mBarrierCPU = metric{name: "etcd CPU µs per barrier", better: neutral}
	mProxySys   = metric{name: "proxy read+write syscalls/op", better: lowerBetter}
	mExpiryP50  = metric{name: "expiry after last keepalive p50 s", better: lowerBetter}
	mExpiryMax  = metric{name: "expiry after last keepalive max s", better: lowerBetter}
	mNotExpired = metric{name: "leases not expired within 3×TTL (must be 0)", better: lowerBetter, agg: sum}
	// The idle workload: etcd's committed raft proposals per second, as etcd counts them, then minus etcd's own
	// idle rate (direct's), which is what the proxy costs etcd.
	mPropFirst   = metric{name: "etcd proposals/s, first 10 s after a read", better: lowerBetter}
	mPropIdle    = metric{name: "etcd proposals/s, idle (from 12 s after a read)", better: lowerBetter}
	mPropByFirst = metric{name: "proposals/s from the proxy, first 10 s", better: lowerBetter}
	mPropByIdle  = metric{name: "proposals/s from the proxy, idle (goal ≤ 0.1)", better: lowerBetter}
)

// metricOrder is the order of a workload's rows, whatever order the targets measured them in.
var metricOrder = []metric{mCreateMs, mUpWatch, mUpStreams, mOps, mAttempts, mP50, mP99, mExpiryP50, mExpiryMax,
	mNotExpired, mErrors, mLost, mDup,
	mUnanswer, mRenewals, mErrCode, mCacheHit, mPerBarrier, mBarrierCPU, mPropFirst, mPropIdle, mPropByFirst, mPropByIdle, mEtcdCPU, mProxyCPU, mProxySys,
	mClientCPU, mProxyMsS, mClientMsS, mProxyRSS, mEtcdRSS}

func metricRank(m metric) int {
	i := slices.IndexFunc(metricOrder, func(x metric) bool { return x.name == m.name })
	if i < 0 {
		return len(metricOrder)
	}
	return i
}

// sample is one value of one metric, measured in one round against one target.
type sample struct {
	metric metric
	value  float64
	text   string
}

// measurement is what one round against one target produced.
type measurement struct {
	samples []sample
	note    string // something the reader should know (cancelled watchers, ...)
}

func (m *measurement) add(met metric, v float64) {
	m.samples = append(m.samples, sample{metric: met, value: v})
}

func (m *measurement) addText(met metric, s string) {
	m.samples = append(m.samples, sample{metric: met, text: s})
}

// summary is a one-line progress report.
func (m *measurement) summary() string {
	var s []string
	for _, x := range m.samples {
		if x.metric.text {
			s = append(s, x.metric.name+"="+x.text)
		} else {
			s = append(s, x.metric.name+"="+fmtNum(x.value))
		}
	}
	if m.note != "" {
		s = append(s, "note: "+m.note)
	}
	return strings.Join(s, " ")
}

// latencyMetrics adds p50 and p99 (in ms) of lats, which it sorts.
func latencyMetrics(m *measurement, lats []time.Duration) {
	if len(lats) == 0 {
		return
	}
	slices.Sort(lats)
	m.add(mP50, ms(percentile(lats, 0.50)))
	m.add(mP99, ms(percentile(lats, 0.99)))
}

func percentile(sorted []time.Duration, q float64) time.Duration {
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// workloadResult gathers every round of one workload.
type workloadResult struct {
	name    string
	floor   string                          // the target etcdproxy/floor divides by
	metrics []metric                        // in the order first measured
	values  map[string]map[string][]float64 // metric name -> target -> values per round
	// roundOf is, beside each value, the round that measured it (0, 1, ...; -1 for a derived row's value): what the
	// paired ratio pairs values by.
	roundOf map[string]map[string][]int
	texts   map[string]map[string][]string
	errs    map[string][]string // target -> error per failed round
	notes   map[string][]string // target -> notes
	rounds  map[string]int      // target -> rounds run
	skipped map[string]string   // target -> why it did not run
}

func newWorkloadResult(name string) *workloadResult {
	return &workloadResult{name: name, floor: floorRelay, values: map[string]map[string][]float64{},
		roundOf: map[string]map[string][]int{}, texts: map[string]map[string][]string{},
		errs: map[string][]string{}, notes: map[string][]string{}, rounds: map[string]int{}, skipped: map[string]string{}}
}

func (w *workloadResult) add(tgt string, m *measurement, err error) {
	w.rounds[tgt]++
	if err != nil {
		w.errs[tgt] = append(w.errs[tgt], err.Error())
		return
	}
	if m.note != "" {
		w.notes[tgt] = append(w.notes[tgt], m.note)
	}
	for _, s := range m.samples {
		w.recordRound(tgt, s, w.rounds[tgt]-1)
	}
}

// record adds one sample of tgt, without counting a round (add counts them; a derived row adds samples after),
// and belonging to no round.
func (w *workloadResult) record(tgt string, s sample) { w.recordRound(tgt, s, -1) }

// recordRound adds one sample of tgt, measured in round (-1: none).
func (w *workloadResult) recordRound(tgt string, s sample, round int) {
	if !slices.ContainsFunc(w.metrics, func(x metric) bool { return x.name == s.metric.name }) {
		w.metrics = append(w.metrics, s.metric)
		slices.SortStableFunc(w.metrics, func(a, b metric) int { return metricRank(a) - metricRank(b) })
	}
	if s.metric.text {
		if w.texts[s.metric.name] == nil {
			w.texts[s.metric.name] = map[string][]string{}
		}
		w.texts[s.metric.name][tgt] = append(w.texts[s.metric.name][tgt], s.text)
		return
	}
	if w.values[s.metric.name] == nil {
		w.values[s.metric.name] = map[string][]float64{}
		w.roundOf[s.metric.name] = map[string][]int{}
	}
	w.values[s.metric.name][tgt] = append(w.values[s.metric.name][tgt], s.value)
	w.roundOf[s.metric.name][tgt] = append(w.roundOf[s.metric.name][tgt], round)
}

// value is the cell of metric m for target tgt: the median (or sum) over rounds.
func (w *workloadResult) value(m metric, tgt string) (float64, bool) {
	vs := w.values[m.name][tgt]
	if len(vs) == 0 {
		return 0, false
	}
	if m.agg == sum {
		var s float64
		for _, v := range vs {
			s += v
		}
		return s, true
	}
	return medianOf(vs), true
}

func medianOf(vs []float64) float64 {
	s := slices.Clone(vs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// mostCommon returns the most frequent string (the first seen on a tie).
func mostCommon(ss []string) string {
	best, bestN := "", 0
	for _, s := range ss {
		if n := count(ss, s); n > bestN {
			best, bestN = s, n
		}
	}
	return best
}

func count(ss []string, s string) int {
	n := 0
	for _, x := range ss {
		if x == s {
			n++
		}
	}
	return n
}

// cell is the text of one cell.
func (w *workloadResult) cell(m metric, tgt string) string {
	if _, ok := w.skipped[tgt]; ok {
		return "not run"
	}
	if m.text {
		if ts := w.texts[m.name][tgt]; len(ts) > 0 {
			return mostCommon(ts)
		}
	} else if v, ok := w.value(m, tgt); ok {
		return fmtNum(v)
	}
	if len(w.errs[tgt]) > 0 && len(w.errs[tgt]) == w.rounds[tgt] {
		return "error"
	}
	return "n/a"
}

// ratio returns w[m][a] / w[m][b], or false when either is missing or b is 0.
func (w *workloadResult) ratio(m metric, a, b string) (float64, bool) {
	if m.text {
		return 0, false
	}
	va, okA := w.value(m, a)
	vb, okB := w.value(m, b)
	if !okA || !okB || vb == 0 {
		return 0, false
	}
	return va / vb, true
}

// pairedRatio is the median over rounds of a's value divided by b's value in the same round: each quotient is of
// two measurements seconds apart, so that the machine's drift between rounds (which moves both) cancels, which it
// does not in the ratio of medians. False for a summed or text metric, and when no round has both (b non-zero).
func (w *workloadResult) pairedRatio(m metric, a, b string) (float64, bool) {
	if m.text || m.agg == sum {
		return 0, false
	}
	ofB := map[int]float64{}
	for i, r := range w.roundOf[m.name][b] {
		if r >= 0 {
			ofB[r] = w.values[m.name][b][i]
		}
	}
	var qs []float64
	for i, r := range w.roundOf[m.name][a] {
		if vb, ok := ofB[r]; ok && r >= 0 && vb != 0 {
			qs = append(qs, w.values[m.name][a][i]/vb)
		}
	}
	if len(qs) == 0 {
		return 0, false
	}
	return medianOf(qs), true
}

func fmtNum(v float64) string {
	a := math.Abs(v)
	switch {
	case v == 0:
		return "0"
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	case a >= 1:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.2g", v)
	}
}

func fmtRatio(r float64, ok bool) string {
	switch {
	case !ok:
		return "—"
	case r >= 100:
		return fmt.Sprintf("%.0f×", r)
	case r >= 10:
		return fmt.Sprintf("%.1f×", r)
	case r >= 0.1:
		return fmt.Sprintf("%.2f×", r)
	default:
		return fmt.Sprintf("%.2g×", r)
	}
}

// tableHead is the results table's header: the targets in column order, then the ratios.
const tableHead = "| workload | metric | direct | grpc-proxy | floorrelay | floorcache | etcdproxy | etcdproxy/direct | " +
	"etcdproxy/grpc-proxy | etcdproxy/floor | etcdproxy/floor, paired |\n" +
	"| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"

// renderTable renders every result as one Markdown table.
func renderTable(results []*workloadResult) string {
	var sb strings.Builder
	sb.WriteString(tableHead)
	for _, w := range results {
		w.renderRows(&sb)
	}
	return sb.String()
}

// renderRows writes w's rows: one per metric, then its errors and notes; the workload's name on the first.
func (w *workloadResult) renderRows(sb *strings.Builder) {
	first := true
	name := func() string {
		if first {
			first = false
			return "**" + w.name + "**"
		}
		return ""
	}
	row := func(label string, cells []string, ratios ...string) {
		fmt.Fprintf(sb, "| %s | %s | %s | %s |\n", name(), label, strings.Join(cells, " | "), strings.Join(ratios, " | "))
	}
	for _, m := range w.metrics {
		cells := make([]string, len(targetNames))
		for i, t := range targetNames {
			cells[i] = w.cell(m, t)
		}
		row(m.label(), cells, fmtRatio(w.ratio(m, etcdproxy, direct)), fmtRatio(w.ratio(m, etcdproxy, grpcProxy)),
			fmtRatio(w.ratio(m, etcdproxy, w.floor)), fmtRatio(w.pairedRatio(m, etcdproxy, w.floor)))
	}
	for _, kind := range []struct {
		label string
		of    map[string][]string
	}{{"error", w.errs}, {"note", w.notes}} {
		if len(kind.of) == 0 {
			continue
		}
		cells := make([]string, len(targetNames))
		for i, t := range targetNames {
			cells[i] = describe(kind.of[t], w.rounds[t])
		}
		row(kind.label, cells, "", "", "", "")
	}
	if len(w.metrics) == 0 && len(w.errs) == 0 {
		row("(no result)", make([]string, len(targetNames)), "", "", "", "")
	}
}

// describe summarises per-round errors or notes for a table cell: "2/3 rounds: first message".
func describe(msgs []string, rounds int) string {
	if len(msgs) == 0 {
		return ""
	}
	msg := mostCommon(msgs)
	msg = strings.NewReplacer("|", "/", "\n", " ").Replace(msg)
	if len(msg) > 120 {
		msg = msg[:117] + "..."
	}
	return fmt.Sprintf("%d/%d rounds: %s", len(msgs), rounds, msg)
}

// jsonLine is one machine-readable result: one workload, one metric, every target.
type jsonLine struct {
	Workload string               `json:"workload"`
	Metric   string               `json:"metric"`
	Better   string               `json:"better,omitempty"`
	Value    map[string]any       `json:"value"`
	Rounds   map[string][]float64 `json:"rounds,omitempty"`
	VsDirect *float64             `json:"etcdproxy_vs_direct,omitempty"`
	VsProxy  *float64             `json:"etcdproxy_vs_grpc_proxy,omitempty"`
	Floor    string               `json:"floor,omitempty"` // the target of etcdproxy_vs_floor
	VsFloor  *float64             `json:"etcdproxy_vs_floor,omitempty"`
	// PairedVsFloor is the median of the per-round quotients etcdproxy / floor (pairedRatio).
	PairedVsFloor *float64            `json:"etcdproxy_vs_floor_paired,omitempty"`
	Errors        map[string][]string `json:"errors,omitempty"`
}

func jsonLines(m meta, results []*workloadResult) ([]string, error) {
	head, err := json.Marshal(map[string]meta{"meta": m})
	if err != nil {
		return nil, err
	}
	lines := []string{string(head)}
	for _, w := range results {
		var ls []jsonLine
		for _, met := range w.metrics {
			ls = append(ls, w.jsonLine(met))
		}
		if len(w.metrics) == 0 && len(w.errs) > 0 {
			ls = append(ls, jsonLine{Workload: w.name, Metric: "error", Value: map[string]any{}, Errors: w.errs})
		}
		for _, l := range ls {
			b, err := json.Marshal(l)
			if err != nil {
				return nil, err
			}
			lines = append(lines, string(b))
		}
	}
	return lines, nil
}

// jsonLine is w's line for metric met.
func (w *workloadResult) jsonLine(met metric) jsonLine {
	l := jsonLine{Workload: w.name, Metric: met.name, Value: map[string]any{}}
	switch met.better {
	case higherBetter:
		l.Better = "higher"
	case lowerBetter:
		l.Better = "lower"
	}
	for _, t := range targetNames {
		if met.text {
			if ts := w.texts[met.name][t]; len(ts) > 0 {
				l.Value[t] = mostCommon(ts)
			}
			continue
		}
		if v, ok := w.value(met, t); ok {
			l.Value[t] = v
			if l.Rounds == nil {
				l.Rounds = map[string][]float64{}
			}
			l.Rounds[t] = w.values[met.name][t]
		}
	}
	if r, ok := w.ratio(met, etcdproxy, direct); ok {
		l.VsDirect = &r
	}
	if r, ok := w.ratio(met, etcdproxy, grpcProxy); ok {
		l.VsProxy = &r
	}
	if r, ok := w.ratio(met, etcdproxy, w.floor); ok {
		l.Floor, l.VsFloor = w.floor, &r
	}
	if r, ok := w.pairedRatio(met, etcdproxy, w.floor); ok {
		l.Floor, l.PairedVsFloor = w.floor, &r
	}
	if len(w.errs) > 0 {
		l.Errors = w.errs
	}
	return l
}

// renderReport is BENCHMARKS.md: how the run was made, how to read it, the table, the plots, and the JSON lines.
func renderReport(m meta, table string, plots []plotFile, lines []string) string {
	var sb strings.Builder
	sb.WriteString("# Benchmarks: direct etcd vs etcd grpc-proxy vs etcdproxy\n\n")
	sb.WriteString("Written by `make bench` (`go run ./cmd/etcdproxy-bench -etcd .build/etcd -etcdproxy bin/etcdproxy " +
		"-floorrelay .build/floorrelay -floorcache .build/floorcache -out BENCHMARKS.md`), with the plots next to it.\n")
	sb.WriteString("Regenerate it on the commit you want to measure; `make bench-quick` is a shorter run of the same, printed only.\n\n")
	fmt.Fprintf(&sb, "- date: %s; mode: %s; wall time: %s\n", m.Date, m.Mode, m.Wall)
	fmt.Fprintf(&sb, "- machine: %s (`nproc` = %d); load average at start %s, at end %s\n", m.Machine, m.Cores, m.LoadStart, m.LoadAfter)
	fmt.Fprintf(&sb, "- versions: %s\n", m.Versions)
	fmt.Fprintf(&sb, "- rounds: %s\n", m.Rounds)
	fmt.Fprintf(&sb, "- targets: %s\n\n", m.Targets)
	sb.WriteString(howToRead)
	sb.WriteString("\n## Results\n\n")
	sb.WriteString(table)
	if len(plots) > 0 {
		sb.WriteString("\n## Plots\n\n")
		for _, p := range plots {
			fmt.Fprintf(&sb, "![%s](%s)\n\n", p.title, p.file)
		}
	}
	sb.WriteString("\n<details><summary>JSON lines (one per workload and metric; first line: the run)</summary>\n\n```jsonl\n")
	sb.WriteString(strings.Join(lines, "\n"))
	sb.WriteString("\n```\n\n</details>\n")
	return sb.String()
}

const howToRead = `## How to read this

- Five targets, each its own process on loopback: **direct** is the etcd member itself; **grpc-proxy** is
  ` + "`etcd grpc-proxy start`" + ` from the same etcd binary; **etcdproxy** is ` + "`bin/etcdproxy start`" + `. The two
  floors are measuring devices, not proxies: **floorrelay** is the thinnest gRPC-Go relay (raw bytes, no logic,
  no waiting for a ready upstream), **floorcache** the thinnest gRPC-Go server that answers a repeated
  serializable Range from stored response bytes (the first read of each request goes to etcd; never
  invalidated, so it runs only in the cache-hit workloads, and reads n/a elsewhere). The load generator is the
  benchmark process itself, on the same machine.
- Each workload runs against its targets in interleaved rounds (round 1: A B C D, round 2: B C D A, ...); a cell
  is the median over rounds (counts such as errors and lost events are summed). The machine is small and shared,
  so absolute numbers drift between runs: read the **ratios**, etcdproxy's value divided by direct etcd's, by
  etcd grpc-proxy's, and by the floor's, measured minutes apart in the same run.
- **etcdproxy/floor** divides etcdproxy by the floor of what it did: floorcache for the serializable get "hot"
  workloads (etcdproxy's cache hits), floorrelay for every other row (a forwarded call). It is what etcdproxy
  costs above the least any gRPC-Go proxy could cost on this machine; a ratio near 1 leaves nothing to win.
- **etcdproxy/floor, paired** is the median over rounds of etcdproxy's value divided by the floor's value in the
  same round (rounds where either failed are left out). The machine's speed drifts by 10–30% from one round to the
  next, and moves every target measured in that round alike: a quotient of two values measured seconds apart
  cancels it, where the ratio of the two medians (the column before) does not, since each median may come from a
  different round. Where the two columns disagree, the spread of the rounds (the JSON lines hold every round)
  is larger than the difference being measured.
- ↑ higher is better, ↓ lower is better: for ops/s a ratio above 1 is better; for latency, CPU and memory a ratio
  below 1 is better.
- ops/s is throughput over the measured window. Unary workloads are closed loops (C clients, each on its own
  connection, 256-byte values); put and the hot serializable get run at several C (the ops/s plots). The put
  rows run first, before any read: etcdproxy's read cache has not been read, so its keyspace watch (which starts
  at the first cacheable read and stops 30 s after the last) is not running, and etcdproxy forwards puts as a
  relay does. "put C=1, the read cache in use" runs after the reads, each round after one serializable read
  through the target: etcd then sends etcdproxy every write's event, and each write's reply waits for it. Watch
  workloads are paced, so their ops/s (events delivered per second) follows the pace and an op is one event
  delivered to one watcher; their latency is from the moment the put is sent (straight to etcd, for every target)
  to the watcher's receipt of the event (timing from the put's acknowledgement would read 0 for direct etcd, which
  often delivers the event first). For the keepalive workload an op is a keepalive reply, and latency is from a
  lease's keepalive request to its reply.
- CPU µs/op is the process's user+system CPU time (/proc/PID/stat) over the window divided by the ops in it:
  **etcd CPU** is etcd's, **proxy CPU** the proxy's (n/a for direct). Peak RSS is VmHWM over the window (reset
  before it through /proc/PID/clear_refs). **proxy read+write syscalls/op** is the proxy's read and write system
  calls (syscr + syscw, /proc/PID/io) over the window per op, reads that found nothing to read included: a proxy
  that costs more CPU than the floor for the same system calls spends it in its own code, not in the kernel.
- Fresh proxy processes: the reset cannot shrink a heap that earlier workloads left resident (etcdproxy's read
  cache holds what the read workloads stored), so the watch workloads (W=100000 too) and the keepalive workload,
  whose memory is what they are read for, run on fresh proxy processes: before each one's first round, every proxy
  and floor the benchmark started among its targets is killed and started again on the same address, and waited
  for until it serves. etcd is never restarted (its RSS includes every workload before), nor is a proxy given by
  address (` + "`-grpc-proxy`, `-etcdproxy-addr`" + `: its rounds carry a note that its peak RSS may include
  earlier workloads). A workload's later rounds run on the process of its first, and every other workload on the
  process the workloads before it left.
- Watch workloads: W watchers over W/100 gRPC streams (100 watchers each) on at most 10 connections. etcd watchers
  and watch streams are etcd's own gauges (etcd_debugging_mvcc_watcher_total, etcd_debugging_mvcc_watch_stream_total)
  once every watcher is created, minus their value before: how much of the fan-out reaches etcd. Lost and
  duplicated events are counted per watcher by revision and must be 0. W=100000 (one key, burst; full mode,
  ` + "`-watchers100k`" + `) runs through grpc-proxy and etcdproxy only: 100,000 watchers over 1,000 streams on one proxy.
- **bench client CPU** is the benchmark process's own CPU per op (its gRPC clients; unary workloads). On this
  machine the clients, etcd and the proxy share the same cores, so it bounds what any proxy can show: with the
  proxy's own CPU at zero, a cached read could reach at most (client + direct etcd CPU) / client times direct
  etcd's ops/s.
- The serializable get "hot" key set fits any cache. The "cold" workload reads, in each round, a fresh stretch of
  keys that no earlier round read, split between the 16 clients, each walking its share in order; a read is a first
  read unless a client gets through its whole share within the round (only above about 20,000 ops/s here).
  **etcdproxy cache hits %** (its hit and miss counters over the window, read from its /metrics uncompressed:
  a gzip answer would cost it a compressor of about 1.8 MB at each edge of the window) shows whether the cache
  answered any.
  etcdproxy stores a key's answer at its second miss (its doorkeeper), so first reads store nothing; the hot
  workloads' warm-up reads each key more than twice.
  The hot workloads warm up for 1.5 s (others: 300 ms; 150 ms quick): five targets in turn leave more than 10 s
  between two rounds of one target, after which etcdproxy's cache stops following etcd's auth revision and serves
  again from its first poll after the next read, up to 1 s later (see idle below); the warm-up keeps that out of
  the window.
- Linearizable get: etcdproxy answers it from its cache after a **barrier read** (one linearizable count-only
  Range to etcd per batch of reads; overrides/README.md). **etcdproxy reads per barrier** is its cache answers
  divided by its barrier reads over the window (at most C), **etcd CPU µs per barrier** etcd's CPU over the window
  divided by them. **barrier alone** sends that request straight to etcd, from one client, at about the rate
  etcdproxy sends its barriers here: its etcd CPU µs/op is what one barrier costs etcd by itself, and that
  divided by C (16) is the least etcd CPU per linearizable read any proxy proving each batch with one linearizable
  request could cost: the floor of the linearizable get's etcd CPU row.
- Lease expiry: leases (TTL 3 s) granted straight at etcd, each with a key, are kept alive through the target
  (5 keepalives 500 ms apart), then the client goes away; a watch straight at etcd times each key's deletion from
  the lease's last keepalive request. etcd itself expires a lease TTL after its last renewal, give or take its
  500 ms expiry check; a proxy that renews leases on its own keeps them longer.
- Idle: what a proxy with no clients costs etcd, in raft proposals (etcd_server_proposals_committed_total, read
  from etcd's /metrics before and after each window). Each target is measured in turn, with every other proxy
  the benchmark started paused (SIGSTOP), so that etcd hears from that one only. A proxy gets one serializable
  read through it, then two windows: the first 10 s after it (etcdproxy's read cache reads etcd's auth revision,
  a raft entry, every second until 10 polls have passed without a cacheable read), and, from 12 s after it, the
  idle window (30 s; 10 s in quick mode, where grpc-proxy is not measured; the floors never are). direct's idle
  window is etcd's own rate; **proposals/s from the proxy** is the target's rate minus it (the goal: ≤ 0.1
  idle); proxy CPU ms/s is over the idle window.
- LeaseGrant with etcd down runs last: etcd is killed (SIGKILL), and N clients loop LeaseGrant with a 2 s deadline
  each. Fewer attempts and less CPU are better: a proxy that answers Unavailable at once makes clients spin.
- Plots (SVG, next to this file, full mode): proxy CPU per event and proxy peak RSS against the number of watchers
  (W = 1,000, 10,000, 100,000; the "one key, burst" watch workloads), and ops/s against the number of clients
  (C = 1, 4, 16, 64) for put and for the hot serializable get. Each point is the table's cell; the floors are
  dashed.
- Go micro-benchmarks of the hot paths (unary forwarding, the watch stream pump; etcd and etcdproxy in-process):
  ` + "`go test ./cmd/etcdproxy-bench -run '^$' -bench . -benchmem`" + `.
`
