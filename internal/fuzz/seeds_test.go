package fuzz_test

import (
	"bytes"
	"encoding/binary"
	"flag"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.etcd.io/etcd/api/v3/authpb"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3lock/v3lockpb"
	"google.golang.org/protobuf/proto"
)

var update = flag.Bool("update", false, "rewrite the seed corpus in testdata/fuzz from the tables of seeds_test.go")

// seed is one file of a target's seed corpus: its name and the fuzz function's arguments.
type seed struct {
	name   string
	values []any
}

// TestSeedCorpus: testdata/fuzz holds the seeds of the tables below as they are (refresh them with
// `go test ./internal/fuzz -run TestSeedCorpus -update`), and FuzzUnary's seeds call every RPC it fuzzes. Files
// that are not in the tables (inputs a fuzzing run found, kept as regression seeds) are left alone.
func TestSeedCorpus(t *testing.T) {
	unary, covered := unarySeeds(t)
	for _, md := range fuzzedMethods() {
		if !covered[fullName(md)] {
			t.Errorf("FuzzUnary has no seed for %s: add one to unarySeeds", fullName(md))
		}
	}
	for target, seeds := range map[string][]seed{"FuzzUnary": unary, "FuzzWatch": watchSeeds(),
		"FuzzLeaseKeepAlive": keepAliveSeeds()} {
		dir := filepath.Join("testdata", "fuzz", target)
		for _, s := range seeds {
			path, want := filepath.Join(dir, s.name), corpusFile(s.values...)
			if *update {
				if err := os.MkdirAll(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, want, 0o644); err != nil {
					t.Fatal(err)
				}
				continue
			}
			if got, err := os.ReadFile(path); err != nil || !bytes.Equal(got, want) {
				t.Errorf("%s is missing or stale: go test ./internal/fuzz -run TestSeedCorpus -update", path)
			}
		}
	}
}

// corpusFile encodes a corpus entry as `go test` reads it ("go test fuzz v1", then one Go literal a line).
func corpusFile(values ...any) []byte {
	var b strings.Builder
	b.WriteString("go test fuzz v1\n")
	for _, v := range values {
		switch v := v.(type) {
		case byte:
			fmt.Fprintf(&b, "byte(%q)\n", v)
		case []byte:
			fmt.Fprintf(&b, "[]byte(%q)\n", v)
		default:
			panic(fmt.Sprintf("no corpus encoding for %T", v))
		}
	}
	return []byte(b.String())
}

// unarySeeds are FuzzUnary's seeds: at least one request of every RPC it fuzzes. They run in the order of their
// names, on the same twins, so later seeds see what earlier ones wrote (the Lock seeds use a lease that a Lease seed
// granted; one Lock seed waits for a lock that another holds). It returns the RPCs they call.
func unarySeeds(t *testing.T) ([]seed, map[string]bool) {
	index := map[string]byte{}
	for i, md := range fuzzedMethods() {
		index[fullName(md)] = byte(i)
	}
	covered := map[string]bool{}
	var seeds []seed
	for _, s := range unaryRequests() {
		i, ok := index[s.rpc]
		if !ok {
			t.Fatalf("seed %s: %s is not fuzzed", s.name, s.rpc)
		}
		wire, ok := s.req.([]byte)
		if !ok {
			var err error
			if wire, err = proto.Marshal(s.req.(proto.Message)); err != nil {
				t.Fatal(err)
			}
		}
		seeds = append(seeds, seed{name: shortName(s.rpc) + "-" + s.name, values: []any{i, wire}})
		covered[s.rpc] = true
	}
	return seeds, covered
}

// shortName is Service.Method for /package.Service/Method.
func shortName(rpc string) string {
	svc, method, _ := strings.Cut(strings.TrimPrefix(rpc, "/"), "/")
	return svc[strings.LastIndex(svc, ".")+1:] + "." + method
}

type unarySeed struct {
	rpc, name string
	req       any // a request, or the bytes to send
}

