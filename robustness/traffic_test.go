package robustness

import (
	"context"
	"math/rand"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
	"golang.org/x/time/rate"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/tests/v3/robustness/client"
	"go.etcd.io/etcd/tests/v3/robustness/identity"
	"go.etcd.io/etcd/tests/v3/robustness/model"
	"go.etcd.io/etcd/tests/v3/robustness/report"
	"go.etcd.io/etcd/tests/v3/robustness/traffic"
)

// simulateTraffic is etcd's traffic.SimulateTraffic (v3.7.3) with the endpoints given instead of the cluster's:
// etcd's takes them from the cluster (clus.EndpointsGRPC()), and every one of its clients must talk to the proxy.
// The rest is etcd's, step by step: the same clients (MemberClientCount "member" clients, here all on the
// proxy, and ClusterClientCount others), the same loops, limiter, key store, lease storage, the final Put that
// must succeed, and the same minimal-QPS requirement. With readers > 0 it also runs that many serializable
// readers (serializableReader), whose reports it returns apart.
func simulateTraffic(ctx context.Context, t *testing.T, lg *zap.Logger, endpoints []string, profile traffic.Profile, tf traffic.Traffic, readers int, failpointInjected <-chan report.FailpointInjection, clientSet *client.ClientSet) (reports, readerReports []report.ClientReport) {
	lm := identity.NewLeaseIDStorage()
	limiter := rate.NewLimiter(rate.Limit(profile.KeyValue.MaximalQPS), profile.KeyValue.BurstableQPS)

	err := traffic.CheckEmptyDatabaseAtStart(ctx, lg, endpoints, clientSet)
	require.NoError(t, err)

	wg := sync.WaitGroup{}
	nonUniqueWriteLimiter := traffic.NewConcurrencyLimiter(profile.KeyValue.MaxNonUniqueRequestConcurrency)
	finish := make(chan struct{})

	keyStore := traffic.NewKeyStore(10, "key")
	kubernetesStorage := traffic.NewKubernetesStorage()

	lg.Info("Start traffic")
	startTime := time.Since(clientSet.BaseTime())
	err = traffic.SimulateKeyValueTraffic(ctx, &wg, profile.KeyValue, endpoints, clientSet, tf, traffic.RunTrafficLoopParam{
		QPSLimiter:                         limiter,
		IDs:                                clientSet.IdentityProvider(),
		LeaseIDStorage:                     lm,
		NonUniqueRequestConcurrencyLimiter: nonUniqueWriteLimiter,
		KeyStore:                           keyStore,
		Storage:                            kubernetesStorage,
		Finish:                             finish,
	})
	require.NoError(t, err)
	if profile.Watch != nil {
		err = traffic.SimulateWatchTraffic(ctx, &wg, profile.Watch, endpoints, clientSet, tf, traffic.RunWatchLoopParam{
			Config:     *profile.Watch,
			QPSLimiter: limiter,
			KeyStore:   keyStore,
			Storage:    kubernetesStorage,
			Finish:     finish,
			Logger:     lg,
		})
		require.NoError(t, err)
	}
	if profile.Compaction != nil {
		if profile.Compaction.Period < traffic.MinimalCompactionPeriod {
			t.Fatalf("Compaction period %v below minimal %v", profile.Compaction.Period, traffic.MinimalCompactionPeriod)
		}
		err = traffic.SimulateCompactionTraffic(ctx, &wg, profile.Compaction, endpoints, clientSet, tf, traffic.RunCompactLoopParam{
			Period: profile.Compaction.Period,
			Finish: finish,
		})
		require.NoError(t, err)
	}
	var serializable []*serializableReader
	if readers > 0 {
		readLimiter := rate.NewLimiter(serializableReadQPS, serializableReadQPS)
		for range readers {
			r, err := newSerializableReader(endpoints, clientSet.IdentityProvider(), clientSet.BaseTime())
			require.NoError(t, err)
			serializable = append(serializable, r)
			wg.Add(1)
			go func() {
				defer wg.Done()
				r.run(ctx, readLimiter, keyStore.GetKey, keyStore.GetPrefix(), finish)
			}()
		}
	}
	var fr *report.FailpointInjection
	select {
	case frp, ok := <-failpointInjected:
		require.Truef(t, ok, "Failed to collect failpoint report")
		fr = &frp
	case <-ctx.Done():
		t.Fatalf("Traffic finished before failure was injected: %s", ctx.Err())
	}
	close(finish)
	wg.Wait()
	lg.Info("Finished traffic")
	endTime := time.Since(clientSet.BaseTime())

	time.Sleep(time.Second)
	// Ensure that last operation succeeds
	cc, err := clientSet.NewClient(endpoints)
	require.NoError(t, err)
	defer cc.Close()
	_, err = cc.Put(ctx, "tombstone", "true")
	require.NoErrorf(t, err, "Last operation failed, validation requires last operation to succeed")
	reports = clientSet.Reports()

	beforeFailpointStats := traffic.CalculateStats(reports, startTime, fr.Start)
	totalStats := traffic.CalculateStats(reports, startTime, endTime)
	lg.Info("Reporting complete traffic", zap.Int("successes", totalStats.Successes), zap.Int("failures", totalStats.Failures), zap.Float64("successRate", totalStats.SuccessRate()), zap.Duration("period", totalStats.Period), zap.Float64("qps", totalStats.QPS()))
	lg.Info("Reporting traffic before failure injection", zap.Int("successes", beforeFailpointStats.Successes), zap.Int("failures", beforeFailpointStats.Failures), zap.Float64("successRate", beforeFailpointStats.SuccessRate()), zap.Duration("period", beforeFailpointStats.Period), zap.Float64("qps", beforeFailpointStats.QPS()))
	if beforeFailpointStats.QPS() < profile.KeyValue.MinimalQPS {
		t.Errorf("Requiring minimal %f qps before failpoint injection for test results to be reliable, got %f qps", profile.KeyValue.MinimalQPS, beforeFailpointStats.QPS())
	}
	for _, r := range serializable {
		readerReports = append(readerReports, r.report())
	}
	return reports, readerReports
}

