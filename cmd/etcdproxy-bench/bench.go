package main

import (
	"cmp"
	"context"
	"debug/buildinfo"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/embedetcd"
	"google.golang.org/grpc"
)

// The targets, in the order of the table's columns. floorrelay and floorcache are measuring devices, not proxies
// (cmd/etcdproxy-bench/floorrelay, floorcache): the least a gRPC-Go server can do to forward a call, and to answer a
// cache hit, on this machine; etcdproxy/floor divides etcdproxy by the one that does what etcdproxy did.
const (
	direct     = "direct"
	grpcProxy  = "grpc-proxy"
	floorRelay = "floorrelay"
	floorCache = "floorcache"
	etcdproxy  = "etcdproxy"
)

var targetNames = []string{direct, grpcProxy, floorRelay, floorCache, etcdproxy}

// target is one way of reaching etcd.
type target struct {
	name string
	addr string // host:port
	pid  int    // the proxy's process, for CPU and memory; 0 for direct or when unknown
	proc *proc  // the proxy's process when the benchmark started it (the idle workload pauses it); else nil
}

// bench is one benchmark run: the processes it started, its connections and its results.
type bench struct {
	cfg  config
	plan plan

	dir        string // temporary directory: data and logs of the children
	procs      procs
	etcd       *proc // nil when -direct was given
	etcdAddr   string
	etcdPID    int
	metricsURL string
	targets    []*target // the targets that run, in column order
	missing    map[string]string

	direct *grpc.ClientConn // the benchmark's own connection to etcd: setup, and the puts of the watch workloads

	poolMu sync.Mutex // poolMu protects pools
	pools  map[string][]*grpc.ClientConn

	results []*workloadResult
}

func (b *bench) startTargets(ctx context.Context) error {
	var err error
	if b.dir, err = os.MkdirTemp("", "etcdproxy-bench-"); err != nil {
		return err
	}
	b.missing = map[string]string{}
	c := b.cfg
	if c.directAddr != "" {
		b.etcdAddr, b.etcdPID = c.directAddr, c.etcdPID
	} else {
		ports, err := embedetcd.FreePorts(2)
		if err != nil {
			return err
		}
		b.etcdAddr = fmt.Sprintf("127.0.0.1:%d", ports[0])
		peer := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
		b.etcd, err = b.procs.start("etcd", filepath.Join(b.dir, "etcd.log"), c.etcdBin,
			"--name", "bench", "--data-dir", filepath.Join(b.dir, "etcd"),
			"--listen-client-urls", "http://"+b.etcdAddr, "--advertise-client-urls", "http://"+b.etcdAddr,
			"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
			"--initial-cluster", "bench="+peer, "--log-level", "error")
		if err != nil {
			return err
		}
		b.etcdPID = b.etcd.pid()
	}
	if err := waitServing(ctx, b.etcdAddr, b.etcd, 30*time.Second); err != nil {
		return err
	}
	b.metricsURL = c.metricsURL
	if b.metricsURL == "" {
		b.metricsURL = "http://" + b.etcdAddr + "/metrics"
	}
	if b.direct, err = dial(b.etcdAddr); err != nil {
		return err
	}
	b.targets = append(b.targets, &target{name: direct, addr: b.etcdAddr})
	if err := b.startProxies(ctx); err != nil {
		return err
	}
	logf("targets: %s", b.describeTargets())
	return nil
}

