// Package robustness runs etcd's own robustness test (go.etcd.io/etcd/tests/v3/robustness: its traffic, its fault
// injection, its validation) with every client going through the etcdproxy binary, run as its own process in
// front of a three-member etcd cluster: `make robustness` (see the Makefile for the knobs).
//
// One history: a new cluster of three etcd processes (etcd's e2e framework, peer TLS and peer proxy, with the
// randomized options of etcd's exploratory scenarios) and a new proxy; etcd's traffic through the proxy; one
// fault while it runs; then etcd's checks: the client reports and the requests persisted in the members' WALs
// go through validate.ValidateAndReturnVisualize (linearizability, watch guarantees, stale reads), and the
// members' HashKV must agree. Faults and traffic profiles rotate over the histories.
//
// It owns the harness around etcd's test (the proxy process, the fault and profile rotation, the summary); it
// drives the binary from outside, as its clients do, and must not import the proxy's packages (its own go.mod
// keeps etcd's test dependencies out of the project's).
package robustness

import (
	"context"
	"flag"
	"fmt"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/tests/v3/framework"
	"go.etcd.io/etcd/tests/v3/framework/e2e"
	"go.etcd.io/etcd/tests/v3/robustness/client"
	"go.etcd.io/etcd/tests/v3/robustness/failpoint"
	"go.etcd.io/etcd/tests/v3/robustness/identity"
	"go.etcd.io/etcd/tests/v3/robustness/model"
	"go.etcd.io/etcd/tests/v3/robustness/report"
	"go.etcd.io/etcd/tests/v3/robustness/scenarios"
	"go.etcd.io/etcd/tests/v3/robustness/validate"
)

var (
	first       = flag.Int("first", 0, "index of the first history: faults and profiles rotate from it (make robustness runs batches with it)")
	of          = flag.Int("of", 0, "the number of histories of the whole run, for the log lines (default: first+histories)")
	histories   = flag.Int("histories", 6, "number of histories (each: a new cluster and proxy, traffic, one fault, validation)")
	trafficTime = flag.Duration("traffic", 10*time.Second, "traffic per history: half of it before the fault, half after the fault ended")
	proxyBin    = flag.String("etcdproxy", "../bin/etcdproxy", "the etcdproxy binary")
	faultList   = flag.String("faults", "", "comma-separated faults to rotate over (default: all of "+strings.Join(faultNames(), ",")+")")
	profileList = flag.String("profiles", "", "comma-separated traffic profiles to rotate over (default: all of "+strings.Join(profileNames(), ",")+")")
)

var testRunner = framework.E2eTestRunner

func TestMain(m *testing.M) {
	// etcd's e2e flags, parsed by its TestMain: where the etcd binary is (../.build/etcd, `make etcd-bin`), and the
	// certificates of peer TLS (which etcd's peer proxy needs), from etcd's tests module.
	build, err := filepath.Abs("../.build")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	defaultArg("bin-dir", build)
	if !hasArg("cert-dir") {
		dir, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "go.etcd.io/etcd/tests/v3").Output()
		if err != nil {
			fmt.Fprintln(os.Stderr, "go list go.etcd.io/etcd/tests/v3:", err)
			os.Exit(2)
		}
		defaultArg("cert-dir", filepath.Join(strings.TrimSpace(string(dir)), "fixtures"))
	}
	testRunner.TestMain(m)
}

// fault is one kind of fault, injected once per history through etcd's failpoint.Inject (which checks every
// member's health before and after). None needs gofail (a plain etcd binary): etcd's member kill, its peer
// network faults (through e2e's peer proxy), its member replace, and a restart of etcdproxy itself.
//
// Not here: etcd's BlackholeUntilSnapshot (a member cut off until it must be restored from a snapshot). Through
// the proxy every client sends a third of its requests to the cut-off member, each failing at etcd's traffic
// timeout (200ms), so the cluster's revision grows slowly: with the high etcd traffic the fault lasted 37s and left
// 1600 failed requests, which porcupine did not linearize within etcd's 5 minutes (Timeout: inconclusive); with the
// Kubernetes traffic, the member kept up through raft's pipeline and was never 200 entries behind (etcd's
// failpoint gave up after its minute).
type fault struct {
	name      string
	failpoint func(proxy *proxyProcess) failpoint.Failpoint
}

