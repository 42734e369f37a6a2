package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// proc is a child process the benchmark started: etcd, etcd's grpc-proxy or etcdproxy. Each runs in its own
// process group and dies with the benchmark (Pdeathsig), so that nothing outlives a crash or a Ctrl-C.
type proc struct {
	name    string
	args    []string
	logPath string
	cmd     *exec.Cmd
	exited  chan struct{} // closed by the goroutine that waits for the process
	waitErr error         // set before exited is closed
}

// procs is the set of children to kill on exit.
type procs struct {
	mu   sync.Mutex // mu protects list
	list []*proc
}

func (ps *procs) start(name, logPath string, args ...string) (*proc, error) {
	p := &proc{name: name, args: args, logPath: logPath}
	if err := p.start(); err != nil {
		return nil, err
	}
	ps.mu.Lock()
	ps.list = append(ps.list, p)
	ps.mu.Unlock()
	return p, nil
}

func (p *proc) start() error {
	logf, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(p.args[0], p.args[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", p.name, err)
	}
	p.cmd = cmd
	p.exited = make(chan struct{})
	go func() {
		defer close(p.exited)
		p.waitErr = cmd.Wait()
		logf.Close()
	}()
	return nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// alive reports whether the process is still running.
func (p *proc) alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// kill ends the process (SIGKILL, to its whole group) and waits for it.
func (p *proc) kill() {
	if p.cmd == nil || !p.alive() {
		return
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
	}
}

// restart kills the process and starts it again with the same arguments (so on the same listen address and data
// directory), appending to the same log. The caller waits for it to serve.
func (p *proc) restart() error {
	old := p.pid()
	p.kill()
	if p.alive() {
		return fmt.Errorf("restart %s: pid %d still running 5 s after SIGKILL", p.name, old)
	}
	return p.start()
}

// pause stops the process (SIGSTOP, to its whole group) until resume: it then sends nothing to anyone, while its
// connections stay open. A paused process still dies with the benchmark (SIGKILL ends a stopped process).
func (p *proc) pause() error { return syscall.Kill(-p.cmd.Process.Pid, syscall.SIGSTOP) }

// resume continues a paused process (SIGCONT).
func (p *proc) resume() error { return syscall.Kill(-p.cmd.Process.Pid, syscall.SIGCONT) }

// logTail returns the last lines of the process's log, for error messages.
func (p *proc) logTail() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return strings.Join(lines, "\n")
}

func (ps *procs) killAll() {
	ps.mu.Lock()
	list := ps.list
	ps.list = nil
	ps.mu.Unlock()
	for _, p := range list {
		p.kill()
	}
}

// dial opens a plain gRPC connection to addr (host:port) and starts connecting.
func dial(addr string) (*grpc.ClientConn, error) {
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30), grpc.MaxCallSendMsgSize(1<<30)))
	if err != nil {
		return nil, err
	}
	cc.Connect()
	return cc, nil
}

// dialN opens n connections to addr; closeAll closes them (also those opened before an error).
func dialN(addr string, n int) (conns []*grpc.ClientConn, closeAll func(), err error) {
	closeAll = func() {
		for _, cc := range conns {
			cc.Close()
		}
	}
	for range n {
		cc, err := dial(addr)
		if err != nil {
			closeAll()
			return nil, func() {}, err
		}
		conns = append(conns, cc)
	}
	return conns, closeAll, nil
}

// waitServing polls addr with Maintenance.Status until it answers, p exits, or timeout passes.
//
// Not with a read: a Range through etcdproxy is a use of its read cache, which opens the cache's keyspace watch
// and keeps it 30 s after the last read. Probed with a Range, every proxy the benchmark (re)started ran the
// workloads of its first half minute with that watch, each write's reply waiting for its event: the put rows, said
// to run before any read, did not.
func waitServing(ctx context.Context, addr string, p *proc, timeout time.Duration) error {
	cc, err := dial(addr)
	if err != nil {
		return err
	}
	defer cc.Close()
	mc := pb.NewMaintenanceClient(cc)
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		if p != nil && !p.alive() {
			return fmt.Errorf("%s exited (%v); log:\n%s", p.name, p.waitErr, p.logTail())
		}
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		_, last = mc.Status(cctx, &pb.StatusRequest{})
		cancel()
		if last == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		time.Sleep(50 * time.Millisecond)
	}
	msg := fmt.Sprintf("%s not serving on %s within %v: %v", nameOr(p, "endpoint"), addr, timeout, last)
	if p != nil {
		msg += "; log:\n" + p.logTail()
	}
	return errors.New(msg)
}

func nameOr(p *proc, s string) string {
	if p == nil {
		return s
	}
	return p.name
}

// clockTick is USER_HZ, the unit of utime and stime in /proc/PID/stat; 100 on every Linux this runs on.
const clockTick = 10 * time.Millisecond

// procSyscalls returns the read and write system calls process pid has made (syscr + syscw of /proc/PID/io), or -1.
func procSyscalls(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
	if err != nil {
		return -1
	}
	var n int64
	found := 0
	for _, line := range strings.Split(string(b), "\n") {
		name, v, ok := strings.Cut(line, ": ")
		if ok && (name == "syscr" || name == "syscw") {
			c, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return -1
			}
			n += c
			found++
		}
	}
	if found != 2 {
		return -1
	}
	return n
}

// procCPU returns the user+system CPU time pid has used (all its threads, live and ended).
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces: fields are counted after its closing parenthesis.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// After ")": state is field 3, so utime (field 14) is f[11] and stime (field 15) f[12].
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return time.Duration(ut+st) * clockTick, nil
}

// resetPeakRSS resets the VmHWM of pid to its current RSS (clear_refs 5), so that a workload's peak can be read.
func resetPeakRSS(pid int) error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
}

// peakRSS returns VmHWM of pid in bytes.
func peakRSS(pid int) (int64, error) { return statusBytes(pid, "VmHWM:") }

// statusBytes returns a field of /proc/PID/status given in kB (VmRSS:, VmHWM:), in bytes.
func statusBytes(pid int, field string) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if v, ok := strings.CutPrefix(line, field); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb * 1024, err
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no %s", pid, strings.TrimSuffix(field, ":"))
}

// scrapeMetrics reads the Prometheus text at url and returns the sum of every sample of each wanted metric (all
// label sets added up).
func scrapeMetrics(ctx context.Context, url string, names ...string) (map[string]float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	// Uncompressed: a gzip answer costs the measured process a compressor (about 1.8 MB allocated per scrape once
	// the collector has emptied the pool it is kept in), right before or after the window it is read around.
	req.Header.Set("Accept-Encoding", "identity")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return parseMetrics(resp.Body, names...)
}

func parseMetrics(r io.Reader, names ...string) (map[string]float64, error) {
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		name := line
		if i := strings.IndexAny(line, "{ "); i >= 0 {
			name = line[:i]
		}
		if !want[name] {
			continue
		}
		rest := line[len(name):]
		if strings.HasPrefix(rest, "{") {
			rest = rest[strings.LastIndexByte(rest, '}')+1:]
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			continue
		}
		out[name] += v
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	for _, n := range names {
		if _, ok := out[n]; !ok {
			return out, fmt.Errorf("metric %s not exported", n)
		}
	}
	return out, nil
}
