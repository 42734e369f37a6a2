// Package embedetcd starts real etcd members in this process (go.etcd.io/etcd/server/v3/embed) on loopback ports
// it picks: the single member of etcdproxy-etcd (which `etcdproxy start --embedded-etcd` runs as a child process),
// and the clusters the tests run against.
//
// It owns starting, stopping and placing members (their configuration, data directories and ports). The
// etcdproxy-etcd binary imports it, so it must not hold anything test-only, nor know of the proxy. The etcdproxy
// binary must not import it (it would link etcd's server: about 5 MB of memory in every proxy process).
package embedetcd

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coreos/go-semver/semver"
	"go.etcd.io/etcd/api/v3/version"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/etcdserver"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Options describe a cluster to start.
type Options struct {
	// Dir holds one data directory per member (Dir/NAME.etcd).
	Dir string
	// Members is the cluster size; 0 means 1.
	Members int
	// LogLevel is etcd's log level; "" means "error".
	LogLevel string
	// Logger, if set, is where etcd logs (at LogLevel and above), instead of etcd's own logger on stderr. The
	// errors etcd logs for its servers closing when a member stops are left out.
	Logger *zap.Logger
	// Configure, if set, adjusts each member's configuration before it starts.
	Configure func(*embed.Config)
	// ReadyTimeout bounds the wait for the cluster to serve; 0 means 30s.
	ReadyTimeout time.Duration
	// ClientURL and PeerURL, if set, fix the URLs of a single-member cluster (a restart on the same data then finds
	// its member where it was); otherwise each member gets free loopback ports.
	ClientURL, PeerURL string
}

// Member is one etcd member.
type Member struct {
	Name      string
	ClientURL string // http://127.0.0.1:PORT
	PeerURL   string

	mu   sync.Mutex // mu protects etcd
	cfg  *embed.Config
	etcd *embed.Etcd
	// stopping is set while the member stops (see quietStop).
	stopping atomic.Bool
}

// Cluster is a set of members started together.
type Cluster struct {
	Members []*Member
}

// Start starts a cluster and waits until every member serves.
func Start(o Options) (*Cluster, error) {
	n := o.Members
	if n <= 0 {
		n = 1
	}
	ports, err := FreePorts(2 * n)
	if err != nil {
		return nil, err
	}
	if (o.ClientURL != "" || o.PeerURL != "") && (n != 1 || o.ClientURL == "" || o.PeerURL == "") {
		return nil, errors.New("embedetcd: fixed URLs need both ClientURL and PeerURL, and one member")
	}
	c := &Cluster{}
	var initial []string
	for i := 0; i < n; i++ {
		m := &Member{
			Name:      fmt.Sprintf("m%d", i),
			ClientURL: fmt.Sprintf("http://127.0.0.1:%d", ports[2*i]),
			PeerURL:   fmt.Sprintf("http://127.0.0.1:%d", ports[2*i+1]),
		}
		if o.ClientURL != "" {
			m.ClientURL, m.PeerURL = o.ClientURL, o.PeerURL
		}
		c.Members = append(c.Members, m)
		initial = append(initial, m.Name+"="+m.PeerURL)
	}
	for _, m := range c.Members {
		if m.cfg, err = memberConfig(o, m, strings.Join(initial, ",")); err != nil {
			return nil, err
		}
	}
	timeout := o.ReadyTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	// Members of a new cluster wait for each other: start them all, then wait.
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, m := range c.Members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = m.start(timeout)
		}()
	}
	wg.Wait()
	err = errors.Join(errs...)
	if err == nil {
		err = c.settle(time.Now().Add(timeout))
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// memberConfig is m's etcd configuration in a new cluster of initial (name=peerURL,...).
func memberConfig(o Options, m *Member, initial string) (*embed.Config, error) {
	cfg := embed.NewConfig()
	cfg.Name = m.Name
	cfg.Dir = filepath.Join(o.Dir, m.Name+".etcd")
	cu, err := url.Parse(m.ClientURL)
	if err != nil {
		return nil, fmt.Errorf("embedetcd: client URL: %w", err)
	}
	pu, err := url.Parse(m.PeerURL)
	if err != nil {
		return nil, fmt.Errorf("embedetcd: peer URL: %w", err)
	}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = initial
	cfg.InitialClusterToken = "etcdproxy"
	cfg.LogLevel = o.LogLevel
	if cfg.LogLevel == "" {
		cfg.LogLevel = "error"
	}
	if o.Logger != nil {
		level, err := zapcore.ParseLevel(cfg.LogLevel)
		if err != nil {
			return nil, fmt.Errorf("embedetcd: log level: %w", err)
		}
		lg := o.Logger.WithOptions(zap.IncreaseLevel(level), zap.WrapCore(func(c zapcore.Core) zapcore.Core {
			return quietStop{Core: c, stopping: &m.stopping}
		}))
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(lg)
	}
	if o.Configure != nil {
		o.Configure(cfg)
	}
	return cfg, nil
}

// settle waits until every member has applied the cluster version that its leader sets through raft soon after a
// new cluster starts (nil until then), and has its storage version: a member serving before that still has a
// membership entry to apply, whose apply holds the member's cluster lock while it writes the backend. A test that
// stalls a member's apply (by holding its backend's write lock) would then stall every RPC of the member, which
// checks membership first, instead of only the member's applies.
func (c *Cluster) settle(deadline time.Time) error {
	want := semver.Must(semver.NewVersion(version.Version))
	settled := func(s *etcdserver.EtcdServer) bool {
		cv, sv := s.ClusterVersion(), s.StorageVersion()
		return cv != nil && sv != nil && cv.Major == want.Major && cv.Minor == want.Minor &&
			sv.Major == want.Major && sv.Minor == want.Minor
	}
	for _, m := range c.Members {
		s := m.Etcd().Server
		for !settled(s) {
			if time.Now().After(deadline) {
				return fmt.Errorf("etcd member %s: cluster version %v, storage version %v: not %d.%d before the deadline",
					m.Name, s.ClusterVersion(), s.StorageVersion(), want.Major, want.Minor)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return nil
}

// Endpoints returns the client URLs of every member.
func (c *Cluster) Endpoints() []string {
	var eps []string
	for _, m := range c.Members {
		eps = append(eps, m.ClientURL)
	}
	return eps
}

// Close stops every member.
func (c *Cluster) Close() {
	for _, m := range c.Members {
		m.Stop()
	}
}

// Etcd returns the running member, or nil when it is stopped.
func (m *Member) Etcd() *embed.Etcd {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.etcd
}

// Stop stops the member; its data stays for Restart.
func (m *Member) Stop() {
	m.mu.Lock()
	e := m.etcd
	m.etcd = nil
	m.mu.Unlock()
	if e != nil {
		m.stopping.Store(true)
		e.Close()
	}
}

// Restart starts a stopped member again on the same ports and data.
func (m *Member) Restart(timeout time.Duration) error {
	m.cfg.ClusterState = embed.ClusterStateFlagExisting
	return m.start(timeout)
}

func (m *Member) start(timeout time.Duration) error {
	m.stopping.Store(false)
	e, err := embed.StartEtcd(m.cfg)
	if err != nil {
		return fmt.Errorf("etcd member %s: %w", m.Name, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return fmt.Errorf("etcd member %s: %w", m.Name, err)
	case <-time.After(timeout):
		e.Close()
		return fmt.Errorf("etcd member %s: not ready within %v", m.Name, timeout)
	}
	m.mu.Lock()
	m.etcd = e
	m.mu.Unlock()
	return nil
}

// FreePorts returns n distinct loopback ports that were free a moment ago.
func FreePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