var faults = []fault{
	{name: "Kill", failpoint: etcdFailpoint(failpoint.KillFailpoint)},
	{name: "blackholePeerNetwork", failpoint: etcdFailpoint(failpoint.BlackholePeerNetwork)},
	{name: "dropPeerNetwork", failpoint: etcdFailpoint(failpoint.DropPeerNetwork)},
	{name: "delayPeerNetwork", failpoint: etcdFailpoint(failpoint.DelayPeerNetwork)},
	{name: "MemberReplace", failpoint: etcdFailpoint(failpoint.MemberReplace)},
	{name: "EtcdproxyRestart", failpoint: func(proxy *proxyProcess) failpoint.Failpoint { return proxyRestart{proxy: proxy} }},
}

func etcdFailpoint(f failpoint.Failpoint) func(*proxyProcess) failpoint.Failpoint {
	return func(*proxyProcess) failpoint.Failpoint { return f }
}

func faultNames() []string { return namesOf(faults, func(f fault) string { return f.name }) }

// pick returns the xs named in list (comma-separated), in its order; all of xs if list is empty. An unknown name
// fails the test.
func pick[T any](t *testing.T, xs []T, list, what string, name func(T) string) []T {
	if list == "" {
		return xs
	}
	var out []T
	for _, n := range strings.Split(list, ",") {
		i := slices.IndexFunc(xs, func(x T) bool { return name(x) == n })
		require.GreaterOrEqualf(t, i, 0, "unknown %s %q", what, n)
		out = append(out, xs[i])
	}
	return out
}

// namesOf lists the names of xs, for flag help and errors.
func namesOf[T any](xs []T, name func(T) string) []string {
	var names []string
	for _, x := range xs {
		names = append(names, name(x))
	}
	return names
}

// profile is a traffic profile: one of etcd's exploratory scenarios on three members (base: its name), with
// serializable readers added (serializableReader) if said.
type profile struct {
	name, base string
	readers    int
}

var profiles = []profile{
	{name: "EtcdHighTraffic", base: "EtcdHighTraffic"},
	{name: "EtcdTrafficDeleteLeases", base: "EtcdTrafficDeleteLeases"},
	{name: "KubernetesHighTraffic", base: "KubernetesHighTraffic"},
	{name: "KubernetesLowTraffic", base: "KubernetesLowTraffic"},
	// etcd's traffic reads linearizably, or at a past revision: the proxy forwards both to etcd, and its read cache
	// serves neither. This profile adds serializable reads of the same keys, which the cache serves, under etcd's
	// writes, leases, deletes, compactions and watches.
	{name: "EtcdSerializableReads", base: "EtcdTrafficDeleteLeases", readers: 2},
}

func profileNames() []string { return namesOf(profiles, func(p profile) string { return p.name }) }

// summary is what one history did.
type summary struct {
	fault, profile       string
	operations, failed   int // key-value operations of etcd's clients (and the serializable readers), failed ones
	watchEvents          int // events received by the watches (traffic and collection)
	serializable         int // serializable reads checked
	authStatus           int // AuthStatus entries left out of the persisted requests
	cache                cacheStats
	violation            bool          // etcd's validation (or the serializable-read check) failed
	inconclusive         bool          // the linearization timed out
	faultTime, duration  time.Duration // the fault's injection, the whole history
	resultsDir, proxyLog string
}

