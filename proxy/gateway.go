package proxy

// The HTTP/JSON gateway: etcd's /v3/... endpoints (/v3/kv/range, /v3/watch, /v3/lease/keepalive, ...), served on
// the gRPC port as an etcd member serves them on its client port, built as etcd builds its own (server/embed,
// serve.go): grpc-gateway's runtime.ServeMux with etcd's JSON options and every etcd service's generated gateway
// handlers, behind grpc-websocket-proxy, behind etcd's access control. The gateway's gRPC connection reaches this
// proxy's own grpc.Server in memory, so a gateway request takes the path a gRPC client's takes (interceptors,
// overrides, the client's token forwarded to etcd); it never talks to etcd directly.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"github.com/tmc/grpc-websocket-proxy/wsproxy"
	etcdservergw "go.etcd.io/etcd/api/v3/etcdserverpb/gw"
	v3electiongw "go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb/gw"
	v3lockgw "go.etcd.io/etcd/server/v3/etcdserver/api/v3lock/v3lockpb/gw"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/encoding/protojson"
)

// gatewayBufferBytes is the buffer of each direction of the in-memory connection: writers block when it is full,
// as on a socket, so it bounds memory, not message size.
const gatewayBufferBytes = 1 << 20

// gateway is the HTTP/JSON gateway and the in-memory connection it calls the proxy's gRPC server on.
type gateway struct {
	lis     *bufconn.Listener
	conn    *grpc.ClientConn
	handler http.Handler
	served  chan struct{} // closed when the server's Serve on lis returns

	// mu protects websockets, closed and emptied.
	mu         sync.Mutex
	websockets map[*websocketConn]struct{} // open websocket connections, which the HTTP server no longer sees
	closed     bool
	emptied    chan struct{} // made by close while websockets are open; closed when the last one closes
}

// websocketDrain bounds how long close lets the open websockets write their calls' last messages before it ends
// the websockets still open.
const websocketDrain = time.Second

// newGateway serves srv on an in-memory listener and builds the gateway on a connection to it. srv must have every
// service registered already (Serve fixes the service set).
func newGateway(srv *grpc.Server, lg *zap.Logger) *gateway {
	g := &gateway{lis: bufconn.Listen(gatewayBufferBytes), served: make(chan struct{}),
		websockets: map[*websocketConn]struct{}{}}
	// grpc.NewClient fails only on a malformed target or contradictory options, both fixed here: an invariant.
	conn, err := grpc.NewClient("passthrough:///etcdproxy-gateway",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return g.lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// As etcd's gateway connection: no receive limit of the client's own (the server's limits decide).
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32)))
	if err != nil {
		panic(fmt.Sprintf("etcdproxy: the gateway's in-memory connection: %v", err))
	}
	g.conn = conn
	mux := gatewayMux()
	// The Register functions only add routes to mux; the connection is used at request time.
	for _, register := range []func(context.Context, *runtime.ServeMux, *grpc.ClientConn) error{
		etcdservergw.RegisterKVHandler,
		etcdservergw.RegisterWatchHandler,
		etcdservergw.RegisterLeaseHandler,
		etcdservergw.RegisterClusterHandler,
		etcdservergw.RegisterMaintenanceHandler,
		etcdservergw.RegisterAuthHandler,
		v3lockgw.RegisterLockHandler,
		v3electiongw.RegisterElectionHandler,
	} {
		if err := register(context.Background(), mux, conn); err != nil {
			panic(fmt.Sprintf("etcdproxy: registering a gateway handler: %v", err))
		}
	}
	ws := wsproxy.WebsocketProxy(mux,
		// A websocket opens with GET; every gateway route, streams included, is a POST.
		wsproxy.WithRequestMutator(func(_ *http.Request, out *http.Request) *http.Request {
			out.Method = http.MethodPost
			return out
		}),
		// One websocket message per response line, however long (a large Range), as etcd configures it.
		wsproxy.WithMaxRespBodyBufferSize(math.MaxInt32),
		wsproxy.WithLogger(wsLogger{lg}))
	g.handler = accessControl(g.trackWebsockets(ws))
	go func() {
		defer close(g.served)
		_ = srv.Serve(g.lis) // returns when the server stops (Shutdown)
	}()
	return g
}

// gatewayMux is etcd's runtime.ServeMux: JSON with the proto field names (member_id, not memberId), unset fields
// left out, unknown request fields ignored; a google.api.HttpBody answer (none in etcd's API) passes as it is.
func gatewayMux() *runtime.ServeMux {
	return runtime.NewServeMux(runtime.WithMarshalerOption(runtime.MIMEWildcard, &runtime.HTTPBodyMarshaler{
		Marshaler: &runtime.JSONPb{
			MarshalOptions:   protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: false},
			UnmarshalOptions: protojson.UnmarshalOptions{DiscardUnknown: true},
		},
	}))
}

