package proxy_test

// The gateway's differential test: the same HTTP requests sent to an etcd member's client URL and to the proxy's
// port must get the same HTTP status, the same headers (but Date and Content-Length), and the same JSON. It runs on
// the twin clusters of TestDifferential (diff_test.go), one request to cluster A's member, the same to cluster B's
// proxy, so that revisions, lease ids and lock keys are equal; cluster and member ids, member URLs and auth tokens
// are normalized as there.

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/gorilla/websocket"
)

// gwSide is a twin spoken to over HTTP: the member's client URL on etcd's side, the proxy's port on the other.
type gwSide struct {
	*twinSide
	url string // http://host:port
	hc  *http.Client
}

// gwAnswer is what an HTTP client sees of an answer.
type gwAnswer struct {
	Status int
	// Header holds the response headers but Date and Content-Length (the length differs with the ids' digits).
	Header http.Header
	// Body is each JSON value of the body, in order (a stream's messages), or the body as text if it is not JSON.
	Body []any
}

// gwStep is one HTTP exchange run on each twin.
type gwStep struct {
	name   string
	method string // "" means POST, what every gateway route takes
	path   string
	body   string
	// as names whose token the Authorization header carries: "" none, bogusUser a made-up one, or a user
	// authenticated by an earlier step.
	as string
	// want is the status etcd must answer (0 means 200), so that a case that stopped being one shows up.
	want int
	// run, if set, replaces the plain exchange (streams, websockets).
	run func(ctx context.Context, t *testing.T, s *gwSide, st gwStep) gwAnswer
}

// TestGatewayDifferential runs etcd's HTTP/JSON gateway API on twin clusters, directly on one member and through the
// proxy on the other, and fails on any difference: KV, leases and a keepalive stream, watches over HTTP and over a
// websocket, locks, elections and an observe stream, maintenance and cluster calls, request errors of the gateway
// itself and of etcd, CORS and /v3beta/, and auth (tokens in the Authorization header, permission errors).
func TestGatewayDifferential(t *testing.T) {
	a, b := startTwins(t, 1)
	sides := []*gwSide{newGWSide(t, a, a.env.Cluster.Members[0].ClientURL), newGWSide(t, b, "http://"+b.env.ProxyAddr)}
	for i, st := range gatewaySteps() {
		what := fmt.Sprintf("step %d, %s %s (%s)", i, st.methodOrPost(), st.path, st.name)
		var got [2]gwAnswer
		for j, s := range sides {
			ctx, cancel := context.WithTimeout(t.Context(), diffStepTimeout)
			run := st.run
			if run == nil {
				run = exchange
			}
			got[j] = run(ctx, t, s, st)
			cancel()
		}
		if want := st.wantStatus(); got[0].Status != want {
			t.Errorf("%s: etcd answered %d, the step expects %d: %v", what, got[0].Status, want, got[0].Body)
		}
		if d := cmp.Diff(got[0], got[1]); d != "" {
			t.Errorf("%s: the answers differ (-etcd +proxy):\n%s", what, d)
		}
	}
}

func newGWSide(t *testing.T, s *twinSide, url string) *gwSide {
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	return &gwSide{twinSide: s, url: url, hc: &http.Client{Transport: tr}}
}

func (st gwStep) wantStatus() int {
	if st.want == 0 {
		return http.StatusOK
	}
	return st.want
}

func (st gwStep) methodOrPost() string {
	if st.method == "" {
		return http.MethodPost
	}
	return st.method
}

