package main

import (
	"errors"
	"io"
	"reflect"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/overrides"
	"github.com/etcdproxy/etcdproxy/overrides/kvcache"
	"github.com/etcdproxy/etcdproxy/overrides/lease"
	"github.com/etcdproxy/etcdproxy/overrides/members"
	"github.com/etcdproxy/etcdproxy/overrides/ryw"
	"github.com/etcdproxy/etcdproxy/proxy"
)

// TestFlagsReachConfig: every flag that tunes the proxy itself reaches its configuration.
func TestFlagsReachConfig(t *testing.T) {
	f := &startFlags{}
	cmd := startCommand(f, runStart)
	if err := cmd.ParseFlags([]string{"--experimental-serializable-ordering", "--max-send-bytes", "1000",
		"--max-recv-bytes", "2000", "--max-concurrent-streams", "7", "--grpc-keepalive-min-time", "3s",
		"--grpc-keepalive-interval", "4s", "--grpc-keepalive-timeout", "5s", "--enable-pprof",
		"--kv-cache-bytes", "123", "--kv-cache-ttl", "6s", "--experimental-enable-grpc-logging", "--namespace", "/t1/",
		"--lease-keepalive-streams", "9", "--kv-cache-watch-idle", "7s", "--lease-renew-timeout", "8s",
		"--grpc-dynamic-window"}); err != nil {
		t.Fatal(err)
	}
	want := proxy.Config{MaxRecvBytes: 1000, MaxSendBytes: 2000, MaxConcurrentStreams: 7, DynamicWindows: true,
		KeepaliveMinTime: 3 * time.Second, KeepaliveInterval: 4 * time.Second, KeepaliveTimeout: 5 * time.Second,
		EnablePprof: true, LogCalls: true, Overrides: overrides.Config{
			KVCache:        kvcache.Options{MaxBytes: 123, TTL: 6 * time.Second, WatchIdle: 7 * time.Second},
			ReadYourWrites: ryw.Options{Ordering: true}, Lease: lease.Options{Streams: 9, RenewTimeout: 8 * time.Second}, Namespace: "/t1/"}}
	if got := f.proxyConfig(); !reflect.DeepEqual(got, want) {
		t.Errorf("proxy configuration from the flags:\n got %+v\nwant %+v", got, want)
	}
}

// TestLeasingRefused: --experimental-leasing-prefix is listed but refused, with the reason.
func TestLeasingRefused(t *testing.T) {
	cmd := newStartCommand()
	cmd.SetArgs([]string{"--experimental-leasing-prefix", "/leasing/"})
	cmd.SetOut(io.Discard)
	cmd.SetErr(io.Discard)
	if err := cmd.Execute(); !errors.Is(err, errLeasing) {
		t.Fatalf("start --experimental-leasing-prefix: %v; want %v", err, errLeasing)
	}
}

// TestResolverFlags: --resolver-prefix and --resolver-ttl are validated as etcd grpc-proxy validates them.
func TestResolverFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		err  string
	}{
		{[]string{"--resolver-prefix", "/proxies"}, "invalid resolver-ttl 0"},
		{[]string{"--resolver-ttl", "5"}, `invalid resolver-prefix ""`},
		{[]string{"--resolver-prefix", "/proxies", "--resolver-ttl", "5", "--advertise-client-url", ""}, `invalid advertise-client-url ""`},
	} {
		cmd := newStartCommand()
		cmd.SetArgs(c.args)
		cmd.SetOut(io.Discard)
		cmd.SetErr(io.Discard)
		if err := cmd.Execute(); err == nil || err.Error() != c.err {
			t.Errorf("start %v: %v; want %q", c.args, err, c.err)
		}
	}
}

// TestMembersFlags: MemberList answers with the proxies only when the advertised URL is given or with a prefix
// (which registers the URL under the namespace); given empty, MemberList is etcd's.
func TestMembersFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		want members.Options
	}{
		{nil, members.Options{}},
		{[]string{"--listen-addr", "127.0.0.1:5000"}, members.Options{}},
		{[]string{"--advertise-client-url", "10.0.0.1:23790"}, members.Options{Advertise: "10.0.0.1:23790"}},
		{[]string{"--advertise-client-url", ""}, members.Options{}},
		{[]string{"--resolver-prefix", "/p", "--resolver-ttl", "5"}, members.Options{Advertise: "127.0.0.1:23790", Prefix: "/p"}},
		{[]string{"--resolver-prefix", "/p", "--resolver-ttl", "5", "--namespace", "/ns/", "--advertise-client-url", "h:1"},
			members.Options{Advertise: "h:1", Prefix: "/ns//p"}},
	} {
		var got members.Options
		cmd := startCommand(&startFlags{}, func(f *startFlags) error { got = f.proxyConfig().Overrides.Members; return nil })
		cmd.SetArgs(c.args)
		cmd.SetOut(io.Discard)
		cmd.SetErr(io.Discard)
		if err := cmd.Execute(); err != nil {
			t.Fatalf("start %v: %v", c.args, err)
		}
		if got != c.want {
			t.Errorf("start %v: MemberList options %+v, want %+v", c.args, got, c.want)
		}
	}
}

