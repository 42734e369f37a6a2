# etcdproxy. The two commands a new user needs: `make run` and `make test`.
GO      ?= go
BUF     := $(GO) tool -modfile=tools/go.mod buf
BUILD   := .build
RUN_DIR ?= $(BUILD)/run

.PHONY: all build run test fuzz generate api-diff lint bench bench-quick floor-bin etcd-bin robustness robustness-smoke etcd-integration soak clean

all: build

# Binaries are built as etcd's releases are: CGO_ENABLED=0, static, with Go's own DNS resolver. A static binary runs
# in a scratch or distroless image, and maps no libc: 1.5 MB less RSS for every proxy process (idle 20.8 -> 19.2 MB).
# The benchmark's etcd and floors are built the same way, so that they compare as deployed.
STATIC := CGO_ENABLED=0
# The proxy and the floors are built with gRPC-Go's grpcnotrace tag: gRPC then does not link golang.org/x/net/trace
# (request tracing behind grpc.EnableTracing, which stays false here, and its /debug/requests pages, never served),
# nor html/template through it. bin/etcdproxy is 4.3 MB smaller (27.0 -> 22.7 MB), and since the kernel maps a
# binary's cached pages around each page fault (most of it ends up resident), idle RSS is 2 MB lower (19.2 ->
# 17.2 MB). etcd is built as released: its embed package imports the tracing package itself.
TAGS := -tags=grpcnotrace

## build: build bin/etcdproxy, and beside it bin/etcdproxy-etcd, the single-member etcd that --embedded-etcd runs
## as a child process (so that the proxy binary does not link etcd's server).
build:
	$(STATIC) $(GO) build $(TAGS) -o bin/etcdproxy ./cmd/etcdproxy
	$(STATIC) $(GO) build -o bin/etcdproxy-etcd ./cmd/etcdproxy-etcd

## run: start the proxy on 127.0.0.1:23790 in front of an embedded single-member etcd (data in $(RUN_DIR)).
run: build
	./bin/etcdproxy start --embedded-etcd --data-dir $(RUN_DIR)

## test: every test, with the race detector, against real etcd members started in-process on loopback.
test:
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 15m ./...
	cd tools && $(GO) test -count=1 ./apidiff

## fuzz: each fuzz target of internal/fuzz in turn, for FUZZTIME each (`make fuzz FUZZTIME=10m`). Go fuzzes one
## target per run; a failing input is written to internal/fuzz/testdata/fuzz, where every `make test` runs it.
## Go also spends up to -fuzzminimizetime (60 s by default) shrinking each new interesting input, running it over
## and over while nothing else runs; the targets carry state from input to input, so that buys little: 10 s.
FUZZTIME ?= 1m
FUZZMINIMIZETIME ?= 10s
## Go discards the output of its fuzzing workers: a worker that died ("fuzzing process hung or terminated
## unexpectedly") left its crash output in TMPDIR (/tmp)/etcdproxy-fuzz-crash-PID-*.log, printed here.
FUZZ_TARGETS ?= $$($(GO) test -list '^Fuzz' ./internal/fuzz | grep '^Fuzz')
fuzz:
	@crash=$${TMPDIR:-/tmp}/etcdproxy-fuzz-crash-; rm -f $$crash*; \
	for t in $(FUZZ_TARGETS); do \
		echo "$$t ($(FUZZTIME))"; \
		$(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINIMIZETIME) \
			./internal/fuzz && continue; \
		for f in $$crash*; do if [ -s "$$f" ]; then echo "crash output of a worker ($$f):"; cat "$$f"; fi; done; \
		exit 1; \
	done; rm -f $$crash*

## generate: rebuild gen/ from the etcd API pinned in go.mod with buf and protoc-gen-etcdproxy (offline).
generate:
	$(GO) run ./cmd/etcdapi -image $(BUILD)/etcd-api.binpb
	$(GO) build -o $(BUILD)/protoc-gen-etcdproxy ./protoc-gen-etcdproxy
	$(BUF) generate
	$(GO) test -count=1 -run 'TestGenIsFresh|TestBufGenOptions' ./protoc-gen-etcdproxy