// startProxies starts the proxies and the floors together, each in its own process, then waits for all; one given
// by endpoint is only waited for, one with neither binary nor endpoint is missing (its cells read "not run").
func (b *bench) startProxies(ctx context.Context) error {
	c := b.cfg
	type starting struct {
		t *target
		p *proc
	}
	var waits []starting
	for _, s := range []struct {
		name, addr string
		pid        int
		bin        string
		args       []string
	}{
		{grpcProxy, c.grpcProxyAddr, c.grpcProxyPID, c.etcdBin, []string{"grpc-proxy", "start"}},
		{floorRelay, "", 0, c.floorRelayBin, []string{"start"}},
		{floorCache, "", 0, c.floorCacheBin, []string{"start"}},
		{etcdproxy, c.etcdproxyAddr, c.etcdproxyPID, c.etcdproxyBin, []string{"start"}},
	} {
		switch {
		case s.addr != "":
			waits = append(waits, starting{t: &target{name: s.name, addr: s.addr, pid: s.pid}})
		case s.bin != "":
			ports, err := embedetcd.FreePorts(1)
			if err != nil {
				return err
			}
			t := &target{name: s.name, addr: fmt.Sprintf("127.0.0.1:%d", ports[0])}
			args := append(s.args, "--endpoints="+b.etcdAddr, "--listen-addr="+t.addr,
				"--data-dir="+filepath.Join(b.dir, s.name))
			p, err := b.procs.start(s.name, filepath.Join(b.dir, s.name+".log"), append([]string{s.bin}, args...)...)
			if err != nil {
				return err
			}
			t.pid, t.proc = p.pid(), p
			waits = append(waits, starting{t: t, p: p})
		default:
			b.missing[s.name] = "not run: no binary or endpoint given"
		}
	}
	for _, s := range waits {
		if err := waitServing(ctx, s.t.addr, s.p, 30*time.Second); err != nil {
			return err
		}
		b.targets = append(b.targets, s.t)
	}
	return nil
}

func (b *bench) describeTargets() string {
	var s []string
	for _, t := range b.targets {
		d := t.name + "=" + t.addr
		if t.pid != 0 {
			d += fmt.Sprintf(" (pid %d)", t.pid)
		}
		s = append(s, d)
	}
	return strings.Join(s, ", ") + fmt.Sprintf("; etcd pid %d", b.etcdPID)
}

// close kills every child, closes connections and removes the temporary directory.
func (b *bench) close() {
	b.procs.killAll()
	b.poolMu.Lock()
	for _, p := range b.pools {
		for _, cc := range p {
			cc.Close()
		}
	}
	b.pools = nil
	b.poolMu.Unlock()
	if b.direct != nil {
		b.direct.Close()
	}
	if b.dir != "" {
		os.RemoveAll(b.dir)
	}
}

// pool returns n connections to t, kept for the whole run (the unary workloads reuse them).
func (b *bench) pool(t *target, n int) ([]*grpc.ClientConn, error) {
	b.poolMu.Lock()
	defer b.poolMu.Unlock()
	if b.pools == nil {
		b.pools = map[string][]*grpc.ClientConn{}
	}
	for len(b.pools[t.name]) < n {
		cc, err := dial(t.addr)
		if err != nil {
			return nil, err
		}
		b.pools[t.name] = append(b.pools[t.name], cc)
	}
	return b.pools[t.name][:n], nil
}

// workload is one benchmark, run against its targets in interleaved rounds.
type workload struct {
	name   string
	rounds int
	// targets are the targets it runs against; nil: every target but floorcache, which only answers the cache-hit
	// workloads (its answers would be wrong anywhere else). The others' cells read n/a.
	targets []string
	// floor is the target etcdproxy/floor divides by: floorrelay unless set.
	floor string
	// setup, if set, runs once before the first round (preloading keys, stopping etcd, ...).
	setup func(ctx context.Context) error
	// fresh: after setup, every proxy process the benchmark started among the workload's targets is replaced by a
	// fresh one on the same address, so that the workload's peak RSS is its own, not the heap that earlier workloads
	// left (etcdproxy's read cache after the cold reads). etcd is not restarted; a proxy given by address cannot be,
	// and its rounds carry a note saying so.
	fresh bool
	// run measures one round against one target.
	run func(ctx context.Context, t *target, round int) (*measurement, error)
	// derive, if set, adds rows computed from every target's rounds (a difference from direct's, ...).
	derive func(res *workloadResult)
}

// runs reports whether w runs against the target named name.
func (w workload) runs(name string) bool {
	if w.targets == nil {
		return name != floorCache
	}
	return slices.Contains(w.targets, name)
}

