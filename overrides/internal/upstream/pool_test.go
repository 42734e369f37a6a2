package upstream_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/overrides/internal/upstream"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc/metadata"
)

// member is a Pool member that records its life: made with creds, running until its context ends.
type member struct {
	creds   upstream.Creds
	ctx     context.Context
	started chan struct{}
	ended   chan struct{}
}

func (m *member) Run() {
	close(m.started)
	<-m.ctx.Done()
	close(m.ended)
}

// within fails t unless ch is closed within a second.
func within(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(time.Second):
		t.Fatalf("%s: not within 1s", what)
	}
}

// stillOpen fails t if ch is closed (after a moment to let a wrong close happen).
func stillOpen(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
		t.Fatalf("%s", what)
	case <-time.After(20 * time.Millisecond):
	}
}

// TestPool: clients with the same credentials share one member, made and started by the first Join; a member
// stops when its last client leaves (and the next Join makes a new one); Close stops the rest, waits for them, and
// refuses later Joins with ErrClosed.
func TestPool(t *testing.T) {
	var made atomic.Int32
	p := upstream.NewPool(func(ctx context.Context, c upstream.Creds) *member {
		made.Add(1)
		return &member{creds: c, ctx: ctx, started: make(chan struct{}), ended: make(chan struct{})}
	})
	alice, bob := upstream.Creds{Token: "alice"}, upstream.Creds{Authorization: "bob"}
	join := func(c upstream.Creds) *member {
		t.Helper()
		m, err := p.Join(c)
		if err != nil {
			t.Fatalf("Join(%+v): %v", c, err)
		}
		return m
	}

	a1, a2, b := join(alice), join(alice), join(bob)
	if a1 != a2 || a1 == b || made.Load() != 2 {
		t.Fatalf("two Joins with one credentials and one with another made %d members (shared: %v, distinct: %v); want 2",
			made.Load(), a1 == a2, a1 != b)
	}
	if a1.creds != alice || b.creds != bob {
		t.Fatalf("members made for %+v and %+v; want %+v and %+v", a1.creds, b.creds, alice, bob)
	}
	within(t, a1.started, "the first Join's member running")
	within(t, b.started, "the other credentials' member running")

	p.Leave(alice)
	stillOpen(t, a1.ended, "a member stopped while a client still used it")
	p.Leave(alice)
	within(t, a1.ended, "a member stopping when its last client left")
	a3 := join(alice)
	if a3 == a1 || made.Load() != 3 {
		t.Fatalf("a Join after the last Leave reused the stopped member (made %d)", made.Load())
	}
	within(t, a3.started, "the new member running")

	p.Close() // alice's new member and bob's still have clients
	for _, m := range []*member{a3, b} {
		select {
		case <-m.ended:
		default:
			t.Fatalf("Close returned before its member for %+v stopped", m.creds)
		}
	}
	if _, err := p.Join(alice); !errors.Is(err, upstream.ErrClosed) {
		t.Fatalf("Join after Close: %v, want ErrClosed", err)
	}
	if made.Load() != 3 {
		t.Fatalf("a Join after Close made a member")
	}
}

// TestCreds: a client call's credentials are read from its incoming metadata, and an upstream call on its behalf
// carries them, with the require-leader key when asked and nothing else.
func TestCreds(t *testing.T) {
	in := metadata.NewIncomingContext(context.Background(), metadata.Pairs(rpctypes.TokenFieldNameGRPC, "tok",
		"authorization", "auth", "other", "x"))
	c := upstream.CredsOf(in)
	if c != (upstream.Creds{Token: "tok", Authorization: "auth"}) {
		t.Fatalf("CredsOf: %+v", c)
	}
	if c := upstream.CredsOf(context.Background()); c != (upstream.Creds{}) {
		t.Fatalf("CredsOf a call without metadata: %+v", c)
	}
	for _, tc := range []struct {
		creds         upstream.Creds
		requireLeader bool
		want          metadata.MD
	}{
		{c, false, metadata.Pairs(rpctypes.TokenFieldNameGRPC, "tok", "authorization", "auth")},
		{c, true, metadata.Pairs(rpctypes.TokenFieldNameGRPC, "tok", "authorization", "auth",
			rpctypes.MetadataRequireLeaderKey, rpctypes.MetadataHasLeader)},
		{upstream.Creds{}, true, metadata.Pairs(rpctypes.MetadataRequireLeaderKey, rpctypes.MetadataHasLeader)},
		{upstream.Creds{}, false, metadata.MD{}},
	} {
		// What the ctx carried out before is replaced.
		ctx := metadata.AppendToOutgoingContext(context.Background(), "stale", "y")
		got, _ := metadata.FromOutgoingContext(tc.creds.Outgoing(ctx, tc.requireLeader))
		if len(got) != len(tc.want) {
			t.Errorf("%+v, require-leader %v: outgoing %v, want %v", tc.creds, tc.requireLeader, got, tc.want)
			continue
		}
		for k, v := range tc.want {
			if g := got.Get(k); len(g) != 1 || g[0] != v[0] {
				t.Errorf("%+v, require-leader %v: outgoing %v, want %v", tc.creds, tc.requireLeader, got, tc.want)
			}
		}
	}
}
