package proxy_test

// The differential test: every RPC of etcd's API, sent to etcd directly and through the proxy, must get the same
// answer.
//
// etcd's answers depend on the history a cluster has served (revisions, raft terms and indexes, watch ids), so the
// test cannot send a request to a member and then the same request through a proxy in front of that member: the
// second would see the first one's effects. It runs twin clusters instead: each step goes to cluster A directly and
// to cluster B through B's proxy, so both clusters serve the same history. Only what differs between two clusters by
// construction is normalized before the comparison: cluster and member ids, member URLs, simple-auth tokens, the
// remaining TTL of a lease (within a second), and the whole-backend hash and snapshot bytes (compared otherwise).

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/etcdproxy/etcdproxy/internal/embedetcd"
	"github.com/etcdproxy/etcdproxy/internal/etcdapi"
	"github.com/etcdproxy/etcdproxy/internal/proxytest"
	"github.com/etcdproxy/etcdproxy/proxy"
	"github.com/google/go-cmp/cmp"
	bolt "go.etcd.io/bbolt"
	"go.etcd.io/etcd/api/v3/authpb"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3lock/v3lockpb"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/testing/protocmp"
)

const (
	// diffStepTimeout bounds each step on each twin.
	diffStepTimeout = 15 * time.Second
	// canonCluster replaces the cluster id in response headers.
	canonCluster = 1
	// learnerName is the name of the member the Cluster steps start as a learner and promote.
	learnerName = "learner"
	// bogusUser is a "user" whose token is not one etcd issued.
	bogusUser = "bogus"
	// noToken makes a step carry no token while a session is open.
	noToken = "-"

	// Explicit lease ids, so that they are the same on both twins.
	leaseKeys     = 0x1001 // keys attached, then revoked
	leaseElection = 0x1002
	leaseLock     = 0x1003
	leaseRevoked  = 0x1004
	leaseMissing  = 0x9999
	memberMissing = 0xdead
)

// TestDifferential runs every RPC of etcd's API on twin clusters, directly on one and through the proxy on the
// other, and fails on any difference in the answers (messages, stream contents, gRPC code and message). It also
// fails if an RPC of the API (as compiled into the etcd packages in go.mod) has no step, so that an RPC added by
// regeneration needs a differential step too.
func TestDifferential(t *testing.T) {
	// etcd's goroutines aside (its Election and Lock servers' in-process clientv3, its peers' HTTP connections):
	// nothing this test started outlives it.
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() {
		if err := proxytest.LeftOver(before); err != nil {
			t.Error(err)
		}
	})
	exercised := map[string]bool{}
	ran := 0
	t.Run("OneMember", func(t *testing.T) {
		a, b := startTwins(t, 1)
		runTwins(t, exercised, a, b, oneMemberSteps())
		ran++
	})
	t.Run("ThreeMembers", func(t *testing.T) {
		a, b := startTwins(t, 3)
		for _, s := range []*twinSide{a, b} {
			s.makeLeader(t, 0)
		}
		runTwins(t, exercised, a, b, threeMemberSteps())
		ran++
	})
	if ran < 2 {
		return // with a subtest left out (-run) or stopped by a fatal error, some steps did not run
	}
	var missing, unknown []string
	for rpc := range apiMethods() {
		if !exercised[rpc] {
			missing = append(missing, rpc)
		}
	}
	for rpc := range exercised {
		if apiMethods()[rpc] == nil {
			unknown = append(unknown, rpc)
		}
	}
	sort.Strings(missing)
	sort.Strings(unknown)
	if len(missing) > 0 || len(unknown) > 0 {
		t.Errorf("the steps must exercise exactly the %d RPCs of etcd's API:\n  no step for: %v\n  not in the API: %v",
			len(apiMethods()), missing, unknown)
	}
}