func (b *bench) workloads() []workload {
	ws := b.unaryWorkloads()
	ws = append(ws, b.watchWorkloads()...)
	ws = append(ws, b.keepAliveWorkload(), b.expiryWorkload())
	// After every workload with traffic, so that no proxy has been read from for a while; before etcd goes down.
	ws = append(ws, b.idleWorkload())
	// Last: it kills etcd.
	ws = append(ws, b.etcdDownWorkload())
	return ws
}

// runWorkload runs w's rounds; round r runs w's targets in rotated order (A B C D, B C D A, C D A B, ...), so that
// no target always runs first, or in the same place, on a machine whose load drifts.
func (b *bench) runWorkload(ctx context.Context, w workload) *workloadResult {
	res := newWorkloadResult(w.name)
	res.floor = cmp.Or(w.floor, floorRelay)
	for name, why := range b.missing {
		if w.runs(name) {
			res.skipped[name] = why
		}
	}
	var ts []*target
	for _, t := range b.targets {
		if w.runs(t.name) {
			ts = append(ts, t)
		}
	}
	logf("== %s (%d rounds)", w.name, w.rounds)
	if w.setup != nil {
		if err := w.setup(ctx); err != nil {
			logf("   setup: %v", err)
			for _, t := range ts {
				res.add(t.name, nil, fmt.Errorf("setup: %w", err))
			}
			return res
		}
	}
	if w.fresh {
		if err := b.restartProxies(ctx, ts); err != nil {
			logf("   restart: %v", err)
			for _, t := range ts {
				res.add(t.name, nil, fmt.Errorf("restart: %w", err))
			}
			return res
		}
	}
	for r := range w.rounds {
		for i := range ts {
			t := ts[(i+r)%len(ts)]
			if !b.runRound(ctx, w, res, t, r) {
				return res
			}
		}
	}
	if w.derive != nil {
		w.derive(res)
	}
	return res
}

// runRound runs round r of w against t and records it; false when the benchmark is interrupted.
func (b *bench) runRound(ctx context.Context, w workload, res *workloadResult, t *target, r int) bool {
	if ctx.Err() != nil {
		return false
	}
	m, err := w.run(ctx, t, r)
	if ctx.Err() != nil {
		return false
	}
	if err == nil && w.fresh && t.name != direct && t.proc == nil {
		m.note = strings.TrimPrefix(m.note+"; "+notRestarted, "; ")
	}
	res.add(t.name, m, err)
	if err != nil {
		logf("   round %d %-10s error: %v", r+1, t.name, err)
	} else {
		logf("   round %d %-10s %s", r+1, t.name, m.summary())
	}
	return true
}

// notRestarted is the note on a fresh workload's rounds against a proxy given by address.
const notRestarted = "given by address, not restarted: peak RSS may include earlier workloads"

// restartProxies replaces every proxy process among ts that the benchmark started with a fresh one on the same
// address (kill, start, wait until it serves, as startProxies does), and drops the target's pooled connections,
// which led to the old process. The target's pid follows, for CPU and RSS accounting.
func (b *bench) restartProxies(ctx context.Context, ts []*target) error {
	var restarted []*target
	var pids []string
	for _, t := range ts {
		if t.proc == nil {
			continue
		}
		old := t.pid
		if err := t.proc.restart(); err != nil {
			return err
		}
		t.pid = t.proc.pid()
		b.dropPool(t)
		restarted = append(restarted, t)
		pids = append(pids, fmt.Sprintf("%s pid %d -> %d", t.name, old, t.pid))
	}
	for _, t := range restarted {
		if err := waitServing(ctx, t.addr, t.proc, 30*time.Second); err != nil {
			return err
		}
	}
	if len(pids) > 0 {
		logf("   fresh processes: %s", strings.Join(pids, ", "))
	}
	return nil
}

// dropPool closes t's pooled connections; the next pool call dials anew.
func (b *bench) dropPool(t *target) {
	b.poolMu.Lock()
	defer b.poolMu.Unlock()
	for _, cc := range b.pools[t.name] {
		cc.Close()
	}
	delete(b.pools, t.name)
}

