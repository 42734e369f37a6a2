package crashguard_test

import (
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestMain(m *testing.M) { proxytest.VerifyTestMain(m) }

// TestUnknownAlarmActionRefused: an Alarm with an action etcd does not know is refused with InvalidArgument and
// never reaches etcd, whose member would crash on it; the known actions still answer as etcd does.
func TestUnknownAlarmActionRefused(t *testing.T) {
	e := proxytest.Start(t, proxytest.Options{})
	ctx := proxytest.Timeout(t, 30*time.Second)
	via, direct := pb.NewMaintenanceClient(e.Via), pb.NewMaintenanceClient(e.Direct)
	for _, action := range []pb.AlarmRequest_AlarmAction{3, 99, -1} {
		_, err := via.Alarm(ctx, &pb.AlarmRequest{Action: action})
		if status.Code(err) != codes.InvalidArgument {
			t.Fatalf("Alarm action %d through the proxy: %v, want InvalidArgument", action, err)
		}
	}
	// etcd is still up, and a known action answers as etcd does.
	got, err := via.Alarm(ctx, &pb.AlarmRequest{Action: pb.AlarmRequest_GET})
	if err != nil {
		t.Fatal(err)
	}
	want, err := direct.Alarm(ctx, &pb.AlarmRequest{Action: pb.AlarmRequest_GET})
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Alarms) != len(want.Alarms) || got.Header.ClusterId != want.Header.ClusterId {
		t.Fatalf("Alarm GET through the proxy %v, etcd %v", got, want)
	}
}