// TestLinearizableCacheFlag: --kv-cache-linearizable is on by default, and false keeps linearizable reads away
// from the cache.
func TestLinearizableCacheFlag(t *testing.T) {
	for _, c := range []struct {
		args []string
		want bool
	}{{nil, false}, {[]string{"--kv-cache-linearizable=false"}, true}, {[]string{"--kv-cache-linearizable"}, false}} {
		f := &startFlags{}
		if err := startCommand(f, runStart).ParseFlags(c.args); err != nil {
			t.Fatal(err)
		}
		if got := f.proxyConfig().Overrides.KVCache.SerializableOnly; got != c.want {
			t.Errorf("%v: SerializableOnly %v, want %v", c.args, got, c.want)
		}
	}
}

// TestCacheAdmitFlag: --kv-cache-admit is second by default (the doorkeeper), first stores every miss, and any
// other value is refused.
func TestCacheAdmitFlag(t *testing.T) {
	checkFlag(t, []flagCase[bool]{
		{nil, false, ""},
		{[]string{"--kv-cache-admit", "second"}, false, ""},
		{[]string{"--kv-cache-admit=first"}, true, ""},
		{[]string{"--kv-cache-admit", "third"}, false, `--kv-cache-admit: "third" is neither first nor second`},
	}, func(c proxy.Config) bool { return c.Overrides.KVCache.AdmitFirst })
}

// TestLeaseStreamsFlag: --lease-keepalive-streams defaults to lease.DefaultStreams and must be at least 1.
func TestLeaseStreamsFlag(t *testing.T) {
	checkFlag(t, []flagCase[int]{
		{nil, lease.DefaultStreams, ""},
		{[]string{"--lease-keepalive-streams", "1"}, 1, ""},
		{[]string{"--lease-keepalive-streams=0"}, 0, "--lease-keepalive-streams: 0 is not at least 1"},
		{[]string{"--lease-keepalive-streams", "-3"}, 0, "--lease-keepalive-streams: -3 is not at least 1"},
	}, func(c proxy.Config) int { return c.Overrides.Lease.Streams })
}

// TestLeaseRenewTimeoutFlag: --lease-renew-timeout defaults to lease.DefaultRenewTimeout and must be positive.
func TestLeaseRenewTimeoutFlag(t *testing.T) {
	checkFlag(t, []flagCase[time.Duration]{
		{nil, lease.DefaultRenewTimeout, ""},
		{[]string{"--lease-renew-timeout", "3.5s"}, 3500 * time.Millisecond, ""},
		{[]string{"--lease-renew-timeout=0"}, 0, "--lease-renew-timeout: 0s is not positive"},
		{[]string{"--lease-renew-timeout", "-1s"}, 0, "--lease-renew-timeout: -1s is not positive"},
	}, func(c proxy.Config) time.Duration { return c.Overrides.Lease.RenewTimeout })
}

// TestWatchIdleFlag: --kv-cache-watch-idle defaults to kvcache.DefaultWatchIdle, 0 keeps the watch always on (a
// negative WatchIdle), and a negative value is refused.
func TestWatchIdleFlag(t *testing.T) {
	checkFlag(t, []flagCase[time.Duration]{
		{nil, kvcache.DefaultWatchIdle, ""},
		{[]string{"--kv-cache-watch-idle", "2m"}, 2 * time.Minute, ""},
		{[]string{"--kv-cache-watch-idle=0"}, -1, ""},
		{[]string{"--kv-cache-watch-idle", "-1s"}, 0, "--kv-cache-watch-idle: -1s is negative"},
	}, func(c proxy.Config) time.Duration { return c.Overrides.KVCache.WatchIdle })
}

// flagCase is one command line of a flag's test: the value it must give (read from the proxy's configuration), or
// the error start must refuse it with, without running.
type flagCase[T comparable] struct {
	args []string
	want T
	err  string
}

// checkFlag runs start with each case's arguments and checks what reached the configuration (read), or the error.
func checkFlag[T comparable](t *testing.T, cases []flagCase[T], read func(proxy.Config) T) {
	t.Helper()
	for _, c := range cases {
		var got *T
		cmd := startCommand(&startFlags{}, func(f *startFlags) error {
			v := read(f.proxyConfig())
			got = &v
			return nil
		})
		cmd.SetArgs(c.args)
		cmd.SetOut(io.Discard)
		cmd.SetErr(io.Discard)
		err := cmd.Execute()
		switch {
		case c.err != "" && (err == nil || err.Error() != c.err || got != nil):
			t.Errorf("start %v: %v (ran: %v); want %q", c.args, err, got != nil, c.err)
		case c.err == "" && err != nil:
			t.Errorf("start %v: %v", c.args, err)
		case c.err == "" && got == nil:
			t.Errorf("start %v did not run", c.args)
		case c.err == "" && *got != c.want:
			t.Errorf("start %v: got %v, want %v", c.args, *got, c.want)
		}
	}
}
