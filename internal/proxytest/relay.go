package proxytest

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// Relay carries TCP connections to an address through a loopback listener of its own until the test ends, and
// can cut every connection it carries at once (Drop), as a network blip or a restarted load balancer would:
// the peers see their connections end, and new ones are accepted as before.
type Relay struct {
	Addr string // host:port to dial instead of the target

	l     net.Listener
	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// NewRelay relays to target (host:port, or a URL such as a member's http://127.0.0.1:PORT).
func NewRelay(t testing.TB, target string) *Relay {
	t.Helper()
	target, _ = trimScheme(target)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &Relay{Addr: l.Addr().String(), l: l, conns: map[net.Conn]struct{}{}}
	r.wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			if !r.track(c, up) {
				return
			}
			r.wg.Go(func() { io.Copy(up, c); up.Close(); c.Close() })
			r.wg.Go(func() { io.Copy(c, up); up.Close(); c.Close() })
		}
	})
	t.Cleanup(func() {
		l.Close()
		r.mu.Lock()
		r.dropLocked()
		r.conns = nil
		r.mu.Unlock()
		r.wg.Wait()
	})
	return r
}

// track records a relayed pair, or closes it if the relay is closed.
func (r *Relay) track(c, up net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.conns == nil {
		c.Close()
		up.Close()
		return false
	}
	r.conns[c], r.conns[up] = struct{}{}, struct{}{}
	return true
}

// Drop closes every connection the relay carries.
func (r *Relay) Drop() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.dropLocked()
}

func (r *Relay) dropLocked() {
	for c := range r.conns {
		c.Close()
		delete(r.conns, c)
	}
}

// FewSlow runs round(i) for i from 0 to rounds-1, timing each, and fails the test if more than maxSlow of them
// took longer than slowAfter: a bound on how a recovery behaves round after round (a backoff that doubles makes
// every later round slow), which one slow round of a busy machine does not break.
func FewSlow(t testing.TB, rounds, maxSlow int, slowAfter time.Duration, what string, round func(i int)) {
	t.Helper()
	var took []time.Duration
	slow := 0
	for i := 0; i < rounds; i++ {
		start := time.Now()
		round(i)
		d := time.Since(start)
		took = append(took, d.Round(time.Millisecond))
		if d > slowAfter {
			slow++
		}
	}
	t.Logf("rounds took %v", took)
	if slow > maxSlow {
		t.Errorf("%d of %d rounds took more than %v %s: %v", slow, rounds, slowAfter, what, took)
	}
}