## bench: direct etcd vs etcd grpc-proxy vs etcdproxy, with the two floors (floorrelay: the thinnest gRPC-Go relay;
## floorcache: the thinnest gRPC-Go cache hit) in the same interleaved rounds, each target in its own process;
## writes BENCHMARKS.md and its SVG plots. About 45 minutes (44m42s on 2a59838); BENCH_FLAGS=-watchers100k=false leaves out
## the 100,000 watchers (about 1.5 of them). bench-quick: the same, shorter (about 3 minutes), printed only.
BENCH_FLAGS ?=
BENCH = $(GO) run ./cmd/etcdproxy-bench -etcd $(BUILD)/etcd -etcdproxy bin/etcdproxy \
	-floorrelay $(BUILD)/floorrelay -floorcache $(BUILD)/floorcache $(BENCH_FLAGS)
bench: build etcd-bin floor-bin
	$(BENCH) -out BENCHMARKS.md

bench-quick: build etcd-bin floor-bin
	$(BENCH) -quick

## floor-bin: the benchmark's two measuring devices (cmd/etcdproxy-bench/floorrelay, floorcache).
floor-bin:
	$(STATIC) $(GO) build $(TAGS) -o $(BUILD)/floorrelay ./cmd/etcdproxy-bench/floorrelay
	$(STATIC) $(GO) build $(TAGS) -o $(BUILD)/floorcache ./cmd/etcdproxy-bench/floorcache

## robustness: etcd's own robustness test (go.etcd.io/etcd/tests/v3/robustness: its traffic, faults and validation)
## with every client going through bin/etcdproxy, run as its own process in front of three etcd members (.build/etcd).
## HISTORIES histories, each a new cluster and proxy, TRAFFIC of traffic and one fault; faults and traffic profiles
## rotate (FAULTS, PROFILES: comma-separated subsets; names in robustness/robustness_test.go). Evidence: make
## robustness HISTORIES=100. Failed histories keep their logs and etcd's report under RESULTS_DIR (/tmp/etcdproxy-robustness).
## The histories run in batches of BATCH, each batch its own test process (etcd's suite keeps every history's reports
## in memory: 30 high-traffic histories in one process grew it to 24 GiB here), the rotation continuing from batch to
## batch; the log of the whole run is $(BUILD)/robustness.log, and its last lines are the totals, by fault and overall.
## robustness-smoke: two histories (an etcd member killed, etcdproxy restarted under serializable reads), about 2 minutes.
HISTORIES ?= 6
BATCH     ?= 10
TRAFFIC   ?= 10s
FAULTS    ?=
PROFILES  ?=
robustness: SHELL := /bin/bash
robustness: build etcd-bin
	@log=$(BUILD)/robustness.log; : > $$log; status=0; \
	for first in $$(seq 0 $(BATCH) $$(( $(HISTORIES) - 1 ))); do \
		n=$$(( $(HISTORIES) - first )); if [ $$n -gt $(BATCH) ]; then n=$(BATCH); fi; \
		(cd robustness && $(GO) test -v -count=1 -run '^TestRobustnessThroughProxy$$' -timeout $$(( n * 3 + 10 ))m ./... \
			-args -first=$$first -histories=$$n -of=$(HISTORIES) -traffic=$(TRAFFIC) -faults=$(FAULTS) -profiles=$(PROFILES)) 2>&1 \
			| tee -a $$log; \
		if [ $${PIPESTATUS[0]} -ne 0 ]; then status=1; fi; \
	done; \
	awk -f robustness/totals.awk $$log; exit $$status

robustness-smoke:
	$(MAKE) robustness HISTORIES=2 FAULTS=Kill,EtcdproxyRestart PROFILES=KubernetesLowTraffic,EtcdSerializableReads