// oneMemberSteps run on twin one-member clusters (the learner steps add and remove a second member).
func oneMemberSteps() []diffStep {
	var steps []diffStep
	add := func(s ...diffStep) { steps = append(steps, s...) }

	// KV. Revision 1 is the empty store; each write below is one revision on both twins.
	rs := &pb.TxnRequest{} // 25 keys rs/00..rs/24 in one revision, enough for RangeStream to answer in chunks
	for i := 0; i < 25; i++ {
		rs.Success = append(rs.Success, txnPut(fmt.Sprintf("rs/%02d", i), fmt.Sprint(i)))
	}
	add(
		unaryStep("/etcdserverpb.KV/Put", "put k/a", &pb.PutRequest{Key: []byte("k/a"), Value: []byte("1")}),
		unaryStep("/etcdserverpb.KV/Put", "put k/b with prev_kv, no previous value", &pb.PutRequest{Key: []byte("k/b"), Value: []byte("2"), PrevKv: true}),
		unaryStep("/etcdserverpb.KV/Put", "overwrite k/a with prev_kv", &pb.PutRequest{Key: []byte("k/a"), Value: []byte("3"), PrevKv: true}),
		unaryStep("/etcdserverpb.KV/Put", "ignore_value keeps the value", &pb.PutRequest{Key: []byte("k/b"), IgnoreValue: true, PrevKv: true}),
		unaryStep("/etcdserverpb.KV/Put", "empty key", &pb.PutRequest{Value: []byte("v")}).refused(),
		unaryStep("/etcdserverpb.KV/Put", "ignore_value with a value", &pb.PutRequest{Key: []byte("k/a"), Value: []byte("v"), IgnoreValue: true}).refused(),
		unaryStep("/etcdserverpb.KV/Put", "ignore_value on a missing key", &pb.PutRequest{Key: []byte("k/missing"), IgnoreValue: true}).refused(),
		unaryStep("/etcdserverpb.KV/Put", "lease that does not exist", &pb.PutRequest{Key: []byte("k/a"), Lease: leaseMissing}).refused(),
		unaryStep("/etcdserverpb.KV/Txn", "25 puts in one txn", rs),

		unaryStep("/etcdserverpb.KV/Range", "one key", &pb.RangeRequest{Key: []byte("k/a")}),
		unaryStep("/etcdserverpb.KV/Range", "missing key", &pb.RangeRequest{Key: []byte("k/missing")}),
		unaryStep("/etcdserverpb.KV/Range", "prefix", &pb.RangeRequest{Key: []byte("k/"), RangeEnd: keyPrefixEnd("k/")}),
		unaryStep("/etcdserverpb.KV/Range", "prefix with limit", &pb.RangeRequest{Key: []byte("rs/"), RangeEnd: keyPrefixEnd("rs/"), Limit: 3}),
		unaryStep("/etcdserverpb.KV/Range", "at an old revision", &pb.RangeRequest{Key: []byte("k/a"), Revision: 2}),
		unaryStep("/etcdserverpb.KV/Range", "serializable", &pb.RangeRequest{Key: []byte("k/"), RangeEnd: keyPrefixEnd("k/"), Serializable: true}),
		unaryStep("/etcdserverpb.KV/Range", "count only", &pb.RangeRequest{Key: []byte("rs/"), RangeEnd: keyPrefixEnd("rs/"), CountOnly: true}),
		unaryStep("/etcdserverpb.KV/Range", "keys only, sorted by value descending", &pb.RangeRequest{Key: []byte("rs/"), RangeEnd: keyPrefixEnd("rs/"),
			KeysOnly: true, SortOrder: pb.RangeRequest_DESCEND, SortTarget: pb.RangeRequest_VALUE}),
		unaryStep("/etcdserverpb.KV/Range", "everything with a mod revision filter", &pb.RangeRequest{Key: []byte{0}, RangeEnd: []byte{0},
			MinModRevision: 3, MaxModRevision: 4}),
		unaryStep("/etcdserverpb.KV/Range", "future revision", &pb.RangeRequest{Key: []byte("k/a"), Revision: 1000}).refused(),
		unaryStep("/etcdserverpb.KV/Range", "empty key", &pb.RangeRequest{}).refused(),
		unaryStep("/etcdserverpb.KV/Range", "invalid sort order", &pb.RangeRequest{Key: []byte("k/a"), SortOrder: 99}).refused(),

		rangeStreamStep("prefix in several chunks", &pb.RangeRequest{Key: []byte("rs/"), RangeEnd: keyPrefixEnd("rs/")}),
		rangeStreamStep("prefix with limit", &pb.RangeRequest{Key: []byte("rs/"), RangeEnd: keyPrefixEnd("rs/"), Limit: 13}),
		rangeStreamStep("count only", &pb.RangeRequest{Key: []byte("rs/"), RangeEnd: keyPrefixEnd("rs/"), CountOnly: true}),
		rangeStreamStep("serializable at an old revision", &pb.RangeRequest{Key: []byte{0}, RangeEnd: []byte{0}, Revision: 4, Serializable: true}),
		rangeStreamStep("custom sort order", &pb.RangeRequest{Key: []byte("rs/"), RangeEnd: keyPrefixEnd("rs/"), SortOrder: pb.RangeRequest_DESCEND}).refused(),
		rangeStreamStep("revision filter", &pb.RangeRequest{Key: []byte("rs/"), RangeEnd: keyPrefixEnd("rs/"), MinCreateRevision: 2}).refused(),
		rangeStreamStep("future revision", &pb.RangeRequest{Key: []byte("rs/"), Revision: 1000}).refused(),
		rangeStreamStep("empty key", &pb.RangeRequest{}).refused(),

		unaryStep("/etcdserverpb.KV/DeleteRange", "one key with prev_kv", &pb.DeleteRangeRequest{Key: []byte("k/b"), PrevKv: true}),
		unaryStep("/etcdserverpb.KV/DeleteRange", "a range", &pb.DeleteRangeRequest{Key: []byte("rs/20"), RangeEnd: []byte("rs/3")}),
		unaryStep("/etcdserverpb.KV/DeleteRange", "nothing to delete", &pb.DeleteRangeRequest{Key: []byte("k/missing")}),
		unaryStep("/etcdserverpb.KV/DeleteRange", "empty key", &pb.DeleteRangeRequest{}).refused(),

		unaryStep("/etcdserverpb.KV/Txn", "compare succeeds", &pb.TxnRequest{
			Compare: []*pb.Compare{{Key: []byte("k/a"), Target: pb.Compare_VALUE, Result: pb.Compare_EQUAL, TargetUnion: &pb.Compare_Value{Value: []byte("3")}}},
			Success: []*pb.RequestOp{txnPut("k/c", "c"), txnRange("k/", "k0")},
			Failure: []*pb.RequestOp{txnPut("k/never", "x")},
		}),
		unaryStep("/etcdserverpb.KV/Txn", "compare fails", &pb.TxnRequest{
			Compare: []*pb.Compare{{Key: []byte("k/a"), Target: pb.Compare_VERSION, Result: pb.Compare_GREATER, TargetUnion: &pb.Compare_Version{Version: 100}}},
			Success: []*pb.RequestOp{txnPut("k/never", "x")},
			Failure: []*pb.RequestOp{txnRange("k/a", ""), txnDelete("rs/00", "")},
		}),
		unaryStep("/etcdserverpb.KV/Txn", "nested txn", &pb.TxnRequest{
			Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestTxn{RequestTxn: &pb.TxnRequest{
				Compare: []*pb.Compare{{Key: []byte("k/c"), Target: pb.Compare_CREATE, Result: pb.Compare_GREATER, TargetUnion: &pb.Compare_CreateRevision{CreateRevision: 0}}},
				Success: []*pb.RequestOp{txnPut("k/d", "d"), txnRange("k/", "k0")},
			}}}},
		}),
		unaryStep("/etcdserverpb.KV/Txn", "duplicate key", &pb.TxnRequest{Success: []*pb.RequestOp{txnPut("k/x", "1"), txnPut("k/x", "2")}}).refused(),
		unaryStep("/etcdserverpb.KV/Txn", "too many operations", tooManyOps()).refused(),
		unaryStep("/etcdserverpb.KV/Txn", "empty operation", &pb.TxnRequest{Success: []*pb.RequestOp{{}}}).refused(),

		unaryStep("/etcdserverpb.KV/Compact", "future revision", &pb.CompactionRequest{Revision: 1000}).refused(),
		unaryStep("/etcdserverpb.KV/Compact", "physical compaction at revision 4", &pb.CompactionRequest{Revision: 4, Physical: true}),
		unaryStep("/etcdserverpb.KV/Compact", "compacted revision", &pb.CompactionRequest{Revision: 3}).refused(),
		unaryStep("/etcdserverpb.KV/Range", "compacted revision", &pb.RangeRequest{Key: []byte("k/a"), Revision: 2}).refused(),
		rangeStreamStep("compacted revision", &pb.RangeRequest{Key: []byte("k/a"), Revision: 2}).refused(),
	)

	// Watch.
	add(watchStep())

	// Lease.
	add(
		unaryStep("/etcdserverpb.Lease/LeaseGrant", "explicit id", &pb.LeaseGrantRequest{ID: leaseKeys, TTL: 600}),
		unaryStep("/etcdserverpb.Lease/LeaseGrant", "id that exists", &pb.LeaseGrantRequest{ID: leaseKeys, TTL: 600}).refused(),
		unaryStep("/etcdserverpb.Lease/LeaseGrant", "TTL over the maximum", &pb.LeaseGrantRequest{ID: 0x1fff, TTL: 1 << 40}).refused(),
		unaryStep("/etcdserverpb.Lease/LeaseGrant", "lease for the election", &pb.LeaseGrantRequest{ID: leaseElection, TTL: 600}),
		unaryStep("/etcdserverpb.Lease/LeaseGrant", "lease for the lock", &pb.LeaseGrantRequest{ID: leaseLock, TTL: 600}),
		unaryStep("/etcdserverpb.Lease/LeaseGrant", "lease to revoke", &pb.LeaseGrantRequest{ID: leaseRevoked, TTL: 600}),
		unaryStep("/etcdserverpb.KV/Put", "attach l/a to a lease", &pb.PutRequest{Key: []byte("l/a"), Value: []byte("a"), Lease: leaseKeys}),
		unaryStep("/etcdserverpb.KV/Put", "attach l/b to a lease", &pb.PutRequest{Key: []byte("l/b"), Value: []byte("b"), Lease: leaseKeys}),
		unaryStep("/etcdserverpb.Lease/LeaseTimeToLive", "with keys", &pb.LeaseTimeToLiveRequest{ID: leaseKeys, Keys: true}),
		unaryStep("/etcdserverpb.Lease/LeaseTimeToLive", "lease that does not exist", &pb.LeaseTimeToLiveRequest{ID: leaseMissing}),
		unaryStep("/etcdserverpb.Lease/LeaseLeases", "all leases", &pb.LeaseLeasesRequest{}),
		keepAliveStep(),
		unaryStep("/etcdserverpb.Lease/LeaseRevoke", "revoke", &pb.LeaseRevokeRequest{ID: leaseRevoked}),
		unaryStep("/etcdserverpb.Lease/LeaseRevoke", "revoked already", &pb.LeaseRevokeRequest{ID: leaseRevoked}).refused(),
		unaryStep("/etcdserverpb.Lease/LeaseRevoke", "revoke a lease with keys", &pb.LeaseRevokeRequest{ID: leaseKeys}),
		unaryStep("/etcdserverpb.KV/Range", "keys of the revoked lease are gone", &pb.RangeRequest{Key: []byte("l/"), RangeEnd: keyPrefixEnd("l/")}),
	)

	// Election: errors from the election server come as code Unknown; they are compared as they are.
	add(
		unaryStep("/v3electionpb.Election/Leader", "no leader yet", &v3electionpb.LeaderRequest{Name: []byte("e1")}).refused(),
		unaryStepFn("/v3electionpb.Election/Campaign", "campaign", func(*testing.T, *twinSide) proto.Message {
			return &v3electionpb.CampaignRequest{Name: []byte("e1"), Lease: leaseElection, Value: []byte("v1")}
		}, func(_ *testing.T, s *twinSide, resp proto.Message) {
			s.leader = resp.(*v3electionpb.CampaignResponse).Leader
		}),
		unaryStep("/v3electionpb.Election/Campaign", "lease that does not exist", &v3electionpb.CampaignRequest{Name: []byte("e2"), Lease: leaseMissing, Value: []byte("x")}).refused(),
		unaryStep("/v3electionpb.Election/Leader", "leader", &v3electionpb.LeaderRequest{Name: []byte("e1")}),
		observeStep(),
		unaryStep("/v3electionpb.Election/Proclaim", "not the leader", &v3electionpb.ProclaimRequest{
			Leader: &v3electionpb.LeaderKey{Name: []byte("e1"), Key: []byte("e1/nope"), Rev: 1, Lease: leaseElection}, Value: []byte("x")}).refused(),
		unaryStep("/v3electionpb.Election/Proclaim", "no leader key", &v3electionpb.ProclaimRequest{Value: []byte("x")}).refused(),
		unaryStepFn("/v3electionpb.Election/Resign", "resign", func(_ *testing.T, s *twinSide) proto.Message {
			return &v3electionpb.ResignRequest{Leader: s.leader}
		}, nil),
		unaryStep("/v3electionpb.Election/Resign", "lease that does not exist (succeeds)", &v3electionpb.ResignRequest{
			Leader: &v3electionpb.LeaderKey{Name: []byte("e1"), Key: []byte("e1/nope"), Rev: 1, Lease: leaseMissing}}),
		unaryStep("/v3electionpb.Election/Resign", "no leader key", &v3electionpb.ResignRequest{}).refused(),
		unaryStep("/v3electionpb.Election/Leader", "no leader after resign", &v3electionpb.LeaderRequest{Name: []byte("e1")}).refused(),
	)

	// Lock.
	add(
		unaryStepFn("/v3lockpb.Lock/Lock", "lock", func(*testing.T, *twinSide) proto.Message {
			return &v3lockpb.LockRequest{Name: []byte("lk"), Lease: leaseLock}
		}, func(_ *testing.T, s *twinSide, resp proto.Message) {
			s.lockKey = resp.(*v3lockpb.LockResponse).Key
		}),
		unaryStep("/v3lockpb.Lock/Lock", "lease that does not exist", &v3lockpb.LockRequest{Name: []byte("lk2"), Lease: leaseMissing}).refused(),
		unaryStepFn("/v3lockpb.Lock/Unlock", "unlock", func(_ *testing.T, s *twinSide) proto.Message {
			return &v3lockpb.UnlockRequest{Key: s.lockKey}
		}, nil),
		unaryStep("/v3lockpb.Lock/Unlock", "key that does not exist", &v3lockpb.UnlockRequest{Key: []byte("lk/nope")}),
	)

	// Maintenance.
	add(
		statusStep("status"),
		unaryStep("/etcdserverpb.Maintenance/Alarm", "no alarm", &pb.AlarmRequest{Action: pb.AlarmRequest_GET}),
		unaryStepFn("/etcdserverpb.Maintenance/Alarm", "raise NOSPACE", func(_ *testing.T, s *twinSide) proto.Message {
			return &pb.AlarmRequest{Action: pb.AlarmRequest_ACTIVATE, MemberID: s.memberID(0), Alarm: pb.AlarmType_NOSPACE}
		}, nil),
		unaryStep("/etcdserverpb.KV/Put", "refused under NOSPACE", &pb.PutRequest{Key: []byte("k/a"), Value: []byte("x")}).refused(),
		unaryStep("/etcdserverpb.Maintenance/Alarm", "NOSPACE raised", &pb.AlarmRequest{Action: pb.AlarmRequest_GET}),
		unaryStepFn("/etcdserverpb.Maintenance/Alarm", "clear NOSPACE", func(_ *testing.T, s *twinSide) proto.Message {
			return &pb.AlarmRequest{Action: pb.AlarmRequest_DEACTIVATE, MemberID: s.memberID(0), Alarm: pb.AlarmType_NOSPACE}
		}, nil),
		unaryStep("/etcdserverpb.Maintenance/Alarm", "alarm cleared", &pb.AlarmRequest{Action: pb.AlarmRequest_GET}),
		hashStep(),
		unaryStep("/etcdserverpb.Maintenance/HashKV", "latest revision", &pb.HashKVRequest{}),
		unaryStep("/etcdserverpb.Maintenance/HashKV", "at a revision", &pb.HashKVRequest{Revision: 6}),
		unaryStep("/etcdserverpb.Maintenance/HashKV", "compacted revision", &pb.HashKVRequest{Revision: 2}).refused(),
		unaryStep("/etcdserverpb.Maintenance/HashKV", "future revision", &pb.HashKVRequest{Revision: 1000}).refused(),
		unaryStep("/etcdserverpb.Maintenance/Defragment", "defragment", &pb.DefragmentRequest{}),
		snapshotStep(),
		unaryStepFn("/etcdserverpb.Maintenance/MoveLeader", "to itself (the only member)", func(_ *testing.T, s *twinSide) proto.Message {
			return &pb.MoveLeaderRequest{TargetID: s.memberID(0)}
		}, nil),
		unaryStep("/etcdserverpb.Maintenance/MoveLeader", "member that does not exist", &pb.MoveLeaderRequest{TargetID: memberMissing}).refused(),
		unaryStep("/etcdserverpb.Maintenance/Downgrade", "validate one minor down", &pb.DowngradeRequest{Action: pb.DowngradeRequest_VALIDATE, Version: "3.6"}),
		unaryStep("/etcdserverpb.Maintenance/Downgrade", "validate a bad version", &pb.DowngradeRequest{Action: pb.DowngradeRequest_VALIDATE, Version: "bad"}).refused(),
		unaryStep("/etcdserverpb.Maintenance/Downgrade", "validate two minors down", &pb.DowngradeRequest{Action: pb.DowngradeRequest_VALIDATE, Version: "3.5"}).refused(),
		unaryStep("/etcdserverpb.Maintenance/Downgrade", "enable an upgrade", &pb.DowngradeRequest{Action: pb.DowngradeRequest_ENABLE, Version: "3.8"}).refused(),
		unaryStep("/etcdserverpb.Maintenance/Downgrade", "cancel with nothing in flight", &pb.DowngradeRequest{Action: pb.DowngradeRequest_CANCEL}),
	)

	// Cluster. Member 101 is an unstarted learner; member 102 a learner that starts, is promoted and removed.
	add(
		unaryStep("/etcdserverpb.Cluster/MemberList", "list", &pb.MemberListRequest{}),
		unaryStep("/etcdserverpb.Cluster/MemberList", "linearizable", &pb.MemberListRequest{Linearizable: true}),
		unaryStepFn("/etcdserverpb.Cluster/MemberAdd", "unstarted learner", func(*testing.T, *twinSide) proto.Message {
			return &pb.MemberAddRequest{PeerURLs: []string{"http://127.0.0.1:1"}, IsLearner: true}
		}, func(_ *testing.T, s *twinSide, resp proto.Message) {
			s.added(resp.(*pb.MemberAddResponse).Member.ID)
		}),
		unaryStep("/etcdserverpb.Cluster/MemberAdd", "bad URL", &pb.MemberAddRequest{PeerURLs: []string{"::bad"}, IsLearner: true}).refused(),
		unaryStepFn("/etcdserverpb.Cluster/MemberAdd", "peer URL in use", func(_ *testing.T, s *twinSide) proto.Message {
			return &pb.MemberAddRequest{PeerURLs: []string{s.env.Cluster.Members[0].PeerURL}, IsLearner: true}
		}, nil).refused(),
		unaryStepFn("/etcdserverpb.Cluster/MemberUpdate", "peer URLs of the learner", func(_ *testing.T, s *twinSide) proto.Message {
			return &pb.MemberUpdateRequest{ID: s.addedIDs[0], PeerURLs: []string{"http://127.0.0.1:2"}}
		}, nil),
		unaryStep("/etcdserverpb.Cluster/MemberUpdate", "member that does not exist", &pb.MemberUpdateRequest{ID: memberMissing, PeerURLs: []string{"http://127.0.0.1:3"}}).refused(),
		unaryStepFn("/etcdserverpb.Cluster/MemberPromote", "learner not in sync", func(_ *testing.T, s *twinSide) proto.Message {
			return &pb.MemberPromoteRequest{ID: s.addedIDs[0]}
		}, nil).refused(),
		unaryStepFn("/etcdserverpb.Cluster/MemberPromote", "not a learner", func(_ *testing.T, s *twinSide) proto.Message {
			return &pb.MemberPromoteRequest{ID: s.memberID(0)}
		}, nil).refused(),
		unaryStep("/etcdserverpb.Cluster/MemberPromote", "member that does not exist", &pb.MemberPromoteRequest{ID: memberMissing}).refused(),
		unaryStepFn("/etcdserverpb.Cluster/MemberRemove", "unstarted learner", func(_ *testing.T, s *twinSide) proto.Message {
			return &pb.MemberRemoveRequest{ID: s.addedIDs[0]}
		}, nil),
		unaryStep("/etcdserverpb.Cluster/MemberRemove", "member that does not exist", &pb.MemberRemoveRequest{ID: memberMissing}).refused(),
		unaryStepFn("/etcdserverpb.Cluster/MemberAdd", "learner that starts", func(_ *testing.T, s *twinSide) proto.Message {
			return &pb.MemberAddRequest{PeerURLs: []string{s.learnerPeer}, IsLearner: true}
		}, func(t *testing.T, s *twinSide, resp proto.Message) {
			s.added(resp.(*pb.MemberAddResponse).Member.ID)
			s.startLearner(t)
		}),
		unaryStep("/etcdserverpb.Cluster/MemberList", "with the started learner", &pb.MemberListRequest{Linearizable: true}),
		unaryStepFn("/etcdserverpb.Cluster/MemberPromote", "learner in sync", func(t *testing.T, s *twinSide) proto.Message {
			s.waitLearnerInSync(t)
			return &pb.MemberPromoteRequest{ID: s.addedIDs[1]}
		}, nil),
		unaryStepFn("/etcdserverpb.Cluster/MemberRemove", "promoted member", func(_ *testing.T, s *twinSide) proto.Message {
			return &pb.MemberRemoveRequest{ID: s.addedIDs[1]}
		}, nil),
		unaryStep("/etcdserverpb.Cluster/MemberList", "back to one member", &pb.MemberListRequest{Linearizable: true}),
	)

	// Auth: every RPC, its usual errors, and what a token allows once auth is on.
	readK := &authpb.Permission{PermType: authpb.READ, Key: []byte("k/"), RangeEnd: keyPrefixEnd("k/")}
	add(
		unaryStep("/etcdserverpb.Auth/AuthStatus", "disabled", &pb.AuthStatusRequest{}),
		unaryStep("/etcdserverpb.Auth/Authenticate", "auth not enabled", &pb.AuthenticateRequest{Name: "root", Password: "rootpw"}).refused(),
		unaryStep("/etcdserverpb.Auth/AuthEnable", "no root user", &pb.AuthEnableRequest{}).refused(),
		unaryStep("/etcdserverpb.Auth/UserAdd", "root", &pb.AuthUserAddRequest{Name: "root", Password: "rootpw", Options: &authpb.UserAddOptions{}}),
		unaryStep("/etcdserverpb.Auth/UserAdd", "alice", &pb.AuthUserAddRequest{Name: "alice", Password: "alicepw", Options: &authpb.UserAddOptions{}}),
		unaryStep("/etcdserverpb.Auth/UserAdd", "without password", &pb.AuthUserAddRequest{Name: "bob", Options: &authpb.UserAddOptions{NoPassword: true}}),
		unaryStep("/etcdserverpb.Auth/UserAdd", "user that exists", &pb.AuthUserAddRequest{Name: "alice", Password: "x", Options: &authpb.UserAddOptions{}}).refused(),
		unaryStep("/etcdserverpb.Auth/UserAdd", "empty name", &pb.AuthUserAddRequest{Password: "x", Options: &authpb.UserAddOptions{}}).refused(),
		unaryStep("/etcdserverpb.Auth/AuthEnable", "root without the root role", &pb.AuthEnableRequest{}).refused(),
		unaryStep("/etcdserverpb.Auth/UserGet", "alice", &pb.AuthUserGetRequest{Name: "alice"}),
		unaryStep("/etcdserverpb.Auth/UserGet", "user that does not exist", &pb.AuthUserGetRequest{Name: "nobody"}).refused(),
		unaryStep("/etcdserverpb.Auth/UserList", "users", &pb.AuthUserListRequest{}),
		unaryStep("/etcdserverpb.Auth/RoleAdd", "reader", &pb.AuthRoleAddRequest{Name: "reader"}),
		unaryStep("/etcdserverpb.Auth/RoleAdd", "role that exists", &pb.AuthRoleAddRequest{Name: "reader"}).refused(),
		unaryStep("/etcdserverpb.Auth/RoleAdd", "empty name", &pb.AuthRoleAddRequest{}).refused(),
		unaryStep("/etcdserverpb.Auth/RoleAdd", "scratch", &pb.AuthRoleAddRequest{Name: "scratch"}),
		unaryStep("/etcdserverpb.Auth/RoleGrantPermission", "read k/", &pb.AuthRoleGrantPermissionRequest{Name: "reader", Perm: readK}),
		unaryStep("/etcdserverpb.Auth/RoleGrantPermission", "write to scratch", &pb.AuthRoleGrantPermissionRequest{Name: "scratch",
			Perm: &authpb.Permission{PermType: authpb.WRITE, Key: []byte("s")}}),
		unaryStep("/etcdserverpb.Auth/RoleGrantPermission", "no permission given", &pb.AuthRoleGrantPermissionRequest{Name: "reader"}).refused(),
		unaryStep("/etcdserverpb.Auth/RoleGrantPermission", "role that does not exist", &pb.AuthRoleGrantPermissionRequest{Name: "nope", Perm: readK}).refused(),
		unaryStep("/etcdserverpb.Auth/RoleGet", "reader", &pb.AuthRoleGetRequest{Role: "reader"}),
		unaryStep("/etcdserverpb.Auth/RoleGet", "role that does not exist", &pb.AuthRoleGetRequest{Role: "nope"}).refused(),
		unaryStep("/etcdserverpb.Auth/RoleList", "roles", &pb.AuthRoleListRequest{}),
		unaryStep("/etcdserverpb.Auth/RoleRevokePermission", "write to scratch", &pb.AuthRoleRevokePermissionRequest{Role: "scratch", Key: []byte("s")}),
		unaryStep("/etcdserverpb.Auth/RoleRevokePermission", "permission not granted", &pb.AuthRoleRevokePermissionRequest{Role: "scratch", Key: []byte("s")}).refused(),
		unaryStep("/etcdserverpb.Auth/RoleDelete", "scratch", &pb.AuthRoleDeleteRequest{Role: "scratch"}),
		unaryStep("/etcdserverpb.Auth/RoleDelete", "role that does not exist", &pb.AuthRoleDeleteRequest{Role: "scratch"}).refused(),
		unaryStep("/etcdserverpb.Auth/UserGrantRole", "root gets root", &pb.AuthUserGrantRoleRequest{User: "root", Role: "root"}),
		unaryStep("/etcdserverpb.Auth/UserGrantRole", "alice gets reader", &pb.AuthUserGrantRoleRequest{User: "alice", Role: "reader"}),
		unaryStep("/etcdserverpb.Auth/UserGrantRole", "bob gets reader", &pb.AuthUserGrantRoleRequest{User: "bob", Role: "reader"}),
		unaryStep("/etcdserverpb.Auth/UserGrantRole", "role that does not exist", &pb.AuthUserGrantRoleRequest{User: "alice", Role: "nope"}).refused(),
		unaryStep("/etcdserverpb.Auth/UserRevokeRole", "bob loses reader", &pb.AuthUserRevokeRoleRequest{Name: "bob", Role: "reader"}),
		unaryStep("/etcdserverpb.Auth/UserRevokeRole", "role not granted", &pb.AuthUserRevokeRoleRequest{Name: "bob", Role: "reader"}).refused(),
		unaryStep("/etcdserverpb.Auth/UserChangePassword", "alice", &pb.AuthUserChangePasswordRequest{Name: "alice", Password: "alicepw2"}),
		unaryStep("/etcdserverpb.Auth/UserChangePassword", "user that does not exist", &pb.AuthUserChangePasswordRequest{Name: "nobody", Password: "x"}).refused(),
		unaryStep("/etcdserverpb.Auth/UserDelete", "bob", &pb.AuthUserDeleteRequest{Name: "bob"}),
		unaryStep("/etcdserverpb.Auth/UserDelete", "user that does not exist", &pb.AuthUserDeleteRequest{Name: "bob"}).refused(),

		unaryStep("/etcdserverpb.Auth/AuthEnable", "enable", &pb.AuthEnableRequest{}),
		unaryStep("/etcdserverpb.Auth/Authenticate", "wrong password", &pb.AuthenticateRequest{Name: "root", Password: "nope"}).refused(),
		unaryStep("/etcdserverpb.Auth/Authenticate", "old password", &pb.AuthenticateRequest{Name: "alice", Password: "alicepw"}).refused(),
		authenticateStep("root", "rootpw"),
		authenticateStep("alice", "alicepw2"),
		unaryStep("/etcdserverpb.Auth/AuthStatus", "enabled", &pb.AuthStatusRequest{}),
		unaryStep("/etcdserverpb.KV/Range", "permitted to alice", &pb.RangeRequest{Key: []byte("k/"), RangeEnd: keyPrefixEnd("k/")}).withToken("alice"),
		unaryStep("/etcdserverpb.KV/Put", "not permitted to alice", &pb.PutRequest{Key: []byte("k/a"), Value: []byte("x")}).withToken("alice").refused(),
		unaryStep("/etcdserverpb.KV/Range", "without a token", &pb.RangeRequest{Key: []byte("k/a")}).withToken(noToken).refused(),
		unaryStep("/etcdserverpb.KV/Range", "with a token etcd did not issue", &pb.RangeRequest{Key: []byte("k/a")}).withToken(bogusUser).refused(),
		unaryStep("/etcdserverpb.Auth/UserList", "not permitted to alice", &pb.AuthUserListRequest{}).withToken("alice").refused(),
		unaryStep("/etcdserverpb.Auth/UserGet", "root, as root", &pb.AuthUserGetRequest{Name: "root"}),
		unaryStep("/etcdserverpb.Auth/RoleList", "as root", &pb.AuthRoleListRequest{}),
		statusStep("as alice").withToken("alice"),
		unaryStep("/etcdserverpb.Maintenance/Defragment", "not permitted to alice", &pb.DefragmentRequest{}).withToken("alice").refused(),
		unaryStep("/etcdserverpb.Auth/UserRevokeRole", "alice loses reader", &pb.AuthUserRevokeRoleRequest{Name: "alice", Role: "reader"}),
		unaryStep("/etcdserverpb.KV/Range", "no longer permitted to alice", &pb.RangeRequest{Key: []byte("k/a")}).withToken("alice").refused(),
		unaryStep("/etcdserverpb.Auth/AuthDisable", "without a token", &pb.AuthDisableRequest{}).withToken(noToken).refused(),
		unaryStep("/etcdserverpb.Auth/AuthDisable", "not permitted to alice", &pb.AuthDisableRequest{}).withToken("alice").refused(),
		unaryStepFn("/etcdserverpb.Auth/AuthDisable", "as root", func(*testing.T, *twinSide) proto.Message {
			return &pb.AuthDisableRequest{}
		}, func(_ *testing.T, s *twinSide, _ proto.Message) {
			s.session = ""
		}),
		unaryStep("/etcdserverpb.Auth/AuthStatus", "disabled again", &pb.AuthStatusRequest{}),
		unaryStep("/etcdserverpb.Auth/AuthDisable", "disabled already", &pb.AuthDisableRequest{}),
		unaryStep("/etcdserverpb.KV/Put", "with a token from before AuthDisable", &pb.PutRequest{Key: []byte("k/a"), Value: []byte("4")}).withToken("alice"),
	)

	// The final state, read in the ways the API offers.
	add(
		unaryStep("/etcdserverpb.KV/Range", "everything", &pb.RangeRequest{Key: []byte{0}, RangeEnd: []byte{0}}),
		unaryStep("/etcdserverpb.Maintenance/HashKV", "final", &pb.HashKVRequest{}),
		snapshotStep(),
		statusStep("final"),
	)
	return steps
}