func unaryRequests() []unarySeed {
	const kv, lease, maint, auth = "/etcdserverpb.KV/", "/etcdserverpb.Lease/", "/etcdserverpb.Maintenance/", "/etcdserverpb.Auth/"
	const election, lock = "/v3electionpb.Election/", "/v3lockpb.Lock/"
	all := []byte{0}
	return []unarySeed{
		{auth + "AuthDisable", "off", &pb.AuthDisableRequest{}},
		{auth + "AuthStatus", "off", &pb.AuthStatusRequest{}},
		{auth + "Authenticate", "off", &pb.AuthenticateRequest{Name: "u", Password: "p"}},
		{auth + "RoleAdd", "r", &pb.AuthRoleAddRequest{Name: "r"}},
		{auth + "RoleAdd", "empty", &pb.AuthRoleAddRequest{}},
		{auth + "RoleDelete", "missing", &pb.AuthRoleDeleteRequest{Role: "nobody"}},
		{auth + "RoleGet", "r", &pb.AuthRoleGetRequest{Role: "r"}},
		{auth + "RoleGrantPermission", "r", &pb.AuthRoleGrantPermissionRequest{Name: "r",
			Perm: &authpb.Permission{PermType: authpb.READWRITE, Key: []byte("k/"), RangeEnd: []byte("k0")}}},
		{auth + "RoleList", "all", &pb.AuthRoleListRequest{}},
		{auth + "RoleRevokePermission", "r", &pb.AuthRoleRevokePermissionRequest{Role: "r", Key: []byte("k/"), RangeEnd: []byte("k0")}},
		{auth + "UserAdd", "u", &pb.AuthUserAddRequest{Name: "u", Password: "p"}},
		{auth + "UserAdd", "nopassword", &pb.AuthUserAddRequest{Name: "v", Options: &authpb.UserAddOptions{NoPassword: true}}},
		{auth + "UserChangePassword", "u", &pb.AuthUserChangePasswordRequest{Name: "u", Password: "q"}},
		{auth + "UserDelete", "missing", &pb.AuthUserDeleteRequest{Name: "nobody"}},
		{auth + "UserGet", "u", &pb.AuthUserGetRequest{Name: "u"}},
		{auth + "UserGrantRole", "u", &pb.AuthUserGrantRoleRequest{User: "u", Role: "r"}},
		{auth + "UserList", "all", &pb.AuthUserListRequest{}},
		{auth + "UserRevokeRole", "u", &pb.AuthUserRevokeRoleRequest{Name: "u", Role: "r"}},

		{"/etcdserverpb.Cluster/MemberList", "linearizable", &pb.MemberListRequest{Linearizable: true}},

		{election + "Campaign", "free", &v3electionpb.CampaignRequest{Name: []byte("e"), Value: []byte("v1")}},
		{election + "Campaign", "nolease", &v3electionpb.CampaignRequest{Name: []byte("e2"), Value: []byte("v"), Lease: 0x9999}},
		{election + "Leader", "e", &v3electionpb.LeaderRequest{Name: []byte("e")}},
		{election + "Leader", "none", &v3electionpb.LeaderRequest{Name: []byte("none")}},
		{election + "Observe", "e", &v3electionpb.LeaderRequest{Name: []byte("e")}},
		{election + "Proclaim", "e", &v3electionpb.ProclaimRequest{Value: []byte("v2"),
			Leader: &v3electionpb.LeaderKey{Name: []byte("e"), Key: []byte("e/7f00"), Rev: 2, Lease: fuzzLease}}},
		{election + "Resign", "e", &v3electionpb.ResignRequest{
			Leader: &v3electionpb.LeaderKey{Name: []byte("e"), Key: []byte("e/7f00"), Rev: 2, Lease: fuzzLease}}},

		{kv + "Compact", "future", &pb.CompactionRequest{Revision: 1 << 40}},
		{kv + "DeleteRange", "empty", &pb.DeleteRangeRequest{}},
		{kv + "DeleteRange", "prefix", &pb.DeleteRangeRequest{Key: []byte("k/"), RangeEnd: []byte("k0"), PrevKv: true}},
		{kv + "Put", "a", &pb.PutRequest{Key: []byte("k/a"), Value: []byte("1"), PrevKv: true}},
		{kv + "Put", "ignore-missing", &pb.PutRequest{Key: []byte("k/missing"), IgnoreValue: true}},
		{kv + "Put", "lease", &pb.PutRequest{Key: []byte("k/l"), Value: []byte("v"), Lease: fuzzLease}},
		{kv + "Range", "all", &pb.RangeRequest{Key: all, RangeEnd: all}},
		{kv + "Range", "future", &pb.RangeRequest{Key: []byte("k/a"), Revision: 1000}},
		{kv + "Range", "garbage", []byte("\xff\xff\xff")},
		{kv + "Range", "serializable", &pb.RangeRequest{Key: []byte("k/"), RangeEnd: []byte("k0"), Serializable: true}},
		{kv + "Range", "sorted", &pb.RangeRequest{Key: all, RangeEnd: all, Limit: 2, KeysOnly: true,
			SortOrder: pb.RangeRequest_DESCEND, SortTarget: pb.RangeRequest_VALUE}},
		{kv + "RangeStream", "all", &pb.RangeRequest{Key: all, RangeEnd: all}},
		{kv + "Txn", "compare", &pb.TxnRequest{
			Compare: []*pb.Compare{{Key: []byte("k/a"), Target: pb.Compare_VALUE, Result: pb.Compare_EQUAL,
				TargetUnion: &pb.Compare_Value{Value: []byte("1")}}},
			Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: []byte("k/b"), Value: []byte("2")}}}},
			Failure: []*pb.RequestOp{{Request: &pb.RequestOp_RequestRange{RequestRange: &pb.RangeRequest{Key: []byte("k/a")}}}},
		}},
		{kv + "Txn", "serializable-read", &pb.TxnRequest{Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestRange{
			RequestRange: &pb.RangeRequest{Key: []byte("k/"), RangeEnd: []byte("k0"), Serializable: true}}}}}},

		{lease + "LeaseGrant", "auto", &pb.LeaseGrantRequest{TTL: 10}},
		{lease + "LeaseGrant", "explicit", &pb.LeaseGrantRequest{ID: 0x7f01, TTL: 60}},
		{lease + "LeaseGrant", "too-long", &pb.LeaseGrantRequest{TTL: 9_000_000_001}},
		{lease + "LeaseLeases", "all", &pb.LeaseLeasesRequest{}},
		{lease + "LeaseRevoke", "fuzz", &pb.LeaseRevokeRequest{ID: fuzzLease}},
		{lease + "LeaseRevoke", "missing", &pb.LeaseRevokeRequest{ID: 0x9999}},
		{lease + "LeaseTimeToLive", "fuzz", &pb.LeaseTimeToLiveRequest{ID: fuzzLease, Keys: true}},
		{lease + "LeaseTimeToLive", "missing", &pb.LeaseTimeToLiveRequest{ID: 0x9999}},

		{lock + "Lock", "free", &v3lockpb.LockRequest{Name: []byte("l")}},
		{lock + "Lock", "held", &v3lockpb.LockRequest{Name: []byte("l"), Lease: 0x7f01}},
		{lock + "Unlock", "l", &v3lockpb.UnlockRequest{Key: []byte("l/7f00")}},

		{maint + "Alarm", "activate", &pb.AlarmRequest{Action: pb.AlarmRequest_ACTIVATE, Alarm: pb.AlarmType_NOSPACE}},
		{maint + "Alarm", "deactivate", &pb.AlarmRequest{Action: pb.AlarmRequest_DEACTIVATE, Alarm: pb.AlarmType_NOSPACE}},
		{maint + "Alarm", "get", &pb.AlarmRequest{Action: pb.AlarmRequest_GET}},
		{maint + "Downgrade", "cancel", &pb.DowngradeRequest{Action: pb.DowngradeRequest_CANCEL}},
		{maint + "Downgrade", "enable", &pb.DowngradeRequest{Action: pb.DowngradeRequest_ENABLE, Version: "3.6.0"}},
		{maint + "Downgrade", "validate", &pb.DowngradeRequest{Action: pb.DowngradeRequest_VALIDATE, Version: "3.6.0"}},
		{maint + "Hash", "all", &pb.HashRequest{}},
		{maint + "HashKV", "now", &pb.HashKVRequest{}},
		{maint + "HashKV", "future", &pb.HashKVRequest{Revision: 1000}},
		{maint + "Status", "member", &pb.StatusRequest{}},
	}
}

