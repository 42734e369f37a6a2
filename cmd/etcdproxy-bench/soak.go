package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/embedetcd"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// The soak (-soak DURATION, `make soak`): one etcdproxy process in front of a three-member etcd cluster (each member
// its own process) for DURATION, carrying at once
//   - W watchers (100 per Watch stream, 10 connections) of K keys, each from the revision the soak started at;
//   - L leases kept alive over LeaseKeepAlive streams (100 leases per stream), every lease renewed each TTL/3;
//   - writes through the proxy to the watched keys, paced, and serializable reads of them through the proxy (the
//     read cache: hits, and invalidations by the writes);
//   - every RestartEvery, one member killed (SIGKILL) and restarted 5 s later, in turn (leaders included); every
//     CompactEvery, a compaction to the revision seen one period before (as Kubernetes' API server compacts).
//
// Every SampleEvery the proxy's RSS (/proc) and goroutines (its /metrics) are sampled. At the end the soak checks:
// no growth trend in either (after a warm-up, the median of the last third against the median of the first third),
// every event delivered exactly once to every watcher (each watcher's revisions against etcd's own watch of the same
// keys, taken straight from the cluster: same count, same last revision, same digest, strictly increasing), no
// watcher cancelled, no watch stream ended, and every lease alive at the end (TimeToLive straight from etcd). It
// writes the samples (CSV), two plots (SVG) and a Markdown summary to -soak-out, and fails when a check fails.

// soakConfig is the soak's size; flags set it (main.go).
type soakConfig struct {
	duration     time.Duration
	sampleEvery  time.Duration
	restartEvery time.Duration
	compactEvery time.Duration
	watchers     int
	keys         int
	leases       int
	leaseTTL     int64 // seconds
	writeRate    int   // puts per second
	readRate     int   // serializable reads per second
	out          string
}

// soak is one soak run: the cluster, the proxy, and the load's bookkeeping.
type soak struct {
	cfg     soakConfig
	etcdBin string
	proxy   string // etcdproxy binary

	dir     string
	procs   procs
	members []*soakMember
	proxyP  *proc
	addr    string // the proxy's host:port

	startRev int64
	events   soakEvents // restarts and compactions, for the summary
}

// soakMember is one etcd member: its process and what restarting it needs.
type soakMember struct {
	name, client string // client: host:port
	args         []string
	log          string
	p            *proc
}

// soakEvents is the log of what the soak did to the cluster.
type soakEvents struct {
	mu   sync.Mutex
	list []soakEvent
}

type soakEvent struct {
	at   time.Time
	what string
	kill bool // a member was killed: the plots mark it
}

func (e *soakEvents) add(format string, args ...any) {
	ev := soakEvent{at: time.Now(), what: fmt.Sprintf(format, args...), kill: strings.HasSuffix(format, "killed (SIGKILL)")}
	logf("soak: %s", ev.what)
	e.mu.Lock()
	e.list = append(e.list, ev)
	e.mu.Unlock()
}

func (e *soakEvents) all() []soakEvent {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]soakEvent(nil), e.list...)
}

// runSoak runs the soak and writes its outputs; its error says which check failed.
func runSoak(ctx context.Context, etcdBin, proxyBin string, cfg soakConfig) error {
	if etcdBin == "" || proxyBin == "" {
		return errors.New("the soak needs -etcd and -etcdproxy")
	}
	s := &soak{cfg: cfg, etcdBin: etcdBin, proxy: proxyBin}
	defer s.close()
	if err := s.startCluster(ctx); err != nil {
		return err
	}
	if err := s.startProxy(ctx); err != nil {
		return err
	}
	res, err := s.run(ctx)
	if err != nil {
		return err
	}
	return s.report(res)
}

func (s *soak) startCluster(ctx context.Context) error {
	var err error
	if s.dir, err = os.MkdirTemp("", "etcdproxy-soak-"); err != nil {
		return err
	}
	ports, err := embedetcd.FreePorts(6)
	if err != nil {
		return err
	}
	var initial []string
	for i := range 3 {
		initial = append(initial, fmt.Sprintf("m%d=http://127.0.0.1:%d", i, ports[2*i+1]))
	}
	for i := range 3 {
		m := &soakMember{name: fmt.Sprintf("m%d", i), client: fmt.Sprintf("127.0.0.1:%d", ports[2*i]),
			log: filepath.Join(s.dir, fmt.Sprintf("m%d.log", i))}
		peer := fmt.Sprintf("http://127.0.0.1:%d", ports[2*i+1])
		m.args = []string{s.etcdBin, "--name", m.name, "--data-dir", filepath.Join(s.dir, m.name),
			"--listen-client-urls", "http://" + m.client, "--advertise-client-urls", "http://" + m.client,
			"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
			"--initial-cluster", strings.Join(initial, ","), "--initial-cluster-state", "new",
			"--log-level", "error"}
		if m.p, err = s.procs.start(m.name, m.log, m.args...); err != nil {
			return err
		}
		s.members = append(s.members, m)
	}
	for _, m := range s.members {
		if err := waitServing(ctx, m.client, m.p, 60*time.Second); err != nil {
			return err
		}
	}
	return nil
}

func (s *soak) endpoints() []string {
	var eps []string
	for _, m := range s.members {
		eps = append(eps, m.client)
	}
	return eps
}

func (s *soak) startProxy(ctx context.Context) error {
	ports, err := embedetcd.FreePorts(1)
	if err != nil {
		return err
	}
	s.addr = fmt.Sprintf("127.0.0.1:%d", ports[0])
	s.proxyP, err = s.procs.start("etcdproxy", filepath.Join(s.dir, "etcdproxy.log"), s.proxy, "start",
		"--endpoints="+strings.Join(s.endpoints(), ","), "--listen-addr="+s.addr,
		"--data-dir="+filepath.Join(s.dir, "proxy"))
	if err != nil {
		return err
	}
	return waitServing(ctx, s.addr, s.proxyP, 30*time.Second)
}

// client returns a clientv3 client of the given endpoints (the soak's own, quiet).
func (s *soak) client(endpoints ...string) (*clientv3.Client, error) {
	return clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
}

// restartMember kills member i and starts it again after a pause, on the same data directory.
func (s *soak) restartMember(ctx context.Context, i int) error {
	m := s.members[i]
	m.p.kill()
	s.events.add("%s killed (SIGKILL)", m.name)
	if err := sleepCtx(ctx, 5*time.Second); err != nil {
		return err
	}
	p, err := s.procs.start(m.name, m.log, m.args...)
	if err != nil {
		return err
	}
	m.p = p
	if err := waitServing(ctx, m.client, m.p, 60*time.Second); err != nil {
		return err
	}
	s.events.add("%s restarted and serving", m.name)
	return nil
}

func (s *soak) close() {
	s.procs.killAll()
	if s.dir != "" {
		os.RemoveAll(s.dir)
	}
}
