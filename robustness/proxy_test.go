package robustness

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"

	"go.etcd.io/etcd/tests/v3/framework/e2e"
	"go.etcd.io/etcd/tests/v3/robustness/failpoint"
	"go.etcd.io/etcd/tests/v3/robustness/identity"
	"go.etcd.io/etcd/tests/v3/robustness/report"
	"go.etcd.io/etcd/tests/v3/robustness/traffic"
)

// proxyProcess is the etcdproxy binary, run as its own process in front of the cluster's members. Every client of
// a history (traffic, watch collection) talks to addr only.
type proxyProcess struct {
	bin       string
	addr      string   // --listen-addr, host:port
	endpoints []string // --endpoints: the members' client URLs
	logPath   string   // the output of every instance, appended

	cmd    *exec.Cmd
	exited chan error
	// stats sums the read cache's counters of the instances already stopped.
	stats cacheStats
	// base is the history's time origin (its operations' Call and Return count from it); restarts are the
	// windows, from base, from a restart's stop to the new instance serving (set by restart).
	base     time.Time
	restarts [][2]int64
}

// cacheStats are the proxy's read-cache counters (its /metrics).
type cacheStats struct {
	hits, misses, authPolls float64
	linHits, barriers       float64 // linearizable reads answered from the cache, and the barrier reads sent for them
}

func (s *cacheStats) add(o cacheStats) {
	s.hits += o.hits
	s.misses += o.misses
	s.authPolls += o.authPolls
	s.linHits += o.linHits
	s.barriers += o.barriers
}

// startProxy starts the binary on addr.
func startProxy(ctx context.Context, bin, addr string, endpoints []string, logPath string) (*proxyProcess, error) {
	p := &proxyProcess{bin: bin, addr: addr, endpoints: endpoints, logPath: logPath}
	return p, p.start(ctx)
}

// start runs an instance on p.addr and returns once it told systemd (a notify socket) that it serves.
func (p *proxyProcess) start(ctx context.Context) error {
	dir, err := os.MkdirTemp("", "etcdproxy-notify") // short: a unix socket path is at most 108 bytes
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "notify.sock")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer notify.Close()
	logs, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logs.Close() // the child has its own descriptor
	p.cmd = exec.Command(p.bin, "start", "--endpoints="+strings.Join(p.endpoints, ","), "--listen-addr="+p.addr)
	p.cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+sock)
	p.cmd.Stdout, p.cmd.Stderr = logs, logs
	if err := p.cmd.Start(); err != nil {
		return err
	}
	exited := make(chan error, 1)
	p.exited = exited
	go func() { exited <- p.cmd.Wait() }()
	buf := make([]byte, 64)
	_ = notify.SetReadDeadline(time.Now().Add(30 * time.Second))
	n, err := notify.Read(buf)
	if err != nil || string(buf[:n]) != "READY=1" {
		p.kill()
		return fmt.Errorf("etcdproxy on %s not ready within 30s (%q, %v): see %s", p.addr, buf[:n], err, p.logPath)
	}
	return ctx.Err()
}

// stop ends the instance with SIGTERM, as an operator would, and checks that it exits 0 within 15s. The read
// cache's counters are read just before.
func (p *proxyProcess) stop() error {
	if p.cmd == nil {
		return nil
	}
	if s, err := p.scrape(); err == nil {
		p.stats.add(s)
	}
	cmd := p.cmd
	p.cmd = nil
	select {
	case err := <-p.exited:
		return fmt.Errorf("etcdproxy exited before it was stopped: %v (see %s)", err, p.logPath)
	default:
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	select {
	case err := <-p.exited:
		if err != nil {
			return fmt.Errorf("etcdproxy exit after SIGTERM: %v (see %s)", err, p.logPath)
		}
		return nil
	case <-time.After(15 * time.Second):
		_ = cmd.Process.Kill()
		<-p.exited
		return fmt.Errorf("etcdproxy still running 15s after SIGTERM (see %s)", p.logPath)
	}
}

// kill ends the instance with SIGKILL, if it runs.
func (p *proxyProcess) kill() {
	if p.cmd == nil {
		return
	}
	_ = p.cmd.Process.Kill()
	<-p.exited
	p.cmd = nil
}

// restart stops the instance with SIGTERM and starts a new one on the same port.
func (p *proxyProcess) restart(ctx context.Context) error {
	if err := p.stop(); err != nil {
		return err
	}
	return p.start(ctx)
}

// scrape reads the read cache's counters from the running instance's /metrics (served on --listen-addr).
func (p *proxyProcess) scrape() (cacheStats, error) {
	var s cacheStats
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + p.addr + "/metrics")
	if err != nil {
		return s, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), " ")
		if !ok || strings.HasPrefix(name, "#") {
			continue
		}
		name, _, _ = strings.Cut(name, "{")
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			continue
		}
		switch name {
		case "etcdproxy_kvcache_hits_total":
			s.hits += v
		case "etcdproxy_kvcache_misses_total":
			s.misses += v
		case "etcdproxy_kvcache_auth_polls_total":
			s.authPolls += v
		case "etcdproxy_kvcache_linearizable_hits_total":
			s.linHits += v
		case "etcdproxy_kvcache_linearizable_batches_total":
			s.barriers += v
		}
	}
	return s, sc.Err()
}

// cacheStats returns the read cache's counters over every instance so far.
func (p *proxyProcess) cacheStats() cacheStats {
	s := p.stats
	if p.cmd != nil {
		if cur, err := p.scrape(); err == nil {
			s.add(cur)
		}
	}
	return s
}

// proxyRestart is the fault "etcdproxy restarted mid-traffic": SIGTERM (the proxy ends its streams with
// Unavailable and exits), then a new process on the same port; the clients reconnect, and their watches resume.
// It runs through failpoint.Inject like etcd's own failpoints, which checks every member's health before and
// after it.
type proxyRestart struct{ proxy *proxyProcess }

var _ failpoint.Failpoint = proxyRestart{}

func (f proxyRestart) Inject(ctx context.Context, _ *testing.T, lg *zap.Logger, _ *e2e.EtcdProcessCluster, _ time.Time, _ identity.Provider) ([]report.ClientReport, error) {
	if f.proxy == nil {
		return nil, errors.New("no proxy to restart")
	}
	lg.Info("Restarting etcdproxy", zap.String("addr", f.proxy.addr))
	stop := time.Since(f.proxy.base).Nanoseconds()
	err := f.proxy.restart(ctx)
	f.proxy.restarts = append(f.proxy.restarts, [2]int64{stop, time.Since(f.proxy.base).Nanoseconds()})
	lg.Info("Restarted etcdproxy", zap.Error(err))
	return nil, err
}

func (f proxyRestart) Name() string { return "EtcdproxyRestart" }

func (f proxyRestart) Available(e2e.EtcdProcessClusterConfig, e2e.EtcdProcess, traffic.Profile) bool {
	return true
}