// close ends the gateway: it lets each open websocket deliver what its call answered last, then ends the gateway's
// connection, and so every gateway call still open, closes the websockets still open, and waits for the in-memory
// Serve. Called once the server has stopped, so each websocket's call has ended or is ending (the server closes lis
// itself; closing it again is harmless).
//
// The websockets come first: grpc-websocket-proxy writes a call's last message (a watch's "shutting down" error)
// to the websocket after the call has ended, and closes the websocket itself once it has; closing the websocket
// or the connection earlier would lose that message. The wait is bounded by ctx and by websocketDrain: a client
// that stopped reading keeps grpc-websocket-proxy blocked in a write, and a websocket whose client never sent its
// request has no call that could end; closing the connection ends both.
func (g *gateway) close(ctx context.Context) {
	g.mu.Lock()
	g.closed = true
	if len(g.websockets) > 0 {
		g.emptied = make(chan struct{})
	}
	emptied := g.emptied
	g.mu.Unlock()
	if emptied != nil {
		t := time.NewTimer(websocketDrain)
		select {
		case <-emptied:
		case <-t.C:
		case <-ctx.Done():
		}
		t.Stop()
	}
	_ = g.conn.Close()
	_ = g.lis.Close()
	g.mu.Lock()
	open := make([]*websocketConn, 0, len(g.websockets))
	for c := range g.websockets {
		open = append(open, c)
	}
	g.mu.Unlock()
	for _, c := range open {
		_ = c.Close()
	}
	<-g.served
}

// trackWebsockets has next's websocket upgrades recorded, so that close can end them.
func (g *gateway) trackWebsockets(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if websocket.IsWebSocketUpgrade(r) {
			w = &hijackTracker{ResponseWriter: w, g: g}
		}
		next.ServeHTTP(w, r)
	})
}

var errGatewayClosed = errors.New("etcdproxy: the gateway is shut down")

// hijackTracker is the ResponseWriter of a websocket upgrade: it records the connection the upgrade hijacks, so
// that close can end it (HTTP Shutdown and Close do not see hijacked connections).
type hijackTracker struct {
	http.ResponseWriter
	g *gateway
}

func (h *hijackTracker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, rw, err := http.NewResponseController(h.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	wc := &websocketConn{Conn: c, g: h.g}
	h.g.mu.Lock()
	closed := h.g.closed
	if !closed {
		h.g.websockets[wc] = struct{}{}
	}
	h.g.mu.Unlock()
	if closed {
		_ = c.Close()
		return nil, nil, errGatewayClosed
	}
	return wc, rw, nil
}

func (h *hijackTracker) Unwrap() http.ResponseWriter { return h.ResponseWriter }

// websocketConn is a hijacked connection that leaves the gateway's set when it is closed.
type websocketConn struct {
	net.Conn
	g *gateway
}

func (c *websocketConn) Close() error {
	c.g.mu.Lock()
	if _, ok := c.g.websockets[c]; ok {
		delete(c.g.websockets, c)
		if len(c.g.websockets) == 0 && c.g.emptied != nil {
			close(c.g.emptied)
		}
	}
	c.g.mu.Unlock()
	return c.Conn.Close()
}

// accessControl is what etcd's access controller does for the gateway with etcd's default settings (--cors "*",
// --host-whitelist "*", which etcd grpc-proxy has no flags to change): /v3beta/ paths are served as /v3/ (etcd's
// compatibility with clients of etcd 3.3), every answer allows any origin, and a CORS preflight (OPTIONS) is
// answered 200 with no body. With every host allowed, etcd's Host header check refuses nothing, so there is none.
func accessControl(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if rest, ok := strings.CutPrefix(r.URL.Path, "/v3beta/"); ok {
			r.URL.Path = "/v3/" + rest
		}
		h := w.Header()
		h.Add("Access-Control-Allow-Methods", "POST, GET, OPTIONS, PUT, DELETE")
		h.Add("Access-Control-Allow-Origin", "*")
		h.Add("Access-Control-Allow-Headers", "accept, content-type, authorization")
		if r.Method == http.MethodOptions {
			w.WriteHeader(http.StatusOK)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// wsLogger is grpc-websocket-proxy's logger on zap (its default is a logrus logger of its own, on stderr).
type wsLogger struct{ lg *zap.Logger }

func (l wsLogger) Warnln(args ...any)  { l.lg.Warn(fmt.Sprint(args...)) }
func (l wsLogger) Debugln(args ...any) { l.lg.Debug(fmt.Sprint(args...)) }