// probe measures the CPU time of etcd, of the target's proxy and of this process over a window, and the peak RSS
// of etcd and the proxy within it.
type probe struct {
	b                    *bench
	t                    *target
	start                time.Time
	etcd0, proxy0, self0 time.Duration
	etcdOK, proxyOK      bool
	sys0                 int64 // the proxy's read and write system calls so far; -1 when unknown
}

type usage struct {
	elapsed                    time.Duration
	etcdCPU, proxyCPU, selfCPU time.Duration
	etcdOK, proxyOK            bool
	etcdPeak, proxyPeak        int64 // bytes; 0 when unknown
	proxySyscalls              int64 // the proxy's read and write system calls; -1 when unknown
}

func (b *bench) startProbe(t *target) *probe {
	p := &probe{b: b, t: t}
	if b.etcdPID != 0 && (b.etcd == nil || b.etcd.alive()) {
		_ = resetPeakRSS(b.etcdPID)
		cpu, err := procCPU(b.etcdPID)
		p.etcd0, p.etcdOK = cpu, err == nil
	}
	if t.pid != 0 {
		_ = resetPeakRSS(t.pid)
		cpu, err := procCPU(t.pid)
		p.proxy0, p.proxyOK = cpu, err == nil
		p.sys0 = procSyscalls(t.pid)
	}
	p.self0, _ = procCPU(os.Getpid())
	p.start = time.Now()
	return p
}

func (p *probe) stop() usage {
	u := usage{elapsed: time.Since(p.start), proxySyscalls: -1}
	if p.etcdOK {
		if cpu, err := procCPU(p.b.etcdPID); err == nil {
			u.etcdCPU, u.etcdOK = cpu-p.etcd0, true
			u.etcdPeak, _ = peakRSS(p.b.etcdPID)
		}
	}
	if p.proxyOK {
		if cpu, err := procCPU(p.t.pid); err == nil {
			u.proxyCPU, u.proxyOK = cpu-p.proxy0, true
			u.proxyPeak, _ = peakRSS(p.t.pid)
			if n := procSyscalls(p.t.pid); n >= 0 && p.sys0 >= 0 {
				u.proxySyscalls = n - p.sys0
			}
		}
	}
	self, _ := procCPU(os.Getpid())
	u.selfCPU = self - p.self0
	return u
}

// addCPU adds the CPU per operation of etcd and of the proxy, and the proxy's peak RSS (and etcd's when withEtcdRSS).
func (u usage) addCPU(m *measurement, ops float64, withEtcdRSS bool) {
	if ops > 0 && u.etcdOK {
		m.add(mEtcdCPU, float64(u.etcdCPU.Microseconds())/ops)
	}
	if ops > 0 && u.proxyOK {
		m.add(mProxyCPU, float64(u.proxyCPU.Microseconds())/ops)
		if u.proxySyscalls >= 0 {
			m.add(mProxySys, float64(u.proxySyscalls)/ops)
		}
	}
	if u.proxyOK && u.proxyPeak > 0 {
		m.add(mProxyRSS, float64(u.proxyPeak)/(1<<20))
	}
	if withEtcdRSS && u.etcdOK && u.etcdPeak > 0 {
		m.add(mEtcdRSS, float64(u.etcdPeak)/(1<<20))
	}
}

// meta describes the machine and the run, for the report's header and the JSON lines.
type meta struct {
	Date      string `json:"date"`
	Mode      string `json:"mode"`
	Machine   string `json:"machine"`
	Cores     int    `json:"cores"`
	Versions  string `json:"versions"`
	Go        string `json:"go"`
	Etcd      string `json:"etcd"`
	Etcdproxy string `json:"etcdproxy"`
	Rounds    string `json:"rounds"`
	LoadStart string `json:"load_start"`
	LoadAfter string `json:"load_end"`
	Wall      string `json:"wall"`
	Targets   string `json:"targets"`
}

