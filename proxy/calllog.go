package proxy

import (
	"context"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// Call logging (--experimental-enable-grpc-logging): every request and response of every RPC, streams message by
// message, at info level on the "grpc-calls" logger. Unlike etcd grpc-proxy's, secrets never reach the log: a
// string or bytes field whose name holds "password" or is "token" (Authenticate's password and token, UserAdd's
// and UserChangePassword's passwords and hashes, in any message etcd may add) is logged as "[redacted]", and no
// metadata is logged (the client's token travels there).

type callLog struct{ lg *zap.Logger }

func (c callLog) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := handler(ctx, req)
	fields := []zap.Field{zap.String("method", info.FullMethod), payload("request", req),
		zap.Duration("took", time.Since(start))}
	if err != nil {
		st := status.Convert(err)
		fields = append(fields, zap.Stringer("code", st.Code()), zap.String("error", st.Message()))
	} else {
		fields = append(fields, payload("response", resp))
	}
	c.lg.Info("call", fields...)
	return resp, err
}

func (c callLog) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	start := time.Now()
	lg := c.lg.With(zap.String("method", info.FullMethod))
	lg.Info("stream opened")
	err := handler(srv, &loggedStream{ServerStream: ss, lg: lg})
	st := status.Convert(err)
	lg.Info("stream ended", zap.Stringer("code", st.Code()), zap.String("error", st.Message()),
		zap.Duration("took", time.Since(start)))
	return err
}

type loggedStream struct {
	grpc.ServerStream
	lg *zap.Logger
}

func (s *loggedStream) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	if err == nil {
		s.lg.Info("stream request", payload("request", m))
	}
	return err
}

func (s *loggedStream) SendMsg(m any) error {
	err := s.ServerStream.SendMsg(m)
	if err == nil {
		s.lg.Info("stream response", payload("response", m))
	}
	return err
}

// payload is a log field with m in JSON, secrets redacted.
func payload(key string, m any) zap.Field {
	pm, ok := m.(proto.Message)
	if !ok {
		return zap.Skip()
	}
	return zap.String(key, protojson.MarshalOptions{UseProtoNames: true}.Format(redacted(pm)))
}

// redacted returns m, or a copy of it with its secrets replaced when its type can hold any.
func redacted(m proto.Message) proto.Message {
	if !holdsSecrets(m.ProtoReflect().Descriptor(), map[protoreflect.FullName]bool{}) {
		return m
	}
	c := proto.Clone(m)
	scrub(c.ProtoReflect())
	return c
}

func secretField(fd protoreflect.FieldDescriptor) bool {
	name := strings.ToLower(string(fd.Name()))
	return (fd.Kind() == protoreflect.StringKind || fd.Kind() == protoreflect.BytesKind) &&
		(strings.Contains(name, "password") || name == "token")
}

// secretTypes memoizes holdsSecrets per message type.
var secretTypes sync.Map // protoreflect.FullName -> bool

// holdsSecrets reports whether a message of type d can hold a secret field, at any depth.
func holdsSecrets(d protoreflect.MessageDescriptor, visiting map[protoreflect.FullName]bool) bool {
	if v, ok := secretTypes.Load(d.FullName()); ok {
		return v.(bool)
	}
	if visiting[d.FullName()] {
		return false // a cycle: what it holds is decided where it started
	}
	visiting[d.FullName()] = true
	found := false
	fields := d.Fields()
	for i := 0; i < fields.Len() && !found; i++ {
		fd := fields.Get(i)
		found = secretField(fd) || (fd.Message() != nil && holdsSecrets(fd.Message(), visiting))
	}
	secretTypes.Store(d.FullName(), found)
	return found
}

// scrub replaces the secrets of m, at any depth.
func scrub(m protoreflect.Message) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case secretField(fd) && !fd.IsList():
			if fd.Kind() == protoreflect.StringKind {
				m.Set(fd, protoreflect.ValueOfString("[redacted]"))
			} else {
				m.Set(fd, protoreflect.ValueOfBytes([]byte("[redacted]")))
			}
		case fd.Message() != nil && fd.IsList():
			for i := 0; i < v.List().Len(); i++ {
				scrub(v.List().Get(i).Message())
			}
		case fd.Message() != nil && !fd.IsMap():
			scrub(v.Message())
		}
		return true
	})
}
