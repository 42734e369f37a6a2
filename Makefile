# etcdproxy. The two commands a new user needs: `make run` and `make test`.
GO      ?= go
BUF     := $(GO) tool -modfile=tools/go.mod buf
BUILD   := .build
RUN_DIR ?= $(BUILD)/run

.PHONY: all build run test generate api-diff lint bench bench-quick bench-floor etcd-bin robustness robustness-smoke clean

all: build

## build: build bin/etcdproxy.
build:
	$(GO) build -o bin/etcdproxy ./cmd/etcdproxy

## run: start the proxy on 127.0.0.1:23790 in front of an embedded single-member etcd (data in $(RUN_DIR)).
run: build
	./bin/etcdproxy start --embedded-etcd --data-dir $(RUN_DIR)

## test: every test, with the race detector, against real etcd members started in-process on loopback.
test:
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 15m ./...
	cd tools && $(GO) test -count=1 ./apidiff

## generate: rebuild gen/ from the etcd API pinned in go.mod with buf and protoc-gen-etcdproxy (offline).
generate:
	$(GO) run ./cmd/etcdapi -image $(BUILD)/etcd-api.binpb
	$(GO) build -o $(BUILD)/protoc-gen-etcdproxy ./protoc-gen-etcdproxy
	$(BUF) generate
	$(GO) test -count=1 -run 'TestGenIsFresh|TestBufGenOptions' ./protoc-gen-etcdproxy

## bench: direct etcd vs etcd grpc-proxy vs etcdproxy, each in its own process, interleaved rounds; writes
## BENCHMARKS.md. bench-quick: the same in under 2 minutes, for development (prints, writes nothing).
bench: build etcd-bin
	$(GO) run ./cmd/etcdproxy-bench -etcd $(BUILD)/etcd -etcdproxy bin/etcdproxy -out BENCHMARKS.md

bench-quick: build etcd-bin
	$(GO) run ./cmd/etcdproxy-bench -etcd $(BUILD)/etcd -etcdproxy bin/etcdproxy -quick

## bench-floor: the quick benchmark with floorrelay, the thinnest gRPC-Go relay (raw bytes, no logic), in etcdproxy's
## column: the floor of any gRPC-Go proxy on this machine, to read etcdproxy's ratios against. Prints, writes nothing.
bench-floor: etcd-bin
	$(GO) build -o $(BUILD)/floorrelay ./cmd/etcdproxy-bench/floorrelay
	$(GO) run ./cmd/etcdproxy-bench -etcd $(BUILD)/etcd -etcdproxy $(BUILD)/floorrelay -quick

## robustness: etcd's own robustness test (go.etcd.io/etcd/tests/v3/robustness: its traffic, faults and validation)
## with every client going through bin/etcdproxy, run as its own process in front of three etcd members (.build/etcd).
## HISTORIES histories, each a new cluster and proxy, TRAFFIC of traffic and one fault; faults and traffic profiles
## rotate (FAULTS, PROFILES: comma-separated subsets; names in robustness/robustness_test.go). Evidence: make
## robustness HISTORIES=100. Failed histories keep their logs and etcd's report under RESULTS_DIR (/tmp/etcdproxy-robustness).
## robustness-smoke: two histories (an etcd member killed, etcdproxy restarted under serializable reads), about 2 minutes.
HISTORIES ?= 6
TRAFFIC   ?= 10s
FAULTS    ?=
PROFILES  ?=
robustness: build etcd-bin
	cd robustness && $(GO) test -v -count=1 -run '^TestRobustnessThroughProxy$$' -timeout $$(( $(HISTORIES) * 3 + 10 ))m ./... \
		-args -histories=$(HISTORIES) -traffic=$(TRAFFIC) -faults=$(FAULTS) -profiles=$(PROFILES)

robustness-smoke:
	$(MAKE) robustness HISTORIES=2 FAULTS=Kill,EtcdproxyRestart PROFILES=KubernetesLowTraffic,EtcdSerializableReads

## etcd-bin: etcd itself (server and `etcd grpc-proxy`) at the version pinned in go.mod, for the benchmark.
etcd-bin:
	$(GO) build -o $(BUILD)/etcd go.etcd.io/etcd/server/v3

## api-diff: the RPCs and message fields added or removed between the etcd API pinned in go.mod and OTHER.
OTHER ?= v3.6.5
api-diff:
	cd tools && $(GO) run ./apidiff -from $$(cd .. && $(GO) list -m -f '{{.Version}}' go.etcd.io/etcd/api/v3) -to $(OTHER)

## lint: gofmt, go vet, and buf's own checks of the generator's configuration.
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

clean:
	rm -rf bin $(BUILD)
