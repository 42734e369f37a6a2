// Command floorrelay is a measuring stick, not a proxy: the thinnest gRPC-Go relay there is. It forwards every call
// (any service, unary or streaming) to one etcd endpoint as raw bytes, with its metadata, and does nothing else: no
// decoding, no sharing, no cache, no leader tracking. What it costs is the floor of any gRPC-Go proxy on a
// machine; `make bench-floor` runs the benchmark with it in etcdproxy's column, to read etcdproxy's ratios against.
//
// It takes the arguments the benchmark gives a proxy: `floorrelay start --endpoints=HOST:PORT --listen-addr=HOST:PORT
// [--data-dir=...]` (the first endpoint is used, the data directory ignored), and `floorrelay version`.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
)

// frame is one message, as bytes.
type frame struct{ b []byte }

// rawCodec passes messages through as they are. It is registered under "proto", the content subtype etcd's clients
// use, so that no message is decoded or encoded.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return v.(*frame).b, nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	v.(*frame).b = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

func main() {
	if len(os.Args) > 1 && os.Args[1] == "version" {
		fmt.Println("floorrelay: raw-bytes gRPC relay, no logic (the floor of a gRPC-Go proxy)")
		return
	}
	if len(os.Args) < 2 || os.Args[1] != "start" {
		log.Fatal("usage: floorrelay start --endpoints=HOST:PORT --listen-addr=HOST:PORT | floorrelay version")
	}
	fs := flag.NewFlagSet("start", flag.ExitOnError)
	endpoints := fs.String("endpoints", "127.0.0.1:2379", "etcd endpoint (the first of a comma-separated list)")
	listen := fs.String("listen-addr", "127.0.0.1:23790", "listen address")
	fs.String("data-dir", "", "ignored")
	_ = fs.Parse(os.Args[2:])
	upstream, _, _ := strings.Cut(*endpoints, ",")

	cc, err := grpc.NewClient(upstream, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})))
	if err != nil {
		log.Fatal(err)
	}
	srv := grpc.NewServer(grpc.ForceServerCodec(rawCodec{}), grpc.UnknownServiceHandler(
		func(_ any, ss grpc.ServerStream) error { return relay(cc, ss) }))
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	log.Fatal(srv.Serve(l))
}

// relay forwards one call: client messages up, upstream messages and the final status down.
func relay(cc *grpc.ClientConn, ss grpc.ServerStream) error {
	method, _ := grpc.MethodFromServerStream(ss)
	md, _ := metadata.FromIncomingContext(ss.Context())
	ctx, cancel := context.WithCancel(metadata.NewOutgoingContext(ss.Context(), md))
	defer cancel()
	cs, err := cc.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, method)
	if err != nil {
		return err
	}
	go func() {
		for {
			f := &frame{}
			if err := ss.RecvMsg(f); err != nil {
				_ = cs.CloseSend()
				return
			}
			if err := cs.SendMsg(f); err != nil {
				return
			}
		}
	}()
	for {
		f := &frame{}
		if err := cs.RecvMsg(f); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if err := ss.SendMsg(f); err != nil {
			return err
		}
	}
}