## soak: one etcdproxy in front of three etcd members for DURATION, with 10,000 watchers, 1,000 leases kept alive,
## writes and cached reads through it and a member killed and restarted every 5 minutes; samples the proxy's RSS and
## goroutines every 10 s and fails on a growth trend, on any event not delivered exactly once, or on a lost lease.
## Writes soak.md, soak.csv and two SVG plots to SOAK_OUT (RELIABILITY.md quotes the last 1 h run).
DURATION  ?= 1h
SOAK_OUT  ?= $(BUILD)/soak
SOAK_FLAGS ?=
soak: build etcd-bin
	$(GO) run ./cmd/etcdproxy-bench -etcd $(BUILD)/etcd -etcdproxy bin/etcdproxy -soak $(DURATION) -soak-out $(SOAK_OUT) $(SOAK_FLAGS)

## etcd-integration: etcd's own integration tests of clientv3 (go.etcd.io/etcd/tests/v3 at the version
## robustness/go.mod pins) with every client their framework makes for a member going through bin/etcdproxy, one
## proxy process in front of each endpoint (robustness/etcdintegration/README.md). The tests module is copied out
## of the module cache into $(BUILD)/etcd-tests, and our own cluster_direct.go put in the framework's (Go refuses
## an -overlay of the module cache); nothing of etcd's is kept in this repository. ETCDINT_PKGS: the packages,
## ETCDINT_RUN: a -run pattern, ETCDINT_FLAGS: more go test flags (-v), ETCDINT_DROP: test files left out; proxies'
## logs in $(BUILD)/etcd-integration. `make etcd-integration ETCDINT_PKGS=go.etcd.io/etcd/tests/v3/integration` runs
## the gRPC-level tests (v3_*_test.go) the same way.
ETCDINT_PKGS ?= go.etcd.io/etcd/tests/v3/integration/clientv3/...
ETCDINT_RUN  ?= .
ETCDINT_FLAGS ?=
# Test files left out of the copy: integration/cache_test.go imports go.etcd.io/etcd/cache/v3, which the module
# proxy here does not serve (v3.7.3: 403), and tests etcd's client-side cache, not a server.
ETCDINT_DROP ?= integration/cache_test.go
etcd-integration: build
	@set -e; src=$$(cd robustness && $(GO) list -m -f '{{.Dir}}' go.etcd.io/etcd/tests/v3); \
	rm -rf $(BUILD)/etcd-tests $(BUILD)/etcd-integration; mkdir -p $(BUILD)/etcd-integration; \
	cp -r $$src $(BUILD)/etcd-tests; chmod -R u+w $(BUILD)/etcd-tests; \
	cp robustness/etcdintegration/cluster_proxied.go.in $(BUILD)/etcd-tests/framework/integration/cluster_direct.go; \
	rm -f $(addprefix $(BUILD)/etcd-tests/,$(ETCDINT_DROP)); \
	printf 'go %s\n\nuse ../robustness\n\nreplace go.etcd.io/etcd/tests/v3 => ./etcd-tests\n' \
		$$(cd robustness && $(GO) list -m -f '{{.GoVersion}}') > $(BUILD)/etcd-integration.work; \
	cd robustness && GOWORK=$(CURDIR)/$(BUILD)/etcd-integration.work \
		ETCDPROXY_BIN=$(CURDIR)/bin/etcdproxy ETCDPROXY_LOG_DIR=$(CURDIR)/$(BUILD)/etcd-integration \
		$(GO) test -count=1 -timeout 60m -run '$(ETCDINT_RUN)' $(ETCDINT_FLAGS) $(ETCDINT_PKGS)

## etcd-bin: etcd itself (server and `etcd grpc-proxy`) at the version pinned in go.mod, for the benchmark.
etcd-bin:
	$(STATIC) $(GO) build -o $(BUILD)/etcd go.etcd.io/etcd/server/v3

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
