package proxy_test

// The twin-cluster harness of the differential test (diff_test.go holds the test and its steps): two clusters
// started alike, one reached directly and one through its proxy; what a step does on each side, what is normalized
// in their answers (what differs between two clusters by construction), and how the two outcomes are compared.

import (
	"bytes"
	"context"
	"fmt"
	"net/url"
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
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/testing/protocmp"
)

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