func (b *bench) meta(started time.Time) meta {
	m := meta{
		Date:      started.UTC().Format("2006-01-02 15:04 UTC"),
		Mode:      b.plan.mode,
		Cores:     runtime.NumCPU(),
		Go:        runtime.Version(),
		LoadStart: loadAvg(),
		Targets:   b.describeTargets(),
	}
	m.Machine = fmt.Sprintf("%d cores (%s), %s RAM, %s/%s", m.Cores, cpuModel(), memTotal(), runtime.GOOS, runtime.GOARCH)
	m.Etcd = "unknown"
	if b.cfg.etcdBin != "" {
		m.Etcd = firstLine(b.cfg.etcdBin, "--version")
	}
	m.Etcdproxy = "unknown"
	if b.cfg.etcdproxyBin != "" {
		m.Etcdproxy = firstLine(b.cfg.etcdproxyBin, "version")
	}
	if rev := firstLine("git", "describe", "--always", "--dirty"); rev != "" {
		m.Etcdproxy += " (git " + rev + ")"
	}
	m.Versions = fmt.Sprintf("%s; %s; Go %s", m.Etcd, m.Etcdproxy, m.Go)
	var linked []string
	for _, bin := range []struct{ name, path string }{{"etcd", b.cfg.etcdBin}, {etcdproxy, b.cfg.etcdproxyBin},
		{floorRelay, b.cfg.floorRelayBin}, {floorCache, b.cfg.floorCacheBin}} {
		if bin.path != "" {
			l := bin.name + " " + linkage(bin.path)
			if tags := buildTags(bin.path); tags != "" {
				l += " (tags " + tags + ")"
			}
			linked = append(linked, l)
		}
	}
	if len(linked) > 0 {
		m.Versions += "; linked: " + strings.Join(linked, ", ")
	}
	m.Rounds = b.plan.describe()
	return m
}

// linkage says how the binary at path is linked: "static", or "dynamic" (it names an interpreter: it maps libc,
// which costs RSS), or "unknown" if it is not an ELF file. make builds every binary static, as etcd's releases are.
func linkage(path string) string {
	f, err := elf.Open(path)
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return "dynamic"
		}
	}
	return "static"
}

// buildTags returns the build tags the Go binary at path was built with ("" if none, or not a Go binary): make
// builds etcdproxy and the floors with grpcnotrace (see the Makefile), etcd as released.
func buildTags(path string) string {
	info, err := buildinfo.ReadFile(path)
	if err != nil {
		return ""
	}
	for _, s := range info.Settings {
		if s.Key == "-tags" {
			return s.Value
		}
	}
	return ""
}

// describe is the plan in one line, for the report's header.
func (p plan) describe() string {
	var wr []string
	for _, w := range p.watchers {
		wr = append(wr, fmt.Sprintf("%d with W=%d", p.watchRounds[w], w))
	}
	if p.bigWatchers > 0 {
		wr = append(wr, fmt.Sprintf("%d with W=%d (proxies only)", p.watchRounds[p.bigWatchers], p.bigWatchers))
	}
	ints := func(xs []int) string { return strings.Trim(strings.Join(strings.Fields(fmt.Sprint(xs)), ","), "[]") }
	idle := "every target but floorcache"
	if p.idleTargets != nil {
		idle = strings.Join(p.idleTargets, ", ")
	}
	return fmt.Sprintf("unary %d (put C=%s; hot get C=%s), watch %s, keepalive %d, idle %v window (%s), etcd down %d",
		p.rounds, ints(p.putClients), ints(p.getClients), strings.Join(wr, " and "), p.leaseRounds, p.idleWindow, idle,
		p.downRounds)
}

func firstLine(name string, args ...string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).Output()
	if err != nil {
		return ""
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return strings.TrimSpace(line)
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}

func memTotal() string {
	b, _ := os.ReadFile("/proc/meminfo")
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "MemTotal:"); ok {
			var kb int64
			fmt.Sscan(strings.TrimSpace(v), &kb)
			return fmt.Sprintf("%.0f GiB", float64(kb)/(1<<20))
		}
	}
	return "unknown"
}

func loadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
