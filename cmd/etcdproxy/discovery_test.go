package main

import (
	"context"
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"

	"go.uber.org/zap"
	"golang.org/x/net/dns/dnsmessage"
)

// serveSRV answers DNS SRV queries on a loopback UDP port from records (by query name, e.g.
// "_etcd-client._tcp.etcd.test."), NXDOMAIN for anything else, and makes the process's resolver use it for the
// test.
func serveSRV(t *testing.T, records map[string][]dnsmessage.SRVResource) {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			var p dnsmessage.Parser
			hdr, err := p.Start(buf[:n])
			if err != nil {
				continue
			}
			q, err := p.Question()
			if err != nil {
				continue
			}
			rrs := records[q.Name.String()]
			resp := dnsmessage.Message{Header: dnsmessage.Header{ID: hdr.ID, Response: true, Authoritative: true},
				Questions: []dnsmessage.Question{q}}
			if q.Type != dnsmessage.TypeSRV || len(rrs) == 0 {
				resp.Header.RCode = dnsmessage.RCodeNameError
			}
			if q.Type == dnsmessage.TypeSRV {
				for _, rr := range rrs {
					resp.Answers = append(resp.Answers, dnsmessage.Resource{
						Header: dnsmessage.ResourceHeader{Name: q.Name, Type: dnsmessage.TypeSRV, Class: dnsmessage.ClassINET, TTL: 60},
						Body:   &rr})
				}
			}
			out, err := resp.Pack()
			if err == nil {
				_, _ = pc.WriteTo(out, from)
			}
		}
	}()
	old := net.DefaultResolver
	net.DefaultResolver = &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "udp", pc.LocalAddr().String())
	}}
	t.Cleanup(func() {
		net.DefaultResolver = old
		pc.Close()
		<-done
	})
}

// TestDiscoverySRV: --discovery-srv finds the cluster from SRV records, as etcd grpc-proxy does; --discovery-srv-name
// picks the service name; without --insecure-discovery an http endpoint is not used (then --endpoints is); a domain
// with no records is an error.
func TestDiscoverySRV(t *testing.T) {
	// The records are only resolved, never dialled: every DNS query goes to serveSRV's loopback server.
	const p = 2379
	target := dnsmessage.MustNewName("etcd-0.etcd.test.")
	serveSRV(t, map[string][]dnsmessage.SRVResource{
		"_etcd-client._tcp.etcd.test.":       {{Target: target, Port: p}},
		"_etcd-client-blue._tcp.named.test.": {{Target: target, Port: p}},
	})
	want := []string{fmt.Sprintf("http://etcd-0.etcd.test.:%d", p)}

	endpoints := func(args ...string) ([]string, error) {
		t.Helper()
		f := &startFlags{}
		cmd := startCommand(f, runStart)
		if err := cmd.ParseFlags(args); err != nil {
			t.Fatal(err)
		}
		return upstreamEndpoints(f, zap.NewNop())
	}
	for _, c := range []struct {
		name string
		args []string
		want []string
		err  string
	}{
		{"insecure discovery", []string{"--discovery-srv", "etcd.test", "--insecure-discovery"}, want, ""},
		{"service name", []string{"--discovery-srv", "named.test", "--discovery-srv-name", "blue", "--insecure-discovery"}, want, ""},
		{"an http endpoint is not secure: --endpoints", []string{"--discovery-srv", "etcd.test", "--endpoints", "127.0.0.1:1"}, []string{"127.0.0.1:1"}, ""},
		{"no records", []string{"--discovery-srv", "nothing.test", "--insecure-discovery"}, nil, "dns lookup errors"},
	} {
		got, err := endpoints(c.args...)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%s: %v, %v; want an error containing %q", c.name, got, err, c.err)
			}
			continue
		}
		if err != nil || !slices.Equal(got, c.want) {
			t.Errorf("%s: %v, %v; want %v", c.name, got, err, c.want)
		}
	}

}