func TestRobustnessThroughProxy(t *testing.T) {
	// Paths first: etcd's BeforeTest changes the working directory to a temporary one.
	bin := mustAbs(t, *proxyBin)
	for _, p := range []*string{&e2e.BinPath.Etcd, &e2e.BinPath.EtcdLastRelease, &e2e.BinPath.Etcdctl, &e2e.BinPath.Etcdutl, &e2e.BinPath.LazyFS} {
		*p = mustAbs(t, *p)
	}
	resultsRoot, ok := os.LookupEnv("RESULTS_DIR")
	if !ok {
		resultsRoot = filepath.Join(os.TempDir(), "etcdproxy-robustness")
	}
	resultsRoot = mustAbs(t, resultsRoot)
	testRunner.BeforeTest(t)
	_, err := os.Stat(bin)
	require.NoErrorf(t, err, "the etcdproxy binary (build it: make build)")
	_, err = os.Stat(e2e.BinPath.Etcd)
	require.NoErrorf(t, err, "the etcd binary (build it: make etcd-bin)")
	fs := pick(t, faults, *faultList, "fault", func(f fault) string { return f.name })
	profs := pick(t, profiles, *profileList, "profile", func(p profile) string { return p.name })
	WaitBeforeFailpoint, WaitAfterFailpoint = *trafficTime/2, *trafficTime/2

	var total summary
	var passed, violations, inconclusive, errs int
	for i := *first; i < *first+*histories; i++ {
		// Every fault with every profile: round r pairs fault f with profile f+r.
		f := i % len(fs)
		p := profs[(f+i/len(fs))%len(profs)]
		s := summary{fault: fs[f].name, profile: p.name}
		start := time.Now()
		ok := t.Run(fmt.Sprintf("%03d/%s/%s", i, s.fault, s.profile), func(t *testing.T) {
			runHistory(t, bin, resultsRoot, fs[f], p, &s)
		})
		s.duration = time.Since(start)
		result := "PASS"
		switch {
		case ok:
			passed++
		case s.violation:
			violations++
			result = "VIOLATION"
		case s.inconclusive:
			inconclusive++
			result = "INCONCLUSIVE"
		default:
			errs++
			result = "ERROR"
		}
		line := fmt.Sprintf("history %d/%d: fault=%s profile=%s operations=%d (failed %d) watch-events=%d",
			i+1, max(*of, *first+*histories), s.fault, s.profile, s.operations, s.failed, s.watchEvents)
		if p.readers > 0 {
			line += fmt.Sprintf(" serializable-reads=%d cache-hits=%.0f cache-misses=%.0f",
				s.serializable, s.cache.hits, s.cache.misses)
		}
		line += fmt.Sprintf(" linearizable-cache-hits=%.0f barriers=%.0f", s.cache.linHits, s.cache.barriers)
		line += fmt.Sprintf(" auth-status-dropped=%d", s.authStatus)
		line += fmt.Sprintf(" fault-time=%s time=%s result=%s", s.faultTime.Round(100*time.Millisecond), s.duration.Round(100*time.Millisecond), result)
		if !ok {
			line += " results=" + s.resultsDir
		}
		t.Log(line)
		total.operations += s.operations
		total.failed += s.failed
		total.watchEvents += s.watchEvents
		total.serializable += s.serializable
		total.cache.add(s.cache)
	}
	t.Logf("total: histories=%d passed=%d operations=%d (failed %d) watch-events=%d serializable-reads=%d cache-hits=%.0f linearizable-cache-hits=%.0f barriers=%.0f violations=%d inconclusive=%d errors=%d",
		*histories, passed, total.operations, total.failed, total.watchEvents, total.serializable, total.cache.hits,
		total.cache.linHits, total.cache.barriers, violations, inconclusive, errs)
}

