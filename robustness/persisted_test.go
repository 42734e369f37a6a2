package robustness

import (
	"errors"
	"fmt"
	"path/filepath"
	"slices"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/server/v3/storage/datadir"
	"go.etcd.io/etcd/server/v3/storage/wal"
	"go.etcd.io/etcd/tests/v3/framework/e2e"
	"go.etcd.io/etcd/tests/v3/robustness/model"
	"go.etcd.io/etcd/tests/v3/robustness/report"
	"go.etcd.io/raft/v3/raftpb"
)

// persistedRequests is etcd's report.PersistedRequestsCluster, which reads the requests the cluster persisted from
// every member's WAL (and merges them by raft index), except that AuthStatus entries are left out.
//
// Why: the proxy's read cache reads etcd's auth revision with one AuthStatus call a second, from its start (ten
// polls) and for as long as cacheable (serializable) reads come (overrides/kvcache/auth.go), and etcd serves
// AuthStatus through raft, so each is a WAL entry: every history has some. etcd's WAL reader knows
// only the requests etcd's own traffic makes and panics on any other ("Unhandled raft request"). Leaving AuthStatus
// out does not weaken the check: AuthStatus changes no key, no lease and no revision, so the model's state after
// each persisted request, the revisions and the watch events replayed from them are exactly the same with or
// without it. Nothing else is left out.
//
// How: each member's WAL is read with etcd's report.ReadWAL; where it holds AuthStatus entries, their data is
// emptied (so they count as the leader's empty entries, which etcd's reader skips; the raft index and term stay, so
// the merge of the members' logs is the same) and the entries are written to a new WAL under work; then etcd's
// report.PersistedRequests reads and merges them all, unchanged.
//
// authStatus is how many AuthStatus entries were left out (of the member's WAL that had the most).
func persistedRequests(lg *zap.Logger, clus *e2e.EtcdProcessCluster, work string) (requests []model.EtcdRequest, authStatus int, err error) {
	var dataDirs []string
	for i, proc := range clus.Procs {
		dataDir := proc.Config().DataDirPath
		state, entries, err := report.ReadWAL(lg, dataDir)
		if err != nil {
			// PersistedRequests logs it and goes on without this member: let it.
			dataDirs = append(dataDirs, dataDir)
			continue
		}
		n, err := dropAuthStatus(entries)
		if err != nil {
			return nil, 0, err
		}
		if n == 0 {
			dataDirs = append(dataDirs, dataDir)
			continue
		}
		authStatus = max(authStatus, n) // the members' logs are copies of one log
		dir := filepath.Join(work, fmt.Sprintf("member-%d", i))
		if err := writeWAL(lg, dir, state, entries); err != nil {
			return nil, 0, err
		}
		dataDirs = append(dataDirs, dir)
	}
	requests, err = report.PersistedRequests(lg, dataDirs)
	return requests, authStatus, err
}

// dropAuthStatus empties the data of the AuthStatus entries and says how many there were.
func dropAuthStatus(entries []*raftpb.Entry) (int, error) {
	n := 0
	for _, e := range entries {
		if e.GetType() != raftpb.EntryNormal || len(e.Data) == 0 {
			continue
		}
		var req pb.InternalRaftRequest
		if err := proto.Unmarshal(e.Data, &req); err != nil {
			continue // etcd's reader decides what to do with it
		}
		if req.AuthStatus != nil {
			e.Data = nil
			n++
		}
	}
	return n, nil
}

// writeWAL writes a member data dir at dir whose WAL holds state and entries.
func writeWAL(lg *zap.Logger, dir string, state *raftpb.HardState, entries []*raftpb.Entry) error {
	w, err := wal.Create(lg, datadir.ToWALDir(dir), nil)
	if err != nil {
		return err
	}
	if state == nil {
		state = &raftpb.HardState{}
	}
	return errors.Join(w.Save(state, entries), w.Close())
}