// gatewaySteps are the exchanges, in order: each write is one revision on both twins.
func gatewaySteps() []gwStep {
	kv := func(k, v string) string { return fmt.Sprintf(`{"key":%q,"value":%q}`, b64(k), b64(v)) }
	key := func(k string) string { return fmt.Sprintf(`{"key":%q}`, b64(k)) }
	prefix := func(p string) string {
		return fmt.Sprintf(`"key":%q,"range_end":%q`, b64(p), b64(string(keyPrefixEnd(p))))
	}
	var steps []gwStep
	add := func(s ...gwStep) { steps = append(steps, s...) }
	add(
		gwStep{name: "put", path: "/v3/kv/put", body: kv("g/a", "1")},
		gwStep{name: "put with prev_kv", path: "/v3/kv/put", body: `{"key":"Zy9h","value":"Mg==","prev_kv":true}`},
		gwStep{name: "put another", path: "/v3/kv/put", body: kv("g/b", "3")},
		gwStep{name: "one key", path: "/v3/kv/range", body: key("g/a")},
		gwStep{name: "missing key", path: "/v3/kv/range", body: key("g/missing")},
		gwStep{name: "prefix, sorted by key descending, limit 1", path: "/v3/kv/range",
			body: "{" + prefix("g/") + `,"sort_order":"DESCEND","sort_target":"KEY","limit":1}`},
		gwStep{name: "serializable, keys only, field names in lowerCamelCase", path: "/v3/kv/range",
			body: "{" + prefix("g/") + `,"serializable":true,"keysOnly":true}`},
		gwStep{name: "count only, a revision filter as a JSON string", path: "/v3/kv/range",
			body: "{" + prefix("g/") + `,"count_only":true,"min_mod_revision":"3"}`},
		gwStep{name: "at an old revision", path: "/v3/kv/range", body: `{"key":"Zy9h","revision":2}`},
		gwStep{name: "an unknown field is ignored", path: "/v3/kv/range", body: `{"key":"Zy9h","no_such_field":[1]}`},
		gwStep{name: "served as /v3/", path: "/v3beta/kv/range", body: key("g/a")},
		gwStep{name: "compare succeeds", path: "/v3/kv/txn", body: `{"compare":[{"key":"Zy9h","target":"VALUE","result":"EQUAL","value":"Mg=="}],` +
			`"success":[{"request_put":` + kv("g/c", "4") + `},{"request_range":{` + prefix("g/") + `}}],"failure":[{"request_put":` + kv("g/never", "x") + `}]}`},
		gwStep{name: "compare fails", path: "/v3/kv/txn", body: `{"compare":[{"key":"Zy9h","target":"VERSION","result":"GREATER","version":"100"}],` +
			`"success":[{"request_put":` + kv("g/never", "x") + `}],"failure":[{"request_delete_range":{"key":"Zy9j","prev_kv":true}}]}`},
		gwStep{name: "with prev_kv", path: "/v3/kv/deleterange", body: `{"key":"Zy9i","prev_kv":true}`},
		gwStep{name: "nothing to delete", path: "/v3/kv/deleterange", body: key("g/missing")},
	)
	add(leaseSteps()...)
	add(
		gwStep{name: "create, event", path: "/v3/watch", body: `{"create_request":{` + prefix("w/") + `,"prev_kv":true}}`, run: watchOverHTTP},
		gwStep{name: "create, event, over a websocket", path: "/v3/watch", body: `{"create_request":{` + prefix("w/") + `}}`, run: watchOverWebsocket,
			want: http.StatusSwitchingProtocols},
		gwStep{name: "lock", path: "/v3/lock/lock", body: fmt.Sprintf(`{"name":%q,"lease":%d}`, b64("lk"), leaseKeys)},
		gwStep{name: "unlock", path: "/v3/lock/unlock", body: key(fmt.Sprintf("lk/%x", leaseKeys))},
		gwStep{name: "campaign", path: "/v3/election/campaign", body: fmt.Sprintf(`{"name":%q,"lease":%d,"value":%q}`, b64("el"), leaseKeys, b64("v1"))},
		gwStep{name: "leader", path: "/v3/election/leader", body: fmt.Sprintf(`{"name":%q}`, b64("el"))},
		// Observe never ends by itself: the first message, then the client closes the stream.
		gwStep{name: "the leader", path: "/v3/election/observe", body: fmt.Sprintf(`{"name":%q}`, b64("el")), run: streamFirst},
		gwStep{name: "list alarms", path: "/v3/maintenance/alarm", body: `{"action":"GET"}`},
		gwStep{name: "members", path: "/v3/cluster/member/list", body: `{}`},
	)
	add(gatewayErrorSteps()...)
	add(gatewayAuthSteps()...)
	return steps
}

