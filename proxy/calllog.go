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
// metadata is logged (the client's token travels there). An Any is logged empty (its contents are not looked into).
// Keys and values are logged as they are, as etcd grpc-proxy logs them.

type callLog struct{ lg *zap.Logger }

func (c callLog) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	// The request as the client sent it: the overrides may rewrite it in place (the namespace does).
	fields := []zap.Field{zap.String("method", info.FullMethod), payload("request", req)}
	resp, err := handler(ctx, req)
	fields = append(fields, zap.Duration("took", time.Since(start)))
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
	if !holdsSecrets(m.ProtoReflect().Descriptor()) {
		return m
	}
	c := proto.Clone(m)
	scrub(c.ProtoReflect())
	return c
}

// secretField reports whether fd holds secrets: a string or bytes field (a list of them, or a map of them) whose
// name holds "password" or is "token".
func secretField(fd protoreflect.FieldDescriptor) bool {
	name := strings.ToLower(string(fd.Name()))
	if !strings.Contains(name, "password") && name != "token" {
		return false
	}
	if fd.IsMap() {
		fd = fd.MapValue()
	}
	return fd.Kind() == protoreflect.StringKind || fd.Kind() == protoreflect.BytesKind
}

// anyName is google.protobuf.Any's: its contents are not looked into, so they are not logged at all.
const anyName protoreflect.FullName = "google.protobuf.Any"

// secretTypes memoizes holdsSecrets per message type.
var secretTypes sync.Map // protoreflect.FullName -> bool

// holdsSecrets reports whether a message of type d can hold a secret field, at any depth (map values and lists
// included; an Any counts as one).
func holdsSecrets(d protoreflect.MessageDescriptor) bool {
	if v, ok := secretTypes.Load(d.FullName()); ok {
		return v.(bool)
	}
	found := reaches(d, map[protoreflect.FullName]bool{})
	secretTypes.Store(d.FullName(), found) // only the type asked about: what is found inside a cycle is partial
	return found
}

func reaches(d protoreflect.MessageDescriptor, visiting map[protoreflect.FullName]bool) bool {
	if d.FullName() == anyName {
		return true
	}
	if visiting[d.FullName()] {
		return false // on the path already: whatever it reaches is found from where it started
	}
	visiting[d.FullName()] = true
	fields := d.Fields()
	for i := 0; i < fields.Len(); i++ {
		fd := fields.Get(i)
		if secretField(fd) {
			return true
		}
		if fd.IsMap() {
			fd = fd.MapValue()
		}
		if fd.Message() != nil && reaches(fd.Message(), visiting) {
			return true
		}
	}
	return false
}

// scrub replaces the secrets of m, at any depth, and empties every Any.
func scrub(m protoreflect.Message) {
	if m.Descriptor().FullName() == anyName {
		for _, name := range []protoreflect.Name{"type_url", "value"} {
			m.Clear(m.Descriptor().Fields().ByName(name))
		}
		return
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsMap():
			if vd := fd.MapValue(); secretField(fd) {
				v.Map().Range(func(k protoreflect.MapKey, _ protoreflect.Value) bool {
					v.Map().Set(k, redactedValue(vd))
					return true
				})
			} else if vd.Message() != nil {
				v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
					scrub(mv.Message())
					return true
				})
			}
		case secretField(fd) && fd.IsList():
			for i := 0; i < v.List().Len(); i++ {
				v.List().Set(i, redactedValue(fd))
			}
		case secretField(fd):
			m.Set(fd, redactedValue(fd))
		case fd.Message() != nil && fd.IsList():
			for i := 0; i < v.List().Len(); i++ {
				scrub(v.List().Get(i).Message())
			}
		case fd.Message() != nil:
			scrub(v.Message())
		}
		return true
	})
}

// redactedValue is what a secret of fd's kind is logged as.
func redactedValue(fd protoreflect.FieldDescriptor) protoreflect.Value {
	if fd.Kind() == protoreflect.StringKind {
		return protoreflect.ValueOfString("[redacted]")
	}
	return protoreflect.ValueOfBytes([]byte("[redacted]"))
}
