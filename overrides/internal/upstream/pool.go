package upstream

import (
	"context"
	"sync"

	"github.com/etcdproxy/etcdproxy/internal/stream"
)

// ErrClosed is what a client stream gets when the proxy shuts its shared streams down: the server's own error.
var ErrClosed = stream.ErrShuttingDown

// Member is what a Pool keeps: Run serves until the context it was made with is cancelled.
type Member interface {
	Run()
}

// Pool keeps one member per Creds while clients use it: the first client's Join makes it and starts its Run, the
// last client's Leave cancels its context.
type Pool[M Member] struct {
	make func(ctx context.Context, c Creds) M

	// mu protects entries and closed.
	mu      sync.Mutex
	entries map[Creds]*entry[M]
	closed  bool
	wg      sync.WaitGroup // running members
}

type entry[M Member] struct {
	m      M
	cancel context.CancelFunc
	refs   int
}

// NewPool returns a pool whose members are made by make.
func NewPool[M Member](make func(ctx context.Context, c Creds) M) *Pool[M] {
	return &Pool[M]{make: make, entries: map[Creds]*entry[M]{}}
}

// Join returns the member for c, making and starting it if needed. Every Join needs a Leave.
func (p *Pool[M]) Join(c Creds) (M, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		var zero M
		return zero, ErrClosed
	}
	e, ok := p.entries[c]
	if !ok {
		ctx, cancel := context.WithCancel(context.Background())
		e = &entry[M]{m: p.make(ctx, c), cancel: cancel}
		p.entries[c] = e
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			e.m.Run()
		}()
	}
	e.refs++
	return e.m, nil
}

// Leave releases a Join; the member stops when its last client leaves.
func (p *Pool[M]) Leave(c Creds) {
	p.mu.Lock()
	defer p.mu.Unlock()
	e := p.entries[c]
	e.refs--
	if e.refs == 0 {
		delete(p.entries, c)
		e.cancel()
	}
}

// Close stops every member and waits for them; later Joins fail with ErrClosed.
func (p *Pool[M]) Close() {
	p.mu.Lock()
	p.closed = true
	for _, e := range p.entries {
		e.cancel()
	}
	p.mu.Unlock()
	p.wg.Wait()
}
