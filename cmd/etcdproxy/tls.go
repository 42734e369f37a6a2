package main

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"path/filepath"

	"github.com/spf13/pflag"
	"go.etcd.io/etcd/client/pkg/v3/tlsutil"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.uber.org/zap"
)

// tlsFlags are the flags of TLS toward clients, etcd grpc-proxy's: names, value formats, defaults, validation and
// error texts are etcd's (etcdmain/grpc_proxy.go, v3.7.3), and the listener is built from them as etcd builds it,
// with go.etcd.io/etcd/client/pkg/v3/transport.
type tlsFlags struct {
	certFile, keyFile      string
	trustedCAFile          string
	clientCRLFile          string
	autoTLS                bool
	selfSignedCertValidity uint
	cipherSuites           []string
	minVersion, maxVersion string
}

func (t *tlsFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&t.certFile, "cert-file", "", "identify secure connections to the proxy using this TLS certificate file (TLS toward clients, gRPC and HTTP on --listen-addr; read again at every new connection, so a replaced certificate is served without a restart)")
	fs.StringVar(&t.keyFile, "key-file", "", "identify secure connections to the proxy using this TLS key file")
	fs.StringVar(&t.trustedCAFile, "trusted-ca-file", "", "verify certificates of TLS-enabled secure proxy using this CA bundle (clients must then present a certificate signed by it: mutual TLS)")
	fs.StringSliceVar(&t.cipherSuites, "listen-cipher-suites", nil, "Comma-separated list of supported TLS cipher suites between client/proxy (empty will be auto-populated by Go). TLS 1.2 only: Go does not let TLS 1.3's be configured")
	fs.BoolVar(&t.autoTLS, "auto-tls", false, "proxy TLS using generated certificates (self-signed, kept under --data-dir in fixtures/proxy; ignored when --cert-file, --key-file or --trusted-ca-file is given, as with etcd grpc-proxy)")
	fs.StringVar(&t.clientCRLFile, "client-crl-file", "", "proxy client certificate revocation list file (DER, as etcd reads it; read again at every new connection: a client certificate it revokes is refused)")
	fs.UintVar(&t.selfSignedCertValidity, "self-signed-cert-validity", 1, "The validity period of the proxy certificates, unit is year")
	fs.StringVar(&t.minVersion, "tls-min-version", string(tlsutil.TLSVersion12), "Minimum TLS version supported by grpc proxy. Possible values: TLS1.2, TLS1.3.")
	fs.StringVar(&t.maxVersion, "tls-max-version", string(tlsutil.TLSVersionDefault), "Maximum TLS version supported by grpc proxy. Possible values: TLS1.2, TLS1.3 (empty defers to Go).")
}

// check refuses what etcd grpc-proxy refuses before it starts (its checkArgs), with etcd's words. It runs whether
// TLS is on or not, as etcd's does.
func (t *tlsFlags) check() error {
	if t.autoTLS && t.selfSignedCertValidity == 0 {
		return errors.New("selfSignedCertValidity is invalid,it should be greater than 0")
	}
	minVersion, err := tlsutil.GetTLSVersion(t.minVersion)
	if err != nil {
		return fmt.Errorf("tls-min-version is invalid: %w", err)
	}
	maxVersion, err := tlsutil.GetTLSVersion(t.maxVersion)
	if err != nil {
		return fmt.Errorf("tls-max-version is invalid: %w", err)
	}
	// maxVersion 0 lets Go pick the highest version.
	if maxVersion != 0 && minVersion > maxVersion {
		return fmt.Errorf("min version (%s) is greater than max version (%s)", t.minVersion, t.maxVersion)
	}
	if minVersion == tls.VersionTLS13 && len(t.cipherSuites) > 0 {
		return errors.New("cipher suites cannot be configured when only TLS1.3 is enabled")
	}
	return nil
}

// serving reports whether the flags turn TLS toward clients on (the listener may still refuse them: a CA file
// alone, say).
func (t *tlsFlags) serving() bool {
	return t.certFile != "" || t.keyFile != "" || t.trustedCAFile != "" || t.autoTLS
}

// info is the TLS toward clients the flags ask for, nil for none, built as etcd grpc-proxy builds it: --cert-file,
// --key-file and --trusted-ca-file first (a CA file makes client certificates required and verified), else
// --auto-tls's self-signed certificate under dataDir; then the cipher suites, the version bounds and the CRL.
func (t *tlsFlags) info(lg *zap.Logger, listenAddr, dataDir string) (*transport.TLSInfo, error) {
	var info *transport.TLSInfo
	switch {
	case t.certFile != "" || t.keyFile != "" || t.trustedCAFile != "":
		info = &transport.TLSInfo{CertFile: t.certFile, KeyFile: t.keyFile, TrustedCAFile: t.trustedCAFile}
	case t.autoTLS:
		// etcd passes "https://"+listenAddr, which names no host in the certificate; the listen address itself
		// gives the certificate its IP (or DNS) name.
		self, err := transport.SelfCert(lg, filepath.Join(dataDir, "fixtures", "proxy"), []string{listenAddr},
			t.selfSignedCertValidity)
		if err != nil {
			return nil, fmt.Errorf("--auto-tls: %w", err)
		}
		info = &self
	default:
		if t.clientCRLFile != "" || len(t.cipherSuites) > 0 || t.maxVersion != "" ||
			t.minVersion != string(tlsutil.TLSVersion12) {
			lg.Warn("TLS toward clients is off (no --cert-file, --key-file, --trusted-ca-file or --auto-tls): " +
				"--client-crl-file, --listen-cipher-suites, --tls-min-version and --tls-max-version have no effect")
		}
		return nil, nil
	}
	info.Logger = lg.Named("tls")
	if len(t.cipherSuites) > 0 {
		cs, err := tlsutil.GetCipherSuites(t.cipherSuites)
		if err != nil {
			return nil, err
		}
		info.CipherSuites = cs
	}
	// Checked by check already.
	info.MinVersion, _ = tlsutil.GetTLSVersion(t.minVersion)
	info.MaxVersion, _ = tlsutil.GetTLSVersion(t.maxVersion)
	info.CRLFile = t.clientCRLFile
	lg.Info("TLS toward clients", zap.Stringer("tls-info", info))
	return info, nil
}

// listenClients listens on addr for clients, with TLS when info is not nil, as etcd grpc-proxy does: TCP keepalive,
// then a TLS listener that handshakes each connection (reading the certificate files again for it, so a replaced
// certificate is served to the next connection) and checks the client's certificate against the CRL, below the
// multiplexer that splits gRPC from HTTP.
func listenClients(addr string, info *transport.TLSInfo) (net.Listener, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	if l, err = transport.NewKeepAliveListener(l, "tcp", nil); err != nil {
		return nil, err
	}
	if info == nil {
		return l, nil
	}
	tl, err := transport.NewTLSListener(l, info)
	if err != nil {
		_ = l.Close()
		return nil, fmt.Errorf("failed to create TLS listener: %w", err)
	}
	return tl, nil
}
