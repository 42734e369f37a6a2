package kvcache

import (
	"context"
	"unsafe"

	"github.com/etcdproxy/etcdproxy/overrides/internal/upstream"
	"google.golang.org/grpc/mem"
)

// A hit can be answered from the request's bytes, before gRPC decodes them (RawHit): the cache key is the caller's
// credentials followed by the request's deterministic encoding (cacheKey), which is what Go's encoder sends
// (clientv3's requests: fields in the order of their numbers, zero values left out), so the bytes as they came are
// the key. Bytes that encode a request another way (a field repeated, out of order, or at its zero value) match no
// key and take the decoded path, which finds the same entry; bytes that match a key decode to the very request the
// entry was stored for, as decoding is a function. Every key is a read at the current revision (a historical read
// is never stored), and the entry says whether it is a serializable one: a linearizable read's entry matches its
// bytes too, and is left to linHit, which serves it only after a barrier.

// RawHit returns the parts of the encoding of the cached answer to the Range request whose encoding is req, made
// by the call whose server context is ctx, if the cache may serve it now: what Range would answer, byte for byte,
// counted as Range counts a hit. ok is false when it cannot say (no entry under those bytes, the cache not live,
// anything Range would check first): then the caller decodes req and calls Range, and nothing has been counted.
// The parts are shared: never modified. Its caller must have checked what the server's interceptors check before
// Range (overrides.Set.RawRange).
func (k *KV) RawHit(ctx context.Context, req []byte) (parts [2]mem.Buffer, n int, ok bool) {
	gen, live := k.watch.state()
	if !live || !k.authKnown.Load() {
		return parts, 0, false
	}
	var buf [192]byte // most keys fit: the lookup then allocates nothing
	b := append(appendCreds(buf[:0], upstream.CredsOf(ctx)), req...)
	// Only looked up with, never kept: ccache keeps the key it was stored with.
	e, rev := k.servable(unsafe.String(unsafe.SliceData(b), len(b)), gen)
	if e == nil || !e.serializable {
		return parts, 0, false
	}
	if rev == e.resp.Header.GetRevision() {
		if e.enc.all == nil {
			return parts, 0, false
		}
		parts[0], n = e.enc.all, 1
	} else {
		hdr, ok := e.enc.header(atRevision(e.resp.Header, rev))
		if !ok {
			return parts, 0, false
		}
		parts[0], parts[1], n = hdr, e.enc.rest, 2
	}
	k.used() // a read, as Range records one
	hits.Inc()
	rawHits.Inc()
	return parts, n, true
}