// The bytes of FuzzWatch's scripts (see watchRun.request): a request kind, then its choices.
const (
	wCreate, wCancel, wProgress, wEmpty = 0, 4, 6, 7
	// indexes of watchKeys, and kLiteral: the key follows (a length, its bytes)
	kNone, kZero, kA, kB, kBig, kBigEnd, kC, kCEnd, kD, kZZ, kFF, kLiteral = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
	// start revisions (watchRun.revision): rSmall is followed by one byte, rAny by eight
	rNow, rBeforeCompaction, rCompaction, rCurrent, rFuture, rNegative, rSmall, rAny = 0, 1, 2, 3, 4, 5, 6, 7
	// watch ids (watchRun.watchID): idSmall is followed by one byte, idLive by an index, idAny by eight bytes
	idAuto, idSmall, idMinusOne, idLive, idAny = 0, 2, 3, 4, 5
	// create flags
	fPrevKV, fFragment, fProgressNotify, fNoPut, fNoDelete, fUnknownFilter = 1, 2, 4, 8, 16, 32
)

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func sel(b ...byte) []byte { return b }

func lit(s string) []byte { return append([]byte{kLiteral, byte(len(s))}, s...) }

func i64(v int64) []byte { return binary.BigEndian.AppendUint64(nil, uint64(v)) }

// create is a create request: key and range end, start revision, watch id (each one of the choices above,
// followed by its bytes), flags.
func create(key, end, start, id []byte, flags byte) []byte {
	return cat(sel(wCreate), key, end, start, id, sel(flags))
}