// runHistory is one history: etcd's testRobustness (v3.7.3), with the proxy in front of the cluster.
func runHistory(t *testing.T, bin, resultsRoot string, f fault, p profile, s *summary) {
	dir := resultsDirectory(t, resultsRoot)
	s.resultsDir = dir
	lg, closeLog := fileLogger(t, filepath.Join(dir, "robustness.log"))
	defer closeLog()
	defer func() {
		if !t.Failed() {
			if _, keep := os.LookupEnv("PERSIST_RESULTS"); !keep {
				os.RemoveAll(dir)
			}
		}
	}()

	sc := exploratoryScenario(t, p.base)
	sc.Cluster.Logger = lg
	sc.Cluster.GoFailEnabled = false // a plain etcd binary: none of the faults needs gofail
	base := freeBasePort(t)
	sc.Cluster.BasePort = base
	ctx := t.Context()
	c, err := e2e.NewEtcdProcessCluster(ctx, t, e2e.WithConfig(&sc.Cluster))
	require.NoError(t, err)
	defer forcestopCluster(c)

	// The proxy listens next to the members' ports (base..base+14): out of the ephemeral range, so that nothing
	// takes its port while it restarts.
	s.proxyLog = filepath.Join(dir, "etcdproxy.log")
	proxy, err := startProxy(ctx, bin, fmt.Sprintf("127.0.0.1:%d", base+15), c.EndpointsGRPC(), s.proxyLog)
	require.NoError(t, err)
	defer proxy.kill()

	sc.Failpoint = f.failpoint(proxy)
	require.NoError(t, failpoint.Validate(c, sc.Failpoint, sc.Profile))

	r, err := report.NewTestReport(lg, filepath.Join(dir, "report"), report.ServerDataPaths(c), &report.TrafficDetail{ExpectUniqueRevision: sc.Traffic.ExpectUniqueRevision()})
	require.NoError(t, err)
	// t.Failed() returns false during panicking. We need to forcibly
	// save data on panicking.
	// Refer to: https://github.com/golang/go/issues/49929
	panicked := true
	defer func() {
		err = r.Finalize(t.Failed(), panicked)
		if err != nil {
			t.Error(err)
		}
	}()
	clientReports, readerReports := runScenario(ctx, t, sc, p.readers, lg, c, proxy, &s.faultTime)
	s.cache = proxy.cacheStats()
	if err := proxy.stop(); err != nil {
		t.Error(err)
	}
	countOperations(s, clientReports)
	countOperations(s, readerReports)
	// etcd's test saves the members' data here whatever comes next; Finalize saves it (before the cluster stops)
	// if the history fails or panics, or with PERSIST_RESULTS: the same report, without copying three data dirs
	// (their WAL files are 64 MB each) for every history that passes.
	r.SetClientReports(slices.Concat(clientReports, readerReports))

	validateConfig := validate.Config{ExpectRevisionUnique: sc.Traffic.ExpectUniqueRevision()}
	persisted, authStatus, err := persistedRequests(lg, c, filepath.Join(dir, "wal-without-auth-status"))
	if err != nil {
		t.Error(err)
	}
	s.authStatus = authStatus
	result := validate.ValidateAndReturnVisualize(lg, validateConfig, clientReports, persisted, 5*time.Minute)
	err = result.Error()
	if err != nil {
		// A failure of etcd's checks is a violation; a linearization that porcupine could not finish in time
		// (Timeout, DeadlineExceeded) proves nothing either way: the history fails, as in etcd, as inconclusive.
		switch {
		case result.Assumptions.Error() != nil:
		case result.Linearization.Status == validate.Timeout || result.Linearization.Status == validate.DeadlineExceeded:
			s.inconclusive = true
		default:
			s.violation = true
		}
		t.Error(err)
	} else {
		r.SetVisualizer(result.Linearization.Visualize)
	}
	if p.readers > 0 {
		checked, err := checkSerializableReads(readerReports, persisted)
		s.serializable = checked
		if err != nil {
			s.violation = true
			t.Error(err)
		}
		if err := checkReadYourWrites(clientReports, readerReports, proxy.restarts); err != nil {
			s.violation = true
			t.Error(err)
		}
	}
	panicked = false
}