func leaseSteps() []gwStep {
	return []gwStep{
		{name: "grant with an id", path: "/v3/lease/grant", body: fmt.Sprintf(`{"TTL":60,"ID":%d}`, leaseKeys)},
		{name: "put with the lease", path: "/v3/kv/put", body: fmt.Sprintf(`{"key":%q,"value":%q,"lease":"%d"}`, b64("g/l"), b64("l"), leaseKeys)},
		{name: "leases", path: "/v3/lease/leases", body: `{}`},
		{name: "a lease that does not exist", path: "/v3/lease/revoke", body: fmt.Sprintf(`{"ID":%d}`, leaseMissing), want: http.StatusNotFound},
		// Two requests in the body, one a line; the stream ends when the body does (etcd ends a keepalive stream
		// at the client's half-close).
		{name: "renew, unknown lease, end of body", path: "/v3/lease/keepalive",
			body: fmt.Sprintf("{\"ID\":%d}\n{\"ID\":%d}\n", leaseKeys, leaseMissing), run: streamToEnd},
	}
}

func gatewayErrorSteps() []gwStep {
	return []gwStep{
		{name: "invalid JSON", path: "/v3/kv/range", body: `{"key":`, want: http.StatusBadRequest},
		{name: "a key that is not base64", path: "/v3/kv/range", body: `{"key":"!!"}`, want: http.StatusBadRequest},
		{name: "a body that is not an object", path: "/v3/kv/range", body: `[1]`, want: http.StatusBadRequest},
		{name: "an empty key", path: "/v3/kv/put", body: `{"value":"dg=="}`, want: http.StatusBadRequest},
		{name: "a future revision", path: "/v3/kv/range", body: `{"key":"Zy9h","revision":1000}`, want: http.StatusBadRequest},
		{name: "duplicate key", path: "/v3/kv/txn", body: `{"success":[{"request_put":{"key":"eA=="}},{"request_put":{"key":"eA=="}}]}`,
			want: http.StatusBadRequest},
		// The gateway half-closes a stream whose body it cannot decode; etcd ends a keepalive stream then.
		{name: "invalid JSON in a stream", path: "/v3/lease/keepalive", body: `{"ID":`, run: streamToEnd},
		{name: "no such route", path: "/v3/kv/nope", body: `{}`, want: http.StatusNotFound},
		{name: "GET on a POST route", method: http.MethodGet, path: "/v3/kv/range", want: http.StatusNotImplemented},
		{name: "a CORS preflight", method: http.MethodOptions, path: "/v3/kv/range"},
		{name: "a CORS preflight under /v3beta/", method: http.MethodOptions, path: "/v3beta/watch"},
	}
}

func gatewayAuthSteps() []gwStep {
	return []gwStep{
		{name: "not enabled", path: "/v3/auth/authenticate", body: `{"name":"root","password":"rootpw"}`, want: http.StatusBadRequest},
		{name: "root", path: "/v3/auth/user/add", body: `{"name":"root","password":"rootpw"}`},
		{name: "root role", path: "/v3/auth/user/grant", body: `{"user":"root","role":"root"}`},
		{name: "alice", path: "/v3/auth/user/add", body: `{"name":"alice","password":"alicepw"}`},
		{name: "reader of g/", path: "/v3/auth/role/add", body: `{"name":"reader"}`},
		{name: "read g/", path: "/v3/auth/role/grant", body: fmt.Sprintf(`{"name":"reader","perm":{"permType":"READ","key":%q,"range_end":%q}}`,
			b64("g/"), b64(string(keyPrefixEnd("g/"))))},
		{name: "alice reads", path: "/v3/auth/user/grant", body: `{"user":"alice","role":"reader"}`},
		{name: "enable", path: "/v3/auth/enable", body: `{}`},
		{name: "root", path: "/v3/auth/authenticate", body: `{"name":"root","password":"rootpw"}`, run: authenticate},
		{name: "alice", path: "/v3/auth/authenticate", body: `{"name":"alice","password":"alicepw"}`, run: authenticate},
		{name: "a wrong password", path: "/v3/auth/authenticate", body: `{"name":"root","password":"nope"}`, want: http.StatusBadRequest},
		{name: "with root's token", path: "/v3/kv/range", body: `{"key":"Zy9h"}`, as: "root"},
		{name: "serializable, with alice's token", path: "/v3/kv/range", body: `{"key":"Zy9h","serializable":true}`, as: "alice"},
		{name: "serializable, without a token", path: "/v3/kv/range", body: `{"key":"Zy9h","serializable":true}`, want: http.StatusBadRequest},
		{name: "without a token", path: "/v3/kv/range", body: `{"key":"Zy9h"}`, want: http.StatusBadRequest},
		{name: "an invalid token", path: "/v3/kv/range", body: `{"key":"Zy9h"}`, as: bogusUser, want: http.StatusUnauthorized},
		{name: "alice writes", path: "/v3/kv/put", body: `{"key":"Zy9h","value":"eA=="}`, as: "alice", want: http.StatusForbidden},
		{name: "alice watches what she may not read", path: "/v3/watch", body: `{"create_request":{"key":"eA=="}}`, as: "alice", run: streamFirst},
		{name: "status, with root's token", path: "/v3/auth/status", body: `{}`, as: "root"},
	}
}