func cancelID(id []byte) []byte { return cat(sel(wCancel), id) }

func watchSeeds() []seed {
	all, none, auto := sel(kZero), sel(kNone), sel(idAuto)
	scripts := map[string][]byte{
		"prefix-now-cancel": cat(create(sel(kC), sel(kCEnd), sel(rNow), auto, fPrevKV), cancelID(sel(idLive, 0)),
			sel(wProgress), cancelID(sel(idLive, 0))),
		"compacted": cat(create(all, all, sel(rBeforeCompaction), auto, 0), sel(wProgress), cancelID(sel(idSmall, 0))),
		"fragment-big": cat(create(sel(kBig), sel(kBigEnd), sel(rCompaction), auto, fFragment|fPrevKV),
			create(sel(kBig), sel(kBigEnd), sel(rCompaction), auto, 0)),
		"duplicate-id": cat(create(sel(kA), none, sel(rNow), sel(idSmall, 1), 0),
			create(sel(kB), none, sel(rNow), sel(idSmall, 1), 0), create(sel(kB), none, sel(rNow), auto, 0),
			create(sel(kD), none, sel(rNow), auto, 0)),
		"negative-start": create(sel(kA), none, sel(rNegative), auto, 0),
		"any-start":      cat(create(sel(kA), none, cat(sel(rAny), i64(math.MinInt64)), auto, 0), create(sel(kA), none, cat(sel(rAny), i64(math.MaxInt64)), auto, 0)),
		"empty-range":    create(sel(kB), sel(kA), sel(rNow), auto, 0),
		"id-minus-one-compacted": cat(create(all, all, sel(rBeforeCompaction), sel(idMinusOne), 0),
			cancelID(sel(idMinusOne)), create(sel(kA), none, sel(rNow), sel(idMinusOne), 0)),
		"huge-ids": cat(create(sel(kA), none, sel(rCurrent), cat(sel(idAny), i64(math.MaxInt64)), fProgressNotify),
			create(sel(kA), none, sel(rNow), cat(sel(idAny), i64(math.MinInt64)), 0),
			cancelID(cat(sel(idAny), i64(math.MaxInt64))), cancelID(cat(sel(idAny), i64(12345)))),
		"future-progress": cat(create(sel(kD), none, sel(rFuture), auto, 0), sel(wProgress),
			create(all, all, cat(sel(rSmall), sel(6)), auto, 0), sel(wProgress)),
		"filters": cat(create(all, all, sel(rCompaction), auto, fNoPut|fNoDelete|fUnknownFilter|fProgressNotify|0xc0),
			create(sel(kC), sel(kCEnd), sel(rCompaction), auto, fNoDelete|fPrevKV)),
		"empty-requests": cat(sel(wEmpty), cancelID(sel(idSmall, 3)), sel(wEmpty), create(sel(kFF), none, sel(rNow), auto, 0)),
		"literal-keys": cat(create(lit("\x00\xff"), lit(""), sel(rNow), auto, 0),
			create(lit("c/"), lit("c/\xff\xff"), sel(rCompaction), auto, 0), create(sel(kZZ), all, sel(rNow), auto, 0)),
	}
	var seeds []seed
	for name, b := range scripts {
		seeds = append(seeds, seed{name: name, values: []any{b}})
	}
	return seeds
}

// The bytes of FuzzLeaseKeepAlive's scripts (see keepAliveRun.run): the lease of a request, with bit 3 to read
// the replies owed so far; kaAnyID is followed by eight bytes.
const (
	kaLive1ID, kaLive2ID, kaRevokedID, kaZeroID, kaMinusOneID, kaMinID, kaMaxID, kaAnyID = 0, 1, 2, 3, 4, 5, 6, 7
	kaRead                                                                               = 8
)

func keepAliveSeeds() []seed {
	var many []byte
	for range 80 {
		many = append(many, kaLive1ID)
	}
	scripts := map[string][]byte{
		"lockstep": {kaLive1ID | kaRead, kaLive2ID | kaRead, kaRevokedID | kaRead, kaZeroID | kaRead,
			kaMinusOneID | kaRead, kaMinID | kaRead, kaMaxID | kaRead},
		"burst-then-close":   {kaLive1ID, kaRevokedID, kaLive2ID, kaZeroID, kaLive1ID, kaLive1ID},
		"any-ids":            cat(sel(kaAnyID), i64(kaLive2), sel(kaAnyID|kaRead), i64(1<<40), sel(kaLive1ID)),
		"none":               {},
		"past-64-unanswered": append(many, kaLive2ID|kaRead),
	}
	var seeds []seed
	for name, b := range scripts {
		seeds = append(seeds, seed{name: name, values: []any{b}})
	}
	return seeds
}