// threeMemberSteps run on twin three-member clusters whose member 0 leads; A's member 0 is reached directly, and
// B's proxy has B's member 0 as its only upstream, so both calls reach the leader.
func threeMemberSteps() []diffStep {
	return []diffStep{
		unaryStep("/etcdserverpb.Maintenance/MoveLeader", "member that does not exist", &pb.MoveLeaderRequest{TargetID: memberMissing}).refused(),
		unaryStepFn("/etcdserverpb.Maintenance/MoveLeader", "to a follower", func(_ *testing.T, s *twinSide) proto.Message {
			return &pb.MoveLeaderRequest{TargetID: s.memberID(1)}
		}, nil),
		unaryStepFn("/etcdserverpb.Maintenance/MoveLeader", "sent to a follower", func(_ *testing.T, s *twinSide) proto.Message {
			return &pb.MoveLeaderRequest{TargetID: s.memberID(2)}
		}, nil).refused(),
	}
}

// --- Steps -------------------------------------------------------------------------------------------------------

// diffStep is one request, or one scripted stream, run on each twin.
type diffStep struct {
	rpc  string // the full method name of the RPC the step exercises
	name string
	// as names whose token the step carries: "" the side's session (none before Authenticate), noToken none,
	// bogusUser a made-up one, or a user authenticated earlier.
	as string
	// wantErr says etcd must refuse the step, so that an error case that stopped being one shows up.
	wantErr bool
	// run returns what the client received, in order, and the status the call ended with.
	run func(ctx context.Context, t *testing.T, s *twinSide) ([]proto.Message, error)
}

