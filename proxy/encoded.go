package proxy

import (
	"github.com/etcdproxy/etcdproxy/internal/encoded"
	"google.golang.org/grpc"
)

// offering names the unary methods whose handlers may answer with an encoding they keep (internal/encoded): Range,
// whose cache hits offer their entry's encoding.
var offering = map[string]bool{
	"/etcdserverpb.KV/Range": true,
}

// offeringRegistrar registers services on the server with the handlers of the methods in offering wrapped by
// encoded.Handler; the server's codec is encoded.Codec.
type offeringRegistrar struct{ grpc.ServiceRegistrar }

func (r offeringRegistrar) RegisterService(desc *grpc.ServiceDesc, impl any) {
	d := *desc
	d.Methods = make([]grpc.MethodDesc, len(desc.Methods))
	for i, m := range desc.Methods {
		if offering["/"+desc.ServiceName+"/"+m.MethodName] {
			m.Handler = encoded.Handler(m.Handler)
		}
		d.Methods[i] = m
	}
	r.ServiceRegistrar.RegisterService(&d, impl)
}