// --- Exchanges ---------------------------------------------------------------------------------------------------

// send sends st's request to s; the caller closes the body.
func (s *gwSide) send(ctx context.Context, t *testing.T, st gwStep) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, st.methodOrPost(), s.url+st.path, strings.NewReader(st.body))
	if err != nil {
		t.Fatal(err)
	}
	if st.as != "" {
		req.Header.Set("Authorization", s.token(t, st.as))
	}
	resp, err := s.hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s on %s: %v", st.methodOrPost(), st.path, s.name, err)
	}
	return resp
}

// exchange is a plain request and its whole answer.
func exchange(ctx context.Context, t *testing.T, s *gwSide, st gwStep) gwAnswer {
	resp := s.send(ctx, t, st)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s on %s: reading the answer: %v", st.path, s.name, err)
	}
	return s.answer(resp, decodeAll(b))
}

// authenticate is an exchange that records the token of the user it names, for later steps, before the token is
// normalized.
func authenticate(ctx context.Context, t *testing.T, s *gwSide, st gwStep) gwAnswer {
	var req struct{ Name string }
	if err := json.Unmarshal([]byte(st.body), &req); err != nil {
		t.Fatal(err)
	}
	resp := s.send(ctx, t, st)
	defer resp.Body.Close()
	var body struct{ Token string }
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &body); err != nil || body.Token == "" {
		t.Fatalf("authenticate %s on %s: %s (%v)", req.Name, s.name, b, err)
	}
	s.tokens[req.Name] = body.Token
	return s.answer(resp, decodeAll(b))
}

// streamToEnd reads a stream's messages until the server ends it.
func streamToEnd(ctx context.Context, t *testing.T, s *gwSide, st gwStep) gwAnswer {
	resp := s.send(ctx, t, st)
	defer resp.Body.Close()
	msgs, err := readMessages(resp.Body, -1)
	if err != nil {
		t.Errorf("%s on %s: %v after %v", st.path, s.name, err, msgs)
	}
	return s.answer(resp, msgs)
}

// streamFirst reads a stream's first message, then closes it.
func streamFirst(ctx context.Context, t *testing.T, s *gwSide, st gwStep) gwAnswer {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	resp := s.send(ctx, t, st)
	defer resp.Body.Close()
	msgs, err := readMessages(resp.Body, 1)
	if err != nil {
		t.Errorf("%s on %s: %v", st.path, s.name, err)
	}
	return s.answer(resp, msgs)
}