func (st diffStep) withToken(user string) diffStep { st.as = user; return st }
func (st diffStep) refused() diffStep              { st.wantErr = true; return st }

// unaryStep is a unary step that sends req to both twins.
func unaryStep(rpc, name string, req proto.Message) diffStep {
	return unaryStepFn(rpc, name, func(*testing.T, *twinSide) proto.Message { return req }, nil)
}

// unaryStepFn is a unary step whose request may name what differs between the twins (a member id); then, if set,
// records what the answer names, for later steps, before the answer is normalized.
func unaryStepFn(rpc, name string, req func(*testing.T, *twinSide) proto.Message, then func(*testing.T, *twinSide, proto.Message)) diffStep {
	return diffStep{rpc: rpc, name: name, run: func(ctx context.Context, t *testing.T, s *twinSide) ([]proto.Message, error) {
		resp, err := s.invoke(ctx, t, rpc, req(t, s))
		if err != nil {
			return nil, err
		}
		if then != nil {
			then(t, s, resp)
		}
		return []proto.Message{resp}, nil
	}}
}

// authenticateStep opens a session for user on each twin; later steps carry its token. Tokens differ between the twins.
func authenticateStep(user, password string) diffStep {
	return unaryStepFn("/etcdserverpb.Auth/Authenticate", user, func(*testing.T, *twinSide) proto.Message {
		return &pb.AuthenticateRequest{Name: user, Password: password}
	}, func(t *testing.T, s *twinSide, resp proto.Message) {
		r := resp.(*pb.AuthenticateResponse)
		if r.Token == "" {
			t.Errorf("Authenticate %s on %s: empty token", user, s.name)
		}
		s.tokens[user] = r.Token
		if s.session == "" {
			s.session = user
		}
		r.Token = "(token)"
	})
}

