// Package namespace confines every keyed service to a key prefix (etcdproxy start --namespace): a client of the
// proxy sees the keys under the prefix, without it, as if they were the whole keyspace. The decorators wrap
// OUTSIDE every other override (overrides.Apply applies them last), so the read cache, the watch coalescer and
// read-your-writes see namespaced keys and work per namespace as they are.
//
// Requests are rewritten in place (the request belongs to the call); responses are never mutated: the read cache
// and the watch coalescer share response messages between clients, so a stripped response is a shallow copy.
//
// Mapping (keys are byte strings; p is the prefix, end(p) the first key after every key that starts with p):
//   - a key k becomes p+k; the empty key stays empty, so that etcd refuses it with its own error, in its own order
//     of checks (etcd checks a Range, Put, DeleteRange or a Compare for the empty key before anything else it
//     does with keys, and never applies a request that holds one). An Election or Lock name is not a key: it is
//     always prefixed (etcd takes the empty name).
//   - a range end "" stays "" (a single key); "\x00" (every key from the start) becomes end(p); any other e
//     becomes p+e (so a client's prefix end, computed on its key, is the prefix end of the namespaced key, and a
//     key at or after its range end stays so).
//   - a watch's empty key is "\x00", as etcd takes it, so a watch never reaches the key p itself: no client of
//     the namespace can name it (it would be the empty key), and Range never returns it either.
//   - response keys lose the prefix; a key attached to a lease (LeaseTimeToLive keys=true) outside the
//     namespace is filtered out.
//
// It owns the mapping between a client's keys and etcd's, for every keyed RPC; it must not let a key outside the prefix
// reach or leave a client, and must not mutate a response.
package namespace

import (
	"bytes"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// prefix is a namespace: its prefix and the end of its range.
type prefix struct {
	p   []byte
	end []byte // end(p): every key that starts with p is below it; "\x00" (no end) if p is all 0xff
}

func newPrefix(p string) prefix {
	n := prefix{p: []byte(p)}
	n.end = append([]byte(nil), n.p...)
	for i := len(n.end) - 1; i >= 0; i-- {
		if n.end[i] < 0xff {
			n.end[i]++
			n.end = n.end[:i+1]
			return n
		}
	}
	n.end = []byte{0}
	return n
}

// key maps a client's key; the empty key stays empty (etcd refuses it, or it names no key).
func (n prefix) key(k []byte) []byte {
	if len(k) == 0 {
		return k
	}
	return n.join(k)
}

// name maps an Election or Lock name, which may be empty.
func (n prefix) name(k []byte) []byte { return n.join(k) }

func (n prefix) join(k []byte) []byte {
	b := make([]byte, 0, len(n.p)+len(k))
	return append(append(b, n.p...), k...)
}

// rangeEnd maps a client's range end.
func (n prefix) rangeEnd(e []byte) []byte {
	switch {
	case len(e) == 0:
		return e
	case len(e) == 1 && e[0] == 0:
		return n.end
	default:
		return n.join(e)
	}
}

// interval maps a client's [key, end) for a request that etcd refuses with the empty key.
func (n prefix) interval(k, e []byte) ([]byte, []byte) { return n.key(k), n.rangeEnd(e) }

// watchInterval maps a watch's [key, end). etcd takes the empty key of a watch as "\x00", the smallest key,
// before anything else: so does the namespace.
func (n prefix) watchInterval(k, e []byte) ([]byte, []byte) {
	if len(k) == 0 {
		k = []byte{0}
	}
	return n.interval(k, e)
}

// strip removes the prefix from a key etcd returned. Every key of a namespaced range starts with it; a key that
// does not (none can) is returned as it is.
func (n prefix) strip(k []byte) []byte {
	if bytes.HasPrefix(k, n.p) {
		return k[len(n.p):]
	}
	return k
}

// inside reports whether k is a key of the namespace: the prefix and at least one byte more.
func (n prefix) inside(k []byte) bool { return len(k) > len(n.p) && bytes.HasPrefix(k, n.p) }

// kv returns kv with its key stripped: a copy, kv is left as it is.
func (n prefix) kv(kv *mvccpb.KeyValue) *mvccpb.KeyValue {
	if kv == nil {
		return nil
	}
	c := shallow(kv)
	c.Key = n.strip(kv.Key)
	return c
}

func (n prefix) kvs(kvs []*mvccpb.KeyValue) []*mvccpb.KeyValue {
	if kvs == nil {
		return nil
	}
	out := make([]*mvccpb.KeyValue, len(kvs))
	for i, kv := range kvs {
		out[i] = n.kv(kv)
	}
	return out
}

// shallow returns a copy of m whose fields share m's values (bytes, lists and messages are not copied): the
// caller replaces the fields it changes and never writes into shared ones. Every field is copied, those this
// package does not know of included, so a field etcd adds passes through.
func shallow[M proto.Message](m M) M {
	src := m.ProtoReflect()
	dst := src.New()
	src.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		dst.Set(fd, v)
		return true
	})
	if u := src.GetUnknown(); len(u) > 0 {
		dst.SetUnknown(u)
	}
	return dst.Interface().(M)
}
