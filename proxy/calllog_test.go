package proxy_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/proxy"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc/metadata"
)

// TestCallLog: with --experimental-enable-grpc-logging every request and response is logged, streams message by
// message, as the client sent and got them (keys before the namespace), and no password, password hash or token
// ever is.
func TestCallLog(t *testing.T) {
	core, logs := observer.New(zap.InfoLevel)
	e := proxytest.Start(t, proxytest.Options{Proxy: func(c *proxy.Config) {
		c.LogCalls = true
		c.Logger = zap.New(core)
		c.Overrides.Namespace = "/ns/" // the log shows the client's keys, not the ones sent to etcd
	}})
	ctx := proxytest.Timeout(t, 30*time.Second)
	proxytest.EnableAuth(t, ctx, e.Direct, "rootsecret", proxytest.User{Name: "alice", Password: "alicesecret", ReadFrom: "a"})
	root := proxytest.As(t, ctx, e.Via, "root", "rootsecret") // Authenticate through the proxy: password in, token out
	md, _ := metadata.FromOutgoingContext(root)
	token := md.Get("token")[0]
	auth := pb.NewAuthClient(e.Via)
	if _, err := auth.UserAdd(root, &pb.AuthUserAddRequest{Name: "bob", Password: "bobsecret"}); err != nil {
		t.Fatal(err)
	}
	if _, err := auth.UserChangePassword(root, &pb.AuthUserChangePasswordRequest{Name: "bob", Password: "bobsecret2"}); err != nil {
		t.Fatal(err)
	}
	if _, err := pb.NewKVClient(e.Via).Put(root, &pb.PutRequest{Key: []byte("a"), Value: []byte("logged")}); err != nil {
		t.Fatal(err)
	}
	if _, err := pb.NewKVClient(e.Via).Put(ctx, &pb.PutRequest{Key: []byte("a")}); err == nil {
		t.Fatal("a put without a token went through")
	}
	ws, err := pb.NewWatchClient(e.Via).Watch(root)
	if err != nil {
		t.Fatal(err)
	}
	if err := ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{
		CreateRequest: &pb.WatchCreateRequest{Key: []byte("a")}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := ws.Recv(); err != nil {
		t.Fatal(err)
	}
	// The proxy logs a stream response once its Send returned, which may be after the client has it.
	for deadline := time.Now().Add(5 * time.Second); logs.FilterMessage("stream response").Len() == 0 &&
		time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}

	var all strings.Builder
	for _, entry := range logs.All() {
		all.WriteString(entry.Message)
		for k, v := range entry.ContextMap() {
			all.WriteString(" " + k + "=" + strings.ReplaceAll(strings.ReplaceAll(fmt.Sprint(v), "\n", " "), "  ", " "))
		}
		all.WriteString("\n")
	}
	text := all.String()
	for _, want := range []string{"/etcdserverpb.Auth/Authenticate", "/etcdserverpb.Auth/UserAdd", `"logged"`,
		"/etcdserverpb.KV/Put", "user name is empty", "stream request", "stream response", "[redacted]"} {
		want = strings.ReplaceAll(want, `"logged"`, "bG9nZ2Vk") // values are bytes: base64 in JSON
		if !strings.Contains(text, want) {
			t.Errorf("the call log has no %q:\n%s", want, text)
		}
	}
	if strings.Contains(text, "L25zL2E") { // base64 of /ns/a
		t.Errorf("the call log shows the namespaced key, not the client's:\n%s", text)
	}
	for _, secret := range []string{"rootsecret", "bobsecret", "bobsecret2", token} {
		if strings.Contains(text, secret) {
			t.Errorf("the call log holds a secret (%q)", secret)
		}
	}
}