// runScenario is etcd's runScenario (v3.7.3), with the proxy's address as the only endpoint of every client:
// the traffic's and the watch collection's (one collecting watch per member, as etcd has, all through the
// proxy). The failpoint and the final HashKV check talk to the members, as in etcd's.
func runScenario(ctx context.Context, t *testing.T, s scenarios.TestScenario, readers int, lg *zap.Logger, clus *e2e.EtcdProcessCluster, proxy *proxyProcess, faultTime *time.Duration) (reports, readerReports []report.ClientReport) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g := errgroup.Group{}
	var failpointClientReport []report.ClientReport
	failpointInjected := make(chan report.FailpointInjection, 1)

	// using baseTime time-measuring operation to get monotonic clock reading
	// see https://github.com/golang/go/blob/master/src/time/time.go#L17
	baseTime := time.Now()
	proxy.base = baseTime
	ids := identity.NewIDProvider()
	g.Go(func() error {
		defer close(failpointInjected)
		// Give some time for traffic to reach qps target before injecting failpoint.
		time.Sleep(randomizeTime(WaitBeforeFailpoint, WaitJitter))
		fr, err := failpoint.Inject(ctx, t, lg, clus, s.Failpoint, baseTime, ids)
		if err != nil {
			t.Error(err)
			cancel()
		}
		// Give some time for traffic to reach qps target after injecting failpoint.
		time.Sleep(randomizeTime(WaitAfterFailpoint, WaitJitter))
		if fr != nil {
			*faultTime = fr.End - fr.Start
			failpointInjected <- fr.FailpointInjection
			failpointClientReport = fr.Client
		}
		return nil
	})
	endpoints := []string{proxy.addr}
	trafficSet := client.NewSet(ids, baseTime)
	defer trafficSet.Close()
	maxRevisionChan := make(chan int64, 1)
	var maxRevision int64
	g.Go(func() error {
		defer close(maxRevisionChan)
		operationReport, readerReport := simulateTraffic(ctx, t, lg, endpoints, s.Profile, s.Traffic, readers, failpointInjected, trafficSet)
		readerReports = readerReport
		maxRevision = report.OperationsMaxRevision(operationReport)
		maxRevisionChan <- maxRevision
		lg.Info("Finished simulating Traffic", zap.Int64("max-revision", maxRevision))
		return nil
	})
	watchSet := client.NewSet(ids, baseTime)
	defer watchSet.Close()
	g.Go(func() error {
		collectEndpoints := make([]string, len(clus.Procs))
		for i := range collectEndpoints {
			collectEndpoints[i] = proxy.addr
		}
		err := client.CollectClusterWatchEvents(ctx, client.CollectClusterWatchEventsParam{
			Lg:              lg,
			Endpoints:       collectEndpoints,
			MaxRevisionChan: maxRevisionChan,
			ClientSet:       watchSet,
		})
		return err
	})
	err := g.Wait()
	if err != nil {
		t.Error(err)
	}

	// etcd's watch collection has one watch on each member, each until the last revision of the traffic: so every
	// member has applied it when HashKV compares them. Through the proxy the collecting watches say nothing about
	// which member is there yet; wait until each is (a member still catching up after a fault would have HashKV
	// answer at an older revision, and etcd's check fail on that, not on a difference of content).
	err = waitForMembers(ctx, clus, maxRevision)
	if err != nil {
		t.Error(err)
	}
	err = client.CheckEndOfTestHashKV(ctx, clus)
	if err != nil {
		t.Error(err)
	}
	return slices.Concat(trafficSet.Reports(), watchSet.Reports(), failpointClientReport), readerReports
}

// waitForMembers waits, 30s at most, until every member has applied revision rev.
func waitForMembers(ctx context.Context, clus *e2e.EtcdProcessCluster, rev int64) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for _, member := range clus.Procs {
		ep := member.EndpointsGRPC()[0]
		c, err := clientv3.New(clientv3.Config{Endpoints: []string{ep}, Logger: zap.NewNop(), DialKeepAliveTime: 10 * time.Second, DialKeepAliveTimeout: 100 * time.Millisecond})
		if err != nil {
			return err
		}
		var last int64
		for {
			resp, err := c.Status(ctx, ep)
			if err == nil {
				last = resp.Header.Revision
				if last >= rev {
					break
				}
			}
			select {
			case <-ctx.Done():
				c.Close()
				return fmt.Errorf("member %s has not applied revision %d within 30s (at %d; %v)", member.Config().Name, rev, last, err)
			case <-time.After(100 * time.Millisecond):
			}
		}
		c.Close()
	}
	return nil
}