// watchOverHTTP opens a watch stream over HTTP, reads its created message, makes a put the watcher sees (through
// the same side's gateway), reads the event, and closes the stream (etcd keeps it open after the body ends).
func watchOverHTTP(ctx context.Context, t *testing.T, s *gwSide, st gwStep) gwAnswer {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	resp := s.send(ctx, t, st)
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	dec.UseNumber()
	var msgs []any
	next := func() {
		var v any
		if err := dec.Decode(&v); err != nil {
			t.Fatalf("watch on %s: %v after %v", s.name, err, msgs)
		}
		msgs = append(msgs, s.normalizeJSON(v))
	}
	next()
	put := exchange(ctx, t, s, gwStep{path: "/v3/kv/put", body: fmt.Sprintf(`{"key":%q,"value":%q}`, b64("w/1"), b64("a"))})
	msgs = append(msgs, put.Body...)
	next()
	return s.answer(resp, msgs)
}

// watchOverWebsocket is watchOverHTTP on a websocket (etcd's gateway takes one on every route: one JSON message a
// request, one a response).
func watchOverWebsocket(ctx context.Context, t *testing.T, s *gwSide, st gwStep) gwAnswer {
	ws, resp, err := websocket.DefaultDialer.DialContext(ctx, "ws"+strings.TrimPrefix(s.url, "http")+st.path, nil)
	if err != nil {
		t.Fatalf("websocket to %s: %v", s.name, err)
	}
	defer ws.Close()
	if err := ws.WriteMessage(websocket.TextMessage, []byte(st.body)); err != nil {
		t.Fatal(err)
	}
	var msgs []any
	next := func() {
		_, b, err := ws.ReadMessage()
		if err != nil {
			t.Fatalf("websocket on %s: %v after %v", s.name, err, msgs)
		}
		msgs = append(msgs, decodeAll(b)...)
	}
	next()
	put := exchange(ctx, t, s, gwStep{path: "/v3/kv/put", body: fmt.Sprintf(`{"key":%q,"value":%q}`, b64("w/2"), b64("b"))})
	msgs = append(msgs, put.Body...)
	next()
	ans := s.answer(resp, msgs)
	ans.Header.Del("Sec-Websocket-Accept") // derived from the client's random key
	return ans
}

// --- Answers -----------------------------------------------------------------------------------------------------

// answer is what resp and its body's messages show, normalized.
func (s *gwSide) answer(resp *http.Response, body []any) gwAnswer {
	h := resp.Header.Clone()
	h.Del("Date")
	h.Del("Content-Length")
	for i := range body {
		body[i] = s.normalizeJSON(body[i])
	}
	return gwAnswer{Status: resp.StatusCode, Header: h, Body: body}
}

// decodeAll decodes every JSON value in b; b as text if it is not JSON, nil if it is empty.
func decodeAll(b []byte) []any {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var out []any
	for {
		var v any
		err := dec.Decode(&v)
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			return []any{string(b)}
		}
		out = append(out, v)
	}
}

// readMessages decodes n JSON values from r, or all of them until the end if n < 0.
func readMessages(r io.Reader, n int) ([]any, error) {
	dec := json.NewDecoder(r)
	dec.UseNumber()
	var out []any
	for n < 0 || len(out) < n {
		var v any
		err := dec.Decode(&v)
		if errors.Is(err, io.EOF) && n < 0 {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, v)
	}
	return out, nil
}

// normalizeJSON rewrites what differs between the twins by construction, as normalize does for messages: the
// header's cluster and member ids, members' ids and URLs, tokens. Idempotent.
func (s *gwSide) normalizeJSON(v any) any {
	switch v := v.(type) {
	case map[string]any:
		for k, x := range v {
			switch str, _ := x.(string); {
			case k == "cluster_id" && str == strconv.FormatUint(s.clusterID, 10):
				v[k] = strconv.Itoa(canonCluster)
			case (k == "member_id" || k == "ID") && str != "":
				if id, err := strconv.ParseUint(str, 10, 64); err == nil {
					v[k] = strconv.FormatUint(s.canonID(id), 10)
				}
			case k == "token" && str != "":
				v[k] = "(token)"
			case k == "peerURLs" || k == "clientURLs":
				for i, u := range x.([]any) {
					if c, ok := s.canonURLs[u.(string)]; ok {
						x.([]any)[i] = c
					}
				}
			default:
				v[k] = s.normalizeJSON(x)
			}
		}
	case []any:
		for i := range v {
			v[i] = s.normalizeJSON(v[i])
		}
	}
	return v
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