// rangeStreamStep is a RangeStream step: every message of the stream, then its status.
func rangeStreamStep(name string, req *pb.RangeRequest) diffStep {
	return diffStep{rpc: "/etcdserverpb.KV/RangeStream", name: name, run: func(ctx context.Context, t *testing.T, s *twinSide) ([]proto.Message, error) {
		stream, err := pb.NewKVClient(s.cc).RangeStream(ctx, req)
		if err != nil {
			return nil, err
		}
		var out []proto.Message
		for {
			resp, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				return out, nil
			}
			if err != nil {
				return out, err
			}
			out = append(out, resp)
		}
	}}
}

// watchStep scripts one watch stream: three watchers (one with prev_kv, one filtering puts out, one from a
// compacted revision, which etcd cancels), a put and a delete they see, a progress request, and cancels.
func watchStep() diffStep {
	return diffStep{rpc: "/etcdserverpb.Watch/Watch", name: "create, events, progress, cancel", run: func(ctx context.Context, t *testing.T, s *twinSide) ([]proto.Message, error) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel() // ends the stream: etcd keeps a watch stream open after the client's half-close
		ws, err := pb.NewWatchClient(s.cc).Watch(ctx)
		if err != nil {
			return nil, err
		}
		var out []proto.Message
		// recv receives n responses. Watchers of one stream that fire on the same revision are served in no fixed
		// order, so the n responses are ordered by watch id (stably: one watcher's responses keep their order).
		recv := func(n int) error {
			var got []*pb.WatchResponse
			for range n {
				resp, err := ws.Recv()
				if err != nil {
					return err
				}
				got = append(got, resp)
			}
			sort.SliceStable(got, func(i, j int) bool { return got[i].WatchId < got[j].WatchId })
			for _, resp := range got {
				out = append(out, resp)
			}
			return nil
		}
		create := func(r *pb.WatchCreateRequest) error {
			return ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: r}})
		}
		cancelWatch := func(id int64) error {
			return ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CancelRequest{CancelRequest: &pb.WatchCancelRequest{WatchId: id}}})
		}
		kv := pb.NewKVClient(s.cc)
		script := []func() error{
			func() error {
				return create(&pb.WatchCreateRequest{Key: []byte("w/"), RangeEnd: keyPrefixEnd("w/"), PrevKv: true})
			},
			func() error { return recv(1) },
			func() error {
				return create(&pb.WatchCreateRequest{Key: []byte("w/"), RangeEnd: keyPrefixEnd("w/"),
					Filters: []pb.WatchCreateRequest_FilterType{pb.WatchCreateRequest_NOPUT}})
			},
			func() error { return recv(1) },
			func() error { return create(&pb.WatchCreateRequest{Key: []byte("k/a"), StartRevision: 2}) },
			func() error { return recv(2) }, // created, then canceled: revision 2 is compacted
			// etcd keeps a compacted watcher in its stream until the client cancels it, and answers no progress
			// request while the stream has it.
			func() error { return cancelWatch(2) },
			func() error { return recv(1) },
			func() error {
				resp, err := kv.Put(ctx, &pb.PutRequest{Key: []byte("w/1"), Value: []byte("a")})
				if err == nil {
					out = append(out, resp)
				}
				return err
			},
			func() error { return recv(1) },
			func() error {
				resp, err := kv.DeleteRange(ctx, &pb.DeleteRangeRequest{Key: []byte("w/1")})
				if err == nil {
					out = append(out, resp)
				}
				return err
			},
			func() error { return recv(2) },
			func() error {
				return ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_ProgressRequest{ProgressRequest: &pb.WatchProgressRequest{}}})
			},
			func() error { return recv(1) },
			func() error { return cancelWatch(0) },
			func() error { return recv(1) },
		}
		for _, f := range script {
			if err := f(); err != nil {
				return out, err
			}
		}
		return out, nil
	}}
}

