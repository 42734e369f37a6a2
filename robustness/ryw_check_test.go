package robustness

import (
	"testing"

	"github.com/anishathalye/porcupine"
	"go.etcd.io/etcd/tests/v3/robustness/model"
	"go.etcd.io/etcd/tests/v3/robustness/report"
)

// TestCheckReadYourWrites: the check fails on a serializable read older than a write acknowledged before it
// started, and only then (not for a read that started first, nor across a restart of the proxy).
func TestCheckReadYourWrites(t *testing.T) {
	put := model.EtcdRequest{Type: model.Txn, Txn: &model.TxnRequest{OperationsOnSuccess: []model.EtcdOperation{
		{Type: model.PutOperation, Put: model.PutOptions{Key: "k"}}}}}
	write := report.ClientReport{ClientID: 1, KeyValue: []porcupine.Operation{{ClientId: 1, Input: put, Call: 10, Return: 20,
		Output: model.MaybeEtcdResponse{EtcdResponse: model.EtcdResponse{Revision: 5, Txn: &model.TxnResponse{}}}}}}
	read := func(call, rev int64) []report.ClientReport {
		return []report.ClientReport{{ClientID: 2, KeyValue: []porcupine.Operation{{ClientId: 2, Call: call, Return: call + 5,
			Input:  model.EtcdRequest{Type: model.Range, Range: &model.RangeRequest{RangeOptions: model.RangeOptions{Start: "k"}, Revision: rev}},
			Output: model.MaybeEtcdResponse{EtcdResponse: model.EtcdResponse{Revision: rev, Range: &model.RangeResponse{}}}}}}}
	}
	for _, c := range []struct {
		name     string
		readers  []report.ClientReport
		restarts [][2]int64
		fail     bool
	}{
		{"stale after the acknowledgement", read(30, 4), nil, true},
		{"at the write's revision", read(30, 5), nil, false},
		{"started before the acknowledgement", read(15, 4), nil, false},
		{"across a restart of the proxy", read(30, 4), [][2]int64{{22, 28}}, false},
		{"a restart before the write", read(30, 4), [][2]int64{{1, 8}}, true},
		{"a restart while the read was retried", read(30, 4), [][2]int64{{32, 34}}, false},
	} {
		if err := checkReadYourWrites([]report.ClientReport{write}, c.readers, c.restarts); (err != nil) != c.fail {
			t.Errorf("%s: %v, want a failure: %v", c.name, err, c.fail)
		}
	}
}