// As etcd's main_test.go; WaitBeforeFailpoint and WaitAfterFailpoint are set from -traffic.
var (
	WaitBeforeFailpoint = time.Second
	WaitJitter          = time.Millisecond * 200
	WaitAfterFailpoint  = time.Second
)

func randomizeTime(base time.Duration, jitter time.Duration) time.Duration {
	return base - jitter + time.Duration(rand.Int63n(int64(jitter)*2))
}

// forcestopCluster stops the etcd member with signal kill.
func forcestopCluster(clus *e2e.EtcdProcessCluster) error {
	for _, member := range clus.Procs {
		member.Kill()
	}
	return clus.ConcurrentStop()
}

// exploratoryScenario returns etcd's exploratory scenario NAME/ClusterOfSize3, with its randomized options
// drawn anew.
func exploratoryScenario(t *testing.T, name string) scenarios.TestScenario {
	for _, s := range scenarios.Exploratory(t) {
		if s.Name == filepath.Join(name, "ClusterOfSize3") {
			return s
		}
	}
	t.Fatalf("etcd has no exploratory scenario %s/ClusterOfSize3", name)
	return scenarios.TestScenario{}
}

func countOperations(s *summary, reports []report.ClientReport) {
	for _, r := range reports {
		for _, op := range r.KeyValue {
			s.operations++
			if op.Output.(model.MaybeEtcdResponse).Error != "" {
				s.failed++
			}
		}
		for _, w := range r.Watch {
			for _, resp := range w.Responses {
				s.watchEvents += len(resp.Events)
			}
		}
	}
}

// freeBasePort returns a base port for the cluster's members (e2e uses base..base+14) and the proxy (base+15),
// below the ephemeral range, all free now.
func freeBasePort(t *testing.T) int {
	for range 100 {
		base := 20000 + 20*rand.Intn(600) // 20000..31980
		free := true
		for port := base; port < base+16 && free; port++ {
			l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
			if err != nil {
				free = false
				continue
			}
			l.Close()
		}
		if free {
			return base
		}
	}
	t.Fatal("no free ports for the cluster")
	return 0
}

// resultsDirectory is where a history keeps its logs and, if it fails, etcd's report (the members' data, the
// client reports, the linearization's visualization): $RESULTS_DIR (default /tmp/etcdproxy-robustness)/TEST/TIME.
func resultsDirectory(t *testing.T, root string) string {
	dir := filepath.Join(root, strings.ReplaceAll(t.Name(), "/", "_"), fmt.Sprint(time.Now().UnixNano()))
	require.NoError(t, os.MkdirAll(dir, 0o700))
	return dir
}

// fileLogger logs to path: etcd's robustness code logs a lot, which t.Log would print with -v.
func fileLogger(t *testing.T, path string) (*zap.Logger, func()) {
	cfg := zap.NewDevelopmentConfig()
	cfg.OutputPaths = []string{path}
	cfg.ErrorOutputPaths = []string{path}
	lg, err := cfg.Build()
	require.NoError(t, err)
	return lg, func() { _ = lg.Sync() }
}

func mustAbs(t *testing.T, path string) string {
	abs, err := filepath.Abs(path)
	require.NoError(t, err)
	return abs
}

// hasArg says whether the command line sets the flag name; defaultArg sets it to value if not.
func hasArg(name string) bool {
	for _, a := range os.Args[1:] {
		a = strings.TrimLeft(a, "-")
		if a == name || strings.HasPrefix(a, name+"=") {
			return true
		}
	}
	return false
}

func defaultArg(name, value string) {
	if !hasArg(name) {
		os.Args = append(os.Args, "-"+name+"="+value)
	}
}
