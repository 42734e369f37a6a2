package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/embedetcd"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
)

// fakeProxyEnv, when set to host:port in the environment of this test binary, makes it a fake proxy on that
// address instead of running the tests: a process that the benchmark can start, wait for and restart as it does
// a real proxy.
const fakeProxyEnv = "ETCDPROXY_BENCH_FAKE_PROXY"

func TestMain(m *testing.M) {
	if addr := os.Getenv(fakeProxyEnv); addr != "" {
		serveFakeProxy(addr)
		return
	}
	os.Exit(m.Run())
}

// fakeMaintenance answers Status with an empty response, which is all waitServing asks. It serves no KV: a
// waitServing that probed with a read (which starts etcdproxy's read-cache watch, procs.go) would not see it
// serving.
type fakeMaintenance struct {
	pb.UnimplementedMaintenanceServer
}

func (fakeMaintenance) Status(context.Context, *pb.StatusRequest) (*pb.StatusResponse, error) {
	return &pb.StatusResponse{Header: &pb.ResponseHeader{}}, nil
}

func serveFakeProxy(addr string) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake proxy:", err)
		os.Exit(1)
	}
	srv := grpc.NewServer()
	pb.RegisterMaintenanceServer(srv, fakeMaintenance{})
	fmt.Fprintln(os.Stderr, "fake proxy:", srv.Serve(l))
	os.Exit(1)
}

// TestFreshWorkloads: every watch workload (W=100000 too) and the keepalive workload start on fresh proxy
// processes; no other workload restarts anything.
func TestFreshWorkloads(t *testing.T) {
	for _, c := range []config{{watchers100k: true}, {quick: true}} {
		b := &bench{plan: newPlan(c)}
		var fresh []string
		for _, w := range b.workloads() {
			want := strings.HasPrefix(w.name, "watch ") || strings.HasPrefix(w.name, "lease keepalive ")
			if w.fresh != want {
				t.Errorf("%s mode, %q: fresh %v, want %v", b.plan.mode, w.name, w.fresh, want)
			}
			if w.fresh {
				fresh = append(fresh, w.name)
			}
		}
		want := 4*len(b.plan.watchers) + 1 // one key and prefix, burst and one at a time; keepalive
		if b.plan.bigWatchers > 0 {
			want++
		}
		if len(fresh) != want {
			t.Errorf("%s mode: %d fresh workloads %q, want %d", b.plan.mode, len(fresh), fresh, want)
		}
		if c.watchers100k && !slices.Contains(fresh, watchSpec{watchers: 100000, burst: true}.name()) {
			t.Errorf("full mode: W=100000 not fresh: %q", fresh)
		}
	}
}

// TestFreshRestart: before a fresh workload's first round, a proxy the benchmark started is replaced by a new
// process on the same address, serving, whose pid the target then carries (CPU and RSS are read from it), and its
// pooled connections are dropped; the rounds after the first run on that same process. A proxy given by address
// is left alone and its rounds say that their RSS may include earlier workloads; direct is never restarted. A
// workload that is not fresh restarts nothing.
func TestFreshRestart(t *testing.T) {
	ports, err := embedetcd.FreePorts(1)
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", ports[0])
	t.Setenv(fakeProxyEnv, addr) // the children inherit it; the test process has read it already
	b := &bench{}
	defer b.close()
	p, err := b.procs.start(etcdproxy, filepath.Join(t.TempDir(), "fake.log"), os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if err := waitServing(ctx, addr, p, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	started := &target{name: etcdproxy, addr: addr, pid: p.pid(), proc: p}
	given := &target{name: grpcProxy, addr: "127.0.0.1:1", pid: 12345}
	b.targets = []*target{{name: direct, addr: "127.0.0.1:1"}, given, started}
	if _, err := b.pool(started, 2); err != nil {
		t.Fatal(err)
	}
	first := started.pid

	pidsSeen := map[string][]int{}
	run := func(ctx context.Context, tg *target, round int) (*measurement, error) {
		pidsSeen[tg.name] = append(pidsSeen[tg.name], tg.pid)
		if tg == started {
			if err := waitServing(ctx, tg.addr, tg.proc, time.Second); err != nil {
				return nil, err
			}
		}
		return &measurement{samples: []sample{{metric: mProxyRSS, value: 1}}}, nil
	}
	res := b.runWorkload(ctx, workload{name: "fresh", rounds: 2, fresh: true, run: run})
	for name, errs := range res.errs {
		t.Errorf("%s: %q", name, errs)
	}
	if started.pid == first || started.pid != started.proc.pid() || started.addr != addr {
		t.Errorf("after the restart: pid %d (was %d, process %d), address %s (was %s)", started.pid, first,
			started.proc.pid(), started.addr, addr)
	}
	if err := syscall.Kill(first, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("the old process (pid %d) is still there: kill 0 gives %v", first, err)
	}
	if got := pidsSeen[etcdproxy]; !slices.Equal(got, []int{started.pid, started.pid}) {
		t.Errorf("rounds ran on pids %v, want the fresh process %d in both", got, started.pid)
	}
	if got := pidsSeen[grpcProxy]; !slices.Equal(got, []int{12345, 12345}) {
		t.Errorf("the proxy given by address: rounds on pids %v, want its own 12345", got)
	}
	if _, ok := b.pools[etcdproxy]; ok {
		t.Error("the restarted target's pooled connections were kept")
	}
	if n := count(res.notes[grpcProxy], notRestarted); n != 2 {
		t.Errorf("the proxy given by address: notes %q, want %q on both rounds", res.notes[grpcProxy], notRestarted)
	}
	if len(res.notes[etcdproxy]) > 0 || len(res.notes[direct]) > 0 {
		t.Errorf("notes on the restarted target %q or on direct %q", res.notes[etcdproxy], res.notes[direct])
	}

	fresh := started.pid
	res = b.runWorkload(ctx, workload{name: "not fresh", rounds: 1, run: run})
	if started.pid != fresh || len(res.notes[grpcProxy]) > 0 {
		t.Errorf("a workload that is not fresh: pid %d (was %d), notes %q", started.pid, fresh, res.notes[grpcProxy])
	}
}