// keepAliveStep scripts one keepalive stream: a lease that exists, one that does not (TTL 0), a half-close.
func keepAliveStep() diffStep {
	return diffStep{rpc: "/etcdserverpb.Lease/LeaseKeepAlive", name: "renew, unknown lease, half-close", run: func(ctx context.Context, t *testing.T, s *twinSide) ([]proto.Message, error) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		ka, err := pb.NewLeaseClient(s.cc).LeaseKeepAlive(ctx)
		if err != nil {
			return nil, err
		}
		var out []proto.Message
		for _, id := range []int64{leaseKeys, leaseMissing} {
			if err := ka.Send(&pb.LeaseKeepAliveRequest{ID: id}); err != nil {
				return out, err
			}
			resp, err := ka.Recv()
			if err != nil {
				return out, err
			}
			out = append(out, resp)
		}
		if err := ka.CloseSend(); err != nil {
			return out, err
		}
		// etcd ends the stream when the client half-closes it.
		resp, err := ka.Recv()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err == nil {
			out = append(out, resp)
		}
		return out, err
	}}
}

// observeStep observes the election: the current leader, a proclamation, and the change it makes.
func observeStep() diffStep {
	return diffStep{rpc: "/v3electionpb.Election/Observe", name: "leader, proclaim, new value", run: func(ctx context.Context, t *testing.T, s *twinSide) ([]proto.Message, error) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel() // Observe never ends by itself
		ob, err := v3electionpb.NewElectionClient(s.cc).Observe(ctx, &v3electionpb.LeaderRequest{Name: []byte("e1")})
		if err != nil {
			return nil, err
		}
		var out []proto.Message
		first, err := ob.Recv()
		if err != nil {
			return out, err
		}
		out = append(out, first)
		resp, err := s.invoke(ctx, t, "/v3electionpb.Election/Proclaim", &v3electionpb.ProclaimRequest{Leader: s.leader, Value: []byte("v2")})
		if err != nil {
			return out, err
		}
		out = append(out, resp)
		second, err := ob.Recv()
		if err != nil {
			return out, err
		}
		return append(out, second), nil
	}}
}

// hashStep compares Hash within each cluster: the hash covers the whole backend, members bucket included, so it
// differs between the twins; the proxy's answer must equal the member's own.
func hashStep() diffStep {
	return diffStep{rpc: "/etcdserverpb.Maintenance/Hash", name: "equal to the member's own answer", run: func(ctx context.Context, t *testing.T, s *twinSide) ([]proto.Message, error) {
		resp, err := s.invoke(ctx, t, "/etcdserverpb.Maintenance/Hash", &pb.HashRequest{})
		if err != nil {
			return nil, err
		}
		h := resp.(*pb.HashResponse)
		own, err := pb.NewMaintenanceClient(s.env.Direct).Hash(ctx, &pb.HashRequest{})
		if err != nil {
			t.Errorf("Hash on %s, from the member itself: %v", s.name, err)
		} else if own.Hash != h.Hash || own.Header.Revision != h.Header.Revision {
			t.Errorf("Hash on %s: %d at revision %d, the member itself answers %d at revision %d",
				s.name, h.Hash, h.Header.Revision, own.Hash, own.Header.Revision)
		}
		if h.Hash == 0 {
			t.Errorf("Hash on %s: zero", s.name)
		}
		h.Hash = 0
		return []proto.Message{h}, nil
	}}
}

// statusStep compares Status within each cluster, then across the twins without the size of the backend's file:
// that depends on when the backend committed its write batches (every 100 ms), not on the requests.
func statusStep(name string) diffStep {
	return diffStep{rpc: "/etcdserverpb.Maintenance/Status", name: name, run: func(ctx context.Context, t *testing.T, s *twinSide) ([]proto.Message, error) {
		// A member applies an entry a moment after it is in its log: read once the applied index has caught up
		// (within 1 s), so that the twins, and the proxy and the member, are compared at rest.
		var st, own *pb.StatusResponse
		var err error
		for deadline := time.Now().Add(time.Second); ; time.Sleep(10 * time.Millisecond) {
			var resp proto.Message
			if resp, err = s.invoke(ctx, t, "/etcdserverpb.Maintenance/Status", &pb.StatusRequest{}); err != nil {
				return nil, err
			}
			st = resp.(*pb.StatusResponse)
			own, err = pb.NewMaintenanceClient(s.env.Direct).Status(ctx, &pb.StatusRequest{})
			if err != nil || (st.RaftAppliedIndex == st.RaftIndex && own.RaftAppliedIndex == own.RaftIndex) ||
				time.Now().After(deadline) {
				break
			}
		}
		if err != nil {
			t.Errorf("Status on %s, from the member itself: %v", s.name, err)
		} else if !proto.Equal(own, st) {
			t.Errorf("Status on %s differs from the member's own answer (-member +%s):\n%s", s.name, s.name,
				cmp.Diff(own, st, protocmp.Transform()))
		}
		if st.DbSize == 0 || st.DbSizeInUse == 0 {
			t.Errorf("Status on %s: db size %d, in use %d", s.name, st.DbSize, st.DbSizeInUse)
		}
		st.DbSize, st.DbSizeInUse = 0, 0
		return []proto.Message{st}, nil
	}}
}

// snapshotStep receives a snapshot, checks the sha256 trailer etcd appends to it, and answers with the storage
// version it carries and the content of the backend's key and lease buckets (each as a RangeResponse whose Kvs are
// the raw bucket entries): the bytes of two snapshots differ even for the same member.
func snapshotStep() diffStep {
	return diffStep{rpc: "/etcdserverpb.Maintenance/Snapshot", name: "key and lease buckets", run: func(ctx context.Context, t *testing.T, s *twinSide) ([]proto.Message, error) {
		stream, err := pb.NewMaintenanceClient(s.cc).Snapshot(ctx, &pb.SnapshotRequest{})
		if err != nil {
			return nil, err
		}
		var msgs []*pb.SnapshotResponse
		var blob []byte
		for {
			resp, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return nil, err
			}
			msgs = append(msgs, resp)
			blob = append(blob, resp.Blob...)
		}
		if len(msgs) < 2 || len(msgs[len(msgs)-1].Blob) != sha256.Size {
			t.Errorf("Snapshot on %s: %d messages, the last not a sha256 trailer", s.name, len(msgs))
			return nil, nil
		}
		data, sum := blob[:len(blob)-sha256.Size], blob[len(blob)-sha256.Size:]
		if got := sha256.Sum256(data); !bytes.Equal(got[:], sum) {
			t.Errorf("Snapshot on %s: the sha256 trailer does not match the %d bytes before it", s.name, len(data))
		}
		sent := 0
		for _, m := range msgs[:len(msgs)-1] {
			sent += len(m.Blob)
			if m.RemainingBytes != uint64(len(data)-sent) {
				t.Errorf("Snapshot on %s: remaining_bytes %d after %d of %d bytes", s.name, m.RemainingBytes, sent, len(data))
			}
		}
		for _, m := range msgs {
			if m.Version != msgs[0].Version {
				t.Errorf("Snapshot on %s: storage version %q, then %q", s.name, msgs[0].Version, m.Version)
			}
		}
		out := []proto.Message{&pb.SnapshotResponse{Version: msgs[0].Version}}
		return append(out, boltBuckets(t, data, "key", "lease")...), nil
	}}
}

