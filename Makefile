# etcdproxy. The two commands a new user needs: `make run` and `make test`.
GO      ?= go
BUF     := $(GO) tool -modfile=tools/go.mod buf
BUILD   := .build
RUN_DIR ?= $(BUILD)/run

.PHONY: all build run test test-short generate api-diff lint bench clean

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

## generate: rebuild gen/ from the etcd API pinned in go.mod with buf and protoc-gen-etcdproxy (offline).
generate:
	$(GO) run ./cmd/etcdapi -image $(BUILD)/etcd-api.binpb
	$(GO) build -o $(BUILD)/protoc-gen-etcdproxy ./protoc-gen-etcdproxy
	$(BUF) generate
	$(GO) test -count=1 -run 'TestGenIsFresh|TestBufGenOptions' ./protoc-gen-etcdproxy

## lint: gofmt, go vet, and buf's own checks of the generator's configuration.
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

clean:
	rm -rf bin $(BUILD)
