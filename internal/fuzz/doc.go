// Package fuzz holds etcdproxy's Go native fuzz targets (its _test.go files): requests of every RPC of etcd's API
// built from fuzz bytes, sent through the proxy and straight to etcd, with the answers compared. The proxy must
// never panic or hang and must answer with etcd's status. `make fuzz FUZZTIME=10m` runs each target in turn; the
// seed corpus in testdata/fuzz runs with every `go test`.
//
// It owns the targets and their corpus in testdata/fuzz; nothing imports it, and it must not change the code it fuzzes.
package fuzz