// boltBuckets opens a snapshot with bbolt and returns the entries of each bucket as a RangeResponse.
func boltBuckets(t *testing.T, data []byte, buckets ...string) []proto.Message {
	t.Helper()
	path := filepath.Join(t.TempDir(), "snapshot.db")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatalf("snapshot is not a bbolt database: %v", err)
	}
	defer db.Close()
	var out []proto.Message
	err = db.View(func(tx *bolt.Tx) error {
		for _, name := range buckets {
			b := tx.Bucket([]byte(name))
			if b == nil {
				return fmt.Errorf("no bucket %q", name)
			}
			r := &pb.RangeResponse{}
			if err := b.ForEach(func(k, v []byte) error {
				r.Kvs = append(r.Kvs, &mvccpb.KeyValue{Key: bytes.Clone(k), Value: bytes.Clone(v)})
				return nil
			}); err != nil {
				return err
			}
			r.Count = int64(len(r.Kvs))
			out = append(out, r)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("reading the snapshot: %v", err)
	}
	return out
}

func txnPut(k, v string) *pb.RequestOp {
	return &pb.RequestOp{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: []byte(k), Value: []byte(v)}}}
}

func txnRange(k, end string) *pb.RequestOp {
	return &pb.RequestOp{Request: &pb.RequestOp_RequestRange{RequestRange: &pb.RangeRequest{Key: []byte(k), RangeEnd: []byte(end)}}}
}

func txnDelete(k, end string) *pb.RequestOp {
	return &pb.RequestOp{Request: &pb.RequestOp_RequestDeleteRange{RequestDeleteRange: &pb.DeleteRangeRequest{Key: []byte(k), RangeEnd: []byte(end), PrevKv: true}}}
}

func tooManyOps() *pb.TxnRequest {
	r := &pb.TxnRequest{}
	for i := 0; i < 129; i++ { // etcd's default --max-txn-ops is 128
		r.Success = append(r.Success, txnRange(fmt.Sprint(i), ""))
	}
	return r
}

func keyPrefixEnd(p string) []byte { return []byte(clientv3.GetPrefixRangeEnd(p)) }

// --- Twins -------------------------------------------------------------------------------------------------------

// twinSide is one twin: cluster A reached directly ("etcd"), or cluster B reached through its proxy ("proxy").
type twinSide struct {
	name  string
	env   *proxytest.Env
	cc    *grpc.ClientConn
	calls *callLog

	// What differs between the twins by construction, and the names it is normalized to.
	clusterID uint64
	canonIDs  map[uint64]uint64 // member id -> 1, 2, 3 for the members started with the cluster, 101... for added ones
	canonURLs map[string]string

	// What steps record for later steps.
	addedIDs                []uint64 // members added, in order
	tokens                  map[string]string
	session                 string // the user whose token steps carry by default
	leader                  *v3electionpb.LeaderKey
	lockKey                 []byte
	learnerPeer, learnerURL string // where the learner the Cluster steps start listens
	learner                 *embed.Etcd
}

// startTwins starts two identical clusters, each with a proxy whose only upstream is member 0, and returns A reached
// directly at member 0 and B reached through its proxy.
func startTwins(t *testing.T, members int) (a, b *twinSide) {
	t.Helper()
	envs := make([]*proxytest.Env, 2)
	for i := range envs {
		var m0 string
		envs[i] = proxytest.Start(t, proxytest.Options{
			Members: members,
			Configure: func(c *embed.Config) {
				twinConfig(c)
				if c.Name == "m0" {
					m0 = c.AdvertiseClientUrls[0].String()
				}
			},
			Proxy: func(c *proxy.Config) {
				// Member-specific RPCs (Status, Hash, Alarm, MoveLeader...) must reach the member the direct side
				// talks to, not whichever member the upstream balancer picks.
				up, err := proxy.Dial(clientv3.Config{Endpoints: []string{m0}, DialTimeout: 5 * time.Second})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { up.Close() })
				c.Upstream = up
				// The read cache reads etcd's auth revision once a second, and AuthStatus goes through raft: one
				// entry a second, which Status (raft index) and Hash (consistent index) would show. The twins
				// must stay entry for entry identical, so the poll is off here (it is tested in kvcache).
				c.Overrides.KVCache.AuthPoll = -1
			},
		})
	}
	a = newTwinSide(t, "etcd", envs[0], envs[0].Cluster.Members[0].ClientURL)
	b = newTwinSide(t, "proxy", envs[1], envs[1].ProxyAddr)
	return a, b
}

// twinConfig is the configuration both twins share beyond embedetcd's.
func twinConfig(c *embed.Config) {
	c.BcryptCost = 4 // bcrypt.MinCost: the Auth steps hash passwords under -race
	// Without the strict check, etcd refuses to remove a member connected for less than 5 s (the promoted learner).
	c.StrictReconfigCheck = false
}

func newTwinSide(t *testing.T, name string, env *proxytest.Env, target string) *twinSide {
	t.Helper()
	s := &twinSide{
		name:      name,
		env:       env,
		calls:     &callLog{},
		canonIDs:  map[uint64]uint64{},
		canonURLs: map[string]string{},
		tokens:    map[string]string{bogusUser: "bogus.1"},
	}
	s.cc = dialLogged(t, target, s.calls)
	for i, m := range env.Cluster.Members {
		srv := m.Etcd().Server
		s.canonIDs[uint64(srv.MemberID())] = uint64(i + 1)
		s.canonURLs[m.PeerURL] = "http://" + m.Name + ".peer"
		s.canonURLs[m.ClientURL] = "http://" + m.Name + ".client"
		s.clusterID = uint64(srv.Cluster().ID())
	}
	ports, err := embedetcd.FreePorts(2)
	if err != nil {
		t.Fatal(err)
	}
	s.learnerPeer, s.learnerURL = fmt.Sprintf("http://127.0.0.1:%d", ports[0]), fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	s.canonURLs[s.learnerPeer] = "http://" + learnerName + ".peer"
	s.canonURLs[s.learnerURL] = "http://" + learnerName + ".client"
	return s
}

// memberID is the id of the i-th member the cluster started with.
func (s *twinSide) memberID(i int) uint64 {
	return uint64(s.env.Cluster.Members[i].Etcd().Server.MemberID())
}

// added records a member MemberAdd added.
func (s *twinSide) added(id uint64) {
	s.addedIDs = append(s.addedIDs, id)
	s.canonIDs[id] = uint64(100 + len(s.addedIDs))
}

// startLearner starts the member the last MemberAdd added, which must have been s.learnerPeer.
func (s *twinSide) startLearner(t *testing.T) {
	t.Helper()
	m0 := s.env.Cluster.Members[0]
	cfg := embed.NewConfig()
	cfg.Name = learnerName
	cfg.Dir = filepath.Join(t.TempDir(), learnerName+".etcd")
	pu, cu := mustParseURL(t, s.learnerPeer), mustParseURL(t, s.learnerURL)
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
	cfg.InitialCluster = m0.Name + "=" + m0.PeerURL + "," + learnerName + "=" + s.learnerPeer
	cfg.InitialClusterToken = "etcdproxy" // embedetcd's
	cfg.ClusterState = embed.ClusterStateFlagExisting
	cfg.LogLevel = "fatal"
	twinConfig(cfg)
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		t.Fatalf("starting the learner of %s: %v", s.name, err)
	}
	t.Cleanup(e.Close)
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		t.Fatalf("learner of %s: %v", s.name, err)
	case <-time.After(30 * time.Second):
		t.Fatalf("learner of %s: not ready within 30s", s.name)
	}
	s.learner = e
}

// waitLearnerInSync polls until the learner has applied everything the leader has committed, so that etcd lets it
// be promoted.
func (s *twinSide) waitLearnerInSync(t *testing.T) {
	t.Helper()
	leader := s.env.Cluster.Members[0].Etcd().Server
	proxytest.Eventually(t, 10*time.Second, func() bool { return s.learner.Server.AppliedIndex() >= leader.CommittedIndex() },
		"the learner of %s did not catch up with the leader", s.name)
}

// makeLeader moves the leadership of s's cluster to member i (setup, not compared) and waits until i leads.
func (s *twinSide) makeLeader(t *testing.T, i int) {
	t.Helper()
	target := s.memberID(i)
	ms := s.env.Cluster.Members
	proxytest.Eventually(t, 10*time.Second, func() bool { return ms[i].Etcd().Server.Lead() != 0 }, "no leader in %s's cluster", s.name)
	lead := ms[i].Etcd().Server.Lead()
	if lead != target {
		for _, m := range ms {
			if uint64(m.Etcd().Server.MemberID()) != lead {
				continue
			}
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			err := m.Etcd().Server.MoveLeader(ctx, lead, target)
			cancel()
			if err != nil {
				t.Fatalf("moving the leadership of %s's cluster to m%d: %v", s.name, i, err)
			}
		}
	}
	proxytest.Eventually(t, 10*time.Second, func() bool {
		for _, m := range ms {
			if m.Etcd().Server.Lead() != target {
				return false
			}
		}
		return true
	}, "m%d of %s's cluster did not become the leader of every member", i, s.name)
}

