// Command floorrelay is a measuring stick, not a proxy: the thinnest gRPC-Go relay there is. It forwards every call
// (any service, unary or streaming) to one etcd endpoint as raw bytes, with its metadata, and does nothing else: no
// decoding, no sharing, no cache, no leader tracking, no waiting for a ready upstream. What it costs is the floor of
// any gRPC-Go proxy on a machine; `make bench` runs it as a target of its own in the same rounds, and the report's
// etcdproxy/floor column divides etcdproxy by it on every forwarded row.
//
// It takes the arguments the benchmark gives a proxy: `floorrelay start --endpoints=HOST:PORT --listen-addr=HOST:PORT
// [--data-dir=...]` (the first endpoint is used, the data directory ignored), and `floorrelay version`.
//
// It must not grow any logic: anything it did would raise the floor it measures.
package main

import "github.com/etcdproxy/etcdproxy/cmd/etcdproxy-bench/internal/floor"

func main() {
	floor.Main("floorrelay", "raw-bytes gRPC relay, no logic (the floor of a gRPC-Go proxy)", nil)
}
