// Package floor is what the benchmark's two measuring devices, floorrelay and floorcache, share: a codec that
// passes messages through as bytes, the relay of one call to etcd, and their command line (the arguments the
// benchmark gives a proxy). Neither device is a proxy: each is the least a gRPC-Go server can do for a call, so
// that what etcdproxy costs above it can be read on the machine the benchmark runs on.
//
// It must not gain logic beyond those: anything it did would raise the floor.
package floor

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

// Frame is one message, as bytes.
type Frame struct{ B []byte }

// Codec passes messages through as they are. It is named "proto", the content subtype etcd's clients use, and is
// forced on both the server and the upstream connection, so that no message is decoded or encoded.
type Codec struct{}

func (Codec) Marshal(v any) ([]byte, error) { return v.(*Frame).B, nil }

// Unmarshal copies: gRPC may reuse data's buffer once Unmarshal returns.
func (Codec) Unmarshal(data []byte, v any) error {
	v.(*Frame).B = append([]byte(nil), data...)
	return nil
}

func (Codec) Name() string { return "proto" }

// Dial connects to etcd with the raw codec.
func Dial(upstream string) (*grpc.ClientConn, error) {
	return grpc.NewClient(upstream, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(Codec{})))
}

// NewServer returns a server that relays every call it has no service for to cc, as raw bytes. register, if not
// nil, registers the services the device answers itself.
func NewServer(cc *grpc.ClientConn, register func(*grpc.Server)) *grpc.Server {
	srv := grpc.NewServer(grpc.ForceServerCodec(Codec{}), grpc.UnknownServiceHandler(
		func(_ any, ss grpc.ServerStream) error { return Relay(cc, ss) }))
	if register != nil {
		register(srv)
	}
	return srv
}

// Relay forwards one call (any method, unary or streaming) with its metadata: client messages up, upstream
// messages and the final status down.
func Relay(cc *grpc.ClientConn, ss grpc.ServerStream) error {
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
			f := &Frame{}
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
		f := &Frame{}
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

// Main is a device's command line: `NAME start --endpoints=HOST:PORT --listen-addr=HOST:PORT [--data-dir=...]`
// (the first endpoint is used, the data directory ignored) serves until killed; `NAME version` prints about.
func Main(name, about string, register func(srv *grpc.Server, upstream *grpc.ClientConn)) {
	if len(os.Args) > 1 && os.Args[1] == "version" {
		fmt.Println(name + ": " + about)
		return
	}
	if len(os.Args) < 2 || os.Args[1] != "start" {
		log.Fatalf("usage: %s start --endpoints=HOST:PORT --listen-addr=HOST:PORT | %s version", name, name)
	}
	fs := flag.NewFlagSet("start", flag.ExitOnError)
	endpoints := fs.String("endpoints", "127.0.0.1:2379", "etcd endpoint (the first of a comma-separated list)")
	listen := fs.String("listen-addr", "127.0.0.1:23790", "listen address")
	fs.String("data-dir", "", "ignored")
	_ = fs.Parse(os.Args[2:])
	upstream, _, _ := strings.Cut(*endpoints, ",")

	cc, err := Dial(upstream)
	if err != nil {
		log.Fatal(err)
	}
	srv := NewServer(cc, func(s *grpc.Server) {
		if register != nil {
			register(s, cc)
		}
	})
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	log.Fatal(srv.Serve(l))
}