// checkSerializableReads checks the serializable readers' reads as etcd's validation checks its stale reads
// (validate.validateSerializableRead): the answer must be exactly the store, replayed from the persisted
// requests, at the revision the read was recorded at, its own header's revision. A serializable read may be
// stale, so it is not linearized: etcd's model would linearize a read recorded at revision R only where the
// cluster's revision is R, which a stale (but correct) answer does not meet.
func checkSerializableReads(reports []report.ClientReport, persisted []model.EtcdRequest) (checked int, err error) {
	if len(persisted) == 0 {
		return 0, errors.New("no persisted requests to check the serializable reads against")
	}
	replay := model.NewReplay(persisted)
	var errs []error
	for _, r := range reports {
		for _, op := range r.KeyValue {
			request := op.Input.(model.EtcdRequest)
			response := op.Output.(model.MaybeEtcdResponse)
			if response.Error != "" {
				continue
			}
			checked++
			state, err := replay.StateForRevision(request.Range.Revision)
			if err != nil {
				errs = append(errs, fmt.Errorf("serializable read of client %d at revision %d: %w", r.ClientID, request.Range.Revision, err))
				continue
			}
			_, expect := state.Step(request)
			if diff := cmp.Diff(expect.Range, response.EtcdResponse.Range); diff != "" {
				errs = append(errs, fmt.Errorf("serializable read of client %d (%+v) at revision %d differs from the store at that revision (-want +got):\n%s",
					r.ClientID, request.Range.RangeOptions, request.Range.Revision, diff))
			}
		}
	}
	return checked, errors.Join(errs...)
}

// checkReadYourWrites checks the proxy's read-your-writes guarantee (overrides/ryw): a serializable read that
// starts after a write through the proxy was acknowledged answers at the write's revision or later, whichever
// member serves it and whether the cache does. All traffic goes through the proxy, so every acknowledged write of
// the traffic's clients counts, for every reader. Not across a restart of the proxy (restarts: the windows from a
// stop to the new instance serving): a new instance knows nothing of the writes the old one acknowledged.
func checkReadYourWrites(traffic, readers []report.ClientReport, restarts [][2]int64) error {
	type ack struct{ at, rev int64 }
	var acks []ack
	for _, r := range traffic {
		for _, op := range r.KeyValue {
			request, response := op.Input.(model.EtcdRequest), op.Output.(model.MaybeEtcdResponse)
			if response.Error == "" && !response.Persisted && wrote(request, response.EtcdResponse) {
				acks = append(acks, ack{at: op.Return, rev: response.Revision})
			}
		}
	}
	slices.SortFunc(acks, func(a, b ack) int { return int(a.at - b.at) })
	crosses := func(from, to int64) bool { // a restart between an acknowledgement and the end of a read
		return slices.ContainsFunc(restarts, func(w [2]int64) bool { return from <= w[1] && to >= w[0] })
	}
	var errs []error
	for _, r := range readers {
		for _, op := range r.KeyValue {
			request, response := op.Input.(model.EtcdRequest), op.Output.(model.MaybeEtcdResponse)
			if response.Error != "" {
				continue
			}
			// The newest write acknowledged before the read started, by the instance that served it.
			var newest ack
			for _, a := range acks {
				if a.at >= op.Call {
					break
				}
				// Up to the read's return: a read the client retried may have been served by a new instance.
				if a.rev > newest.rev && !crosses(a.at, op.Return) {
					newest = a
				}
			}
			if request.Range.Revision < newest.rev {
				errs = append(errs, fmt.Errorf("serializable read of client %d (%+v) answered at revision %d, after a write through the proxy at revision %d was acknowledged",
					r.ClientID, request.Range.RangeOptions, request.Range.Revision, newest.rev))
			}
		}
	}
	return errors.Join(errs...)
}

// wrote reports whether a traffic request changed keys: a Txn whose branch taken puts or deletes.
func wrote(request model.EtcdRequest, response model.EtcdResponse) bool {
	if request.Type != model.Txn || request.Txn == nil || response.Txn == nil {
		return false
	}
	ops := request.Txn.OperationsOnSuccess
	if response.Txn.Failure {
		ops = request.Txn.OperationsOnFailure
	}
	return slices.ContainsFunc(ops, func(o model.EtcdOperation) bool {
		return o.Type == model.PutOperation || o.Type == model.DeleteOperation
	})
}