// token returns the token a step made as user carries ("" for none).
func (s *twinSide) token(t *testing.T, as string) string {
	t.Helper()
	switch as {
	case noToken:
		return ""
	case "":
		as = s.session
		if as == "" {
			return ""
		}
	}
	tok, ok := s.tokens[as]
	if !ok {
		t.Fatalf("no token for %q on %s: authenticate first", as, s.name)
	}
	return tok
}

// invoke calls a unary rpc, checking req against the API's descriptor; the response type comes from it too.
func (s *twinSide) invoke(ctx context.Context, t *testing.T, rpc string, req proto.Message) (proto.Message, error) {
	t.Helper()
	md := apiMethods()[rpc]
	if md == nil || md.IsStreamingClient() || md.IsStreamingServer() {
		t.Fatalf("%s is not a unary RPC of etcd's API", rpc)
	}
	if got := req.ProtoReflect().Descriptor().FullName(); got != md.Input().FullName() {
		t.Fatalf("%s takes %s, not %s", rpc, md.Input().FullName(), got)
	}
	mt, err := protoregistry.GlobalTypes.FindMessageByName(md.Output().FullName())
	if err != nil {
		t.Fatalf("%s: %v", rpc, err)
	}
	resp := mt.New().Interface()
	if err := s.cc.Invoke(ctx, rpc, req, resp); err != nil {
		return nil, err
	}
	return resp, nil
}

// do runs st on s and returns its normalized outcome.
func (s *twinSide) do(t *testing.T, st diffStep) diffOutcome {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), diffStepTimeout)
	defer cancel()
	if tok := s.token(t, st.as); tok != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "token", tok)
	}
	s.calls.take()
	msgs, err := st.run(ctx, t, s)
	if called := s.calls.take(); !slices.Contains(called, st.rpc) {
		t.Errorf("%s (%s) on %s: the step never called %s, only %v", st.rpc, st.name, s.name, st.rpc, called)
	}
	for _, m := range msgs {
		s.normalize(m)
	}
	return diffOutcome{msgs: msgs, err: err}
}

// normalize rewrites in place what differs between the twins by construction: cluster and member ids and member
// URLs; it orders what etcd lists in no fixed order, or in the order of member ids.
func (s *twinSide) normalize(m proto.Message) {
	proxytest.WalkMessages(m.ProtoReflect(), func(m protoreflect.Message) {
		switch m := m.Interface().(type) {
		case *pb.ResponseHeader:
			if m.ClusterId == s.clusterID {
				m.ClusterId = canonCluster
			}
			m.MemberId = s.canonID(m.MemberId)
		case *pb.Member:
			m.ID = s.canonID(m.ID)
			m.PeerURLs = s.canonURLList(m.PeerURLs)
			m.ClientURLs = s.canonURLList(m.ClientURLs)
		case *pb.AlarmMember:
			m.MemberID = s.canonID(m.MemberID)
		case *pb.StatusResponse:
			m.Leader = s.canonID(m.Leader)
		case *pb.MemberListResponse:
			sortMembers(m.Members)
		case *pb.MemberAddResponse:
			sortMembers(m.Members)
		case *pb.MemberRemoveResponse:
			sortMembers(m.Members)
		case *pb.MemberUpdateResponse:
			sortMembers(m.Members)
		case *pb.MemberPromoteResponse:
			sortMembers(m.Members)
		case *pb.LeaseLeasesResponse:
			sort.Slice(m.Leases, func(i, j int) bool { return m.Leases[i].ID < m.Leases[j].ID })
		case *pb.LeaseTimeToLiveResponse:
			sort.Slice(m.Keys, func(i, j int) bool { return bytes.Compare(m.Keys[i], m.Keys[j]) < 0 })
		}
	})
}

func (s *twinSide) canonID(id uint64) uint64 {
	if c, ok := s.canonIDs[id]; ok {
		return c
	}
	return id
}

func (s *twinSide) canonURLList(urls []string) []string {
	out := make([]string, len(urls))
	for i, u := range urls {
		out[i] = u
		if c, ok := s.canonURLs[u]; ok {
			out[i] = c
		}
	}
	return out
}

func sortMembers(ms []*pb.Member) {
	sort.Slice(ms, func(i, j int) bool { return ms[i].ID < ms[j].ID })
}

// --- Comparison --------------------------------------------------------------------------------------------------

// diffOutcome is what a client received in one step: its messages, in order, and the status the call ended with.
type diffOutcome struct {
	msgs []proto.Message
	err  error
}

// runTwins runs every step on both twins, in order, and compares the outcomes.
func runTwins(t *testing.T, exercised map[string]bool, a, b *twinSide, steps []diffStep) {
	t.Helper()
	for i, st := range steps {
		what := fmt.Sprintf("step %d, %s (%s)", i, st.rpc, st.name)
		oa, ob := a.do(t, st), b.do(t, st)
		exercised[st.rpc] = true
		if st.wantErr != (oa.err != nil) {
			t.Errorf("%s: etcd answered error %v after %d messages %v; the step expects an error: %v",
				what, oa.err, len(oa.msgs), oa.msgs, st.wantErr)
		}
		compareOutcomes(t, what, oa, ob)
	}
}

// compareOutcomes fails unless both outcomes carry the same gRPC code and message and equal messages.
func compareOutcomes(t *testing.T, what string, a, b diffOutcome) {
	t.Helper()
	sa, sb := status.Convert(a.err), status.Convert(b.err)
	if sa.Code() != sb.Code() || sa.Message() != sb.Message() {
		t.Errorf("%s:\n  etcd answered  %v %q\n  proxy answered %v %q", what, sa.Code(), sa.Message(), sb.Code(), sb.Message())
	}
	if len(a.msgs) != len(b.msgs) {
		t.Errorf("%s: etcd sent %d messages, the proxy %d (-etcd +proxy):\n%s", what, len(a.msgs), len(b.msgs),
			cmp.Diff(a.msgs, b.msgs, protocmp.Transform()))
		return
	}
	for i := range a.msgs {
		reconcileTTL(a.msgs[i], b.msgs[i])
		if !proto.Equal(a.msgs[i], b.msgs[i]) {
			t.Errorf("%s: message %d differs (-etcd +proxy):\n%s", what, i, cmp.Diff(a.msgs[i], b.msgs[i], protocmp.Transform()))
		}
	}
}

// reconcileTTL lets the remaining TTL of a lease differ by a second: it counts down in real time, and the twins'
// answers may straddle a second.
func reconcileTTL(a, b proto.Message) {
	x, ok := a.(*pb.LeaseTimeToLiveResponse)
	y, ok2 := b.(*pb.LeaseTimeToLiveResponse)
	if ok && ok2 && x.TTL-y.TTL >= -1 && x.TTL-y.TTL <= 1 {
		y.TTL = x.TTL
	}
}

// apiMethods are the RPCs of etcd's API, by full method name.
var apiMethods = sync.OnceValue(func() map[string]protoreflect.MethodDescriptor {
	out := map[string]protoreflect.MethodDescriptor{}
	for _, r := range etcdapi.Roots() {
		services := r.File.Services()
		for i := 0; i < services.Len(); i++ {
			sd := services.Get(i)
			for j := 0; j < sd.Methods().Len(); j++ {
				md := sd.Methods().Get(j)
				out["/"+string(sd.FullName())+"/"+string(md.Name())] = md
			}
		}
	}
	return out
})

// --- Plumbing ----------------------------------------------------------------------------------------------------

// callLog records the methods a connection calls, so that a step is known to exercise the RPC it names.
type callLog struct {
	mu      sync.Mutex // mu protects methods
	methods []string
}

func (l *callLog) add(method string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.methods = append(l.methods, method)
}

// take returns the methods called since the last take.
func (l *callLog) take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	m := l.methods
	l.methods = nil
	return m
}

func (l *callLog) unary(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	l.add(method)
	return invoker(ctx, method, req, reply, cc, opts...)
}

func (l *callLog) stream(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	l.add(method)
	return streamer(ctx, desc, cc, method, opts...)
}

// dialLogged dials target with plain gRPC, recording the methods called in log.
func dialLogged(t *testing.T, target string, log *callLog) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient(strings.TrimPrefix(target, "http://"),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30), grpc.MaxCallSendMsgSize(1<<30)),
		grpc.WithChainUnaryInterceptor(log.unary),
		grpc.WithChainStreamInterceptor(log.stream))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

func mustParseURL(t *testing.T, s string) url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return *u
}
