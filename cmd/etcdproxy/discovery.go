package main

import (
	"fmt"

	"go.etcd.io/etcd/client/pkg/v3/srv"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.uber.org/zap"
)

// upstreamEndpoints returns the etcd endpoints to proxy to: those found with --discovery-srv, else --endpoints.
func upstreamEndpoints(f *startFlags, lg *zap.Logger) ([]string, error) {
	eps, err := discoverEndpoints(lg, f.discoverySRV, f.discoverySRVName, f.cacert, f.insecureDiscovery)
	if err != nil || len(eps) > 0 {
		return eps, err
	}
	return f.endpoints, nil
}

// discoverEndpoints resolves the etcd cluster from DNS SRV records, as etcd grpc-proxy does with --discovery-srv:
// _etcd-client-ssl._tcp.DOMAIN (https) and _etcd-client._tcp.DOMAIN (http), with "-NAME" after "etcd-client"
// given --discovery-srv-name. A failed lookup of both is an error. Unless insecure, only the https endpoints that
// answer a TLS handshake (verified with ca, for the name DOMAIN) are kept. It returns no endpoint when domain is
// empty or none is kept: the caller then uses --endpoints, as etcd grpc-proxy does.
func discoverEndpoints(lg *zap.Logger, domain, serviceName, ca string, insecure bool) ([]string, error) {
	if domain == "" {
		return nil, nil
	}
	found, err := srv.GetClient("etcd-client", domain, serviceName)
	if err != nil {
		return nil, fmt.Errorf("--discovery-srv %s: %w", domain, err)
	}
	lg.Info("discovered cluster from SRV", zap.String("srv-server", domain), zap.Strings("endpoints", found.Endpoints))
	if insecure {
		return found.Endpoints, nil
	}
	eps, err := transport.ValidateSecureEndpoints(transport.TLSInfo{TrustedCAFile: ca, ServerName: domain}, found.Endpoints)
	if err != nil {
		lg.Warn("failed to validate discovered endpoints (--insecure-discovery accepts them without TLS)",
			zap.String("srv-server", domain), zap.Strings("endpoints", found.Endpoints), zap.Error(err))
	}
	return eps, nil
}