// serializableReadQPS bounds the serializable readers together.
const serializableReadQPS = 200

// serializableReader reads with clientv3.WithSerializable, which etcd's traffic never does (its reads are
// linearizable, or at a past revision), so that the proxy's read cache serves some of them.
//
// Each read is recorded in etcd's model as a read at the revision of its own response header: a serializable
// read may be stale, but it must be exactly the store at the revision it reports. checkSerializableReads checks
// that against the store replayed from the members' WAL, as etcd checks its stale reads.
type serializableReader struct {
	id       int
	client   *clientv3.Client
	baseTime time.Time
	mu       sync.Mutex // protects history
	history  *model.AppendableHistory
}

func newSerializableReader(endpoints []string, ids identity.Provider, baseTime time.Time) (*serializableReader, error) {
	cc, err := clientv3.New(clientv3.Config{
		Endpoints:            endpoints,
		Logger:               zap.NewNop(),
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 100 * time.Millisecond,
	})
	if err != nil {
		return nil, err
	}
	return &serializableReader{id: ids.NewClientID(), client: cc, baseTime: baseTime, history: model.NewAppendableHistory(ids)}, nil
}

// run reads a key of the traffic (key()), or its whole prefix one time in four, until finish.
func (r *serializableReader) run(ctx context.Context, limiter *rate.Limiter, key func() string, prefix string, finish <-chan struct{}) {
	defer r.client.Close()
	for {
		select {
		case <-ctx.Done():
			return
		case <-finish:
			return
		default:
		}
		if limiter.Wait(ctx) != nil {
			return
		}
		start, end := key(), ""
		if rand.Intn(4) == 0 {
			start, end = prefix, clientv3.GetPrefixRangeEnd(prefix)
		}
		r.read(ctx, start, end)
	}
}

func (r *serializableReader) read(ctx context.Context, start, end string) {
	opts := []clientv3.OpOption{clientv3.WithSerializable()}
	if end != "" {
		opts = append(opts, clientv3.WithRange(end))
	}
	rctx, cancel := context.WithTimeout(ctx, traffic.RequestTimeout)
	defer cancel()
	r.mu.Lock()
	defer r.mu.Unlock()
	callTime := time.Since(r.baseTime)
	resp, err := r.client.Get(rctx, start, opts...)
	returnTime := time.Since(r.baseTime)
	var rev int64
	if err == nil {
		rev = resp.Header.Revision
	}
	r.history.AppendRange(start, end, rev, 0, false, callTime, returnTime, resp, err)
}

func (r *serializableReader) report() report.ClientReport {
	r.mu.Lock()
	defer r.mu.Unlock()
	return report.ClientReport{ClientID: r.id, KeyValue: r.history.History.Operations()}
}
