package manager

import (
	"context"
	"crypto"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/workloadapi"
)

// waitLimit bounds every wait; tests never assert durations.
const waitLimit = 20 * time.Second

type harness struct {
	fake   *fakeServer
	client agentv1.AgentClient
	m      *Manager
}

// start runs a manager against a fake server holding entries.
func start(t testing.TB, cfg Config, entries ...*agentv1.Entry) *harness {
	t.Helper()
	f := newFakeServer(t)
	f.upsert(entries...)
	client := f.serve(t)
	cfg.TrustDomain = testTD
	cfg.Client = client
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MinBackoff == 0 {
		cfg.MinBackoff = 20 * time.Millisecond
		cfg.MaxBackoff = 200 * time.Millisecond
	}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return &harness{fake: f, client: client, m: m}
}

func sels(ss ...string) []workloadapi.Selector {
	out := make([]workloadapi.Selector, 0, len(ss))
	for _, s := range ss {
		sel, err := workloadapi.ParseSelector(s)
		if err != nil {
			panic(err)
		}
		out = append(out, sel)
	}
	return out
}

func subscribe(t *testing.T, m *Manager, ss ...string) workloadapi.Subscription {
	t.Helper()
	sub, err := m.Subscribe(context.Background(), sels(ss...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sub.Close)
	return sub
}

// waitSnap reads snapshots until ok accepts one.
func waitSnap(t *testing.T, sub workloadapi.Subscription, what string, ok func(*workloadapi.Snapshot) bool) *workloadapi.Snapshot {
	t.Helper()
	deadline := time.NewTimer(waitLimit)
	defer deadline.Stop()
	var last *workloadapi.Snapshot
	for {
		select {
		case s := <-sub.Updates():
			last = s
			if ok(s) {
				return s
			}
		case <-deadline.C:
			t.Fatalf("timed out waiting for %s; last snapshot: %s", what, describeSnap(last))
		}
	}
}

func describeSnap(s *workloadapi.Snapshot) string {
	if s == nil {
		return "none"
	}
	return "[" + strings.Join(ids(s), " ") + "]"
}

func ids(s *workloadapi.Snapshot) []string {
	var out []string
	for _, v := range s.SVIDs {
		out = append(out, v.ID.Path())
	}
	return out
}

func hasIDs(want ...string) func(*workloadapi.Snapshot) bool {
	return func(s *workloadapi.Snapshot) bool { return slices.Equal(ids(s), want) && s.Bundle != nil }
}

func serial(s *workloadapi.Snapshot, path string) string {
	for _, v := range s.SVIDs {
		if v.ID.Path() == path {
			return v.Certificates[0].SerialNumber.String()
		}
	}
	return ""
}

func TestFullSyncSignsEveryWorkloadEntry(t *testing.T) {
	alias := &agentv1.Entry{Id: "alias", SpiffeId: "spiffe://example.org/node/group", ParentId: testServerID, RevisionNumber: 1,
		Selectors: []*agentv1.Selector{{Type: "tpm", Value: "manufacturer:IBM"}}}
	h := start(t, Config{},
		workloadEntry("e-b", "/b", 1, "unix:uid:1000", "unix:user:alice"),
		workloadEntry("e-a", "/a", 1, "unix:uid:1000"),
		workloadEntry("e-c", "/c", 1, "unix:uid:2000"),
		&agentv1.Entry{Id: "e-nested", SpiffeId: "spiffe://example.org/n", ParentId: "spiffe://example.org/node/group", RevisionNumber: 1,
			Selectors: []*agentv1.Selector{{Type: "unix", Value: "uid:1000"}, {Type: "unix", Value: "gid:5"}}},
		alias,
	)
	sub := subscribe(t, h.m, "unix:uid:1000", "unix:user:alice", "unix:gid:5")
	snap := waitSnap(t, sub, "three SVIDs", hasIDs("/a", "/b", "/n"))

	b := x509bundle.FromX509Authorities(testTD, snap.Bundle.X509Authorities())
	for _, s := range snap.SVIDs {
		id, _, err := x509svid.Verify(s.Certificates, b)
		if err != nil {
			t.Fatalf("SVID %s does not verify against the bundle: %v", s.ID, err)
		}
		if id != s.ID {
			t.Errorf("leaf ID %s, snapshot ID %s", id, s.ID)
		}
		if !s.PrivateKey.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(s.Certificates[0].PublicKey) {
			t.Errorf("SVID %s: private key does not match the leaf", s.ID)
		}
	}
	<-h.m.Synced()
	<-h.m.Ready() // every entry of the first sync is signed by now
	st := h.m.State()
	if st.Entries != 4 || st.SVIDs != 4 || st.NodeAliases != 1 || !st.Connected || st.LastSync.IsZero() || st.BundleSequence != 1 || st.Subscribers != 1 {
		t.Errorf("State() = %+v", st)
	}
	if h.fake.csrs.Load() != 4 {
		t.Errorf("server got %d CSRs, want 4 (node aliases get none)", h.fake.csrs.Load())
	}
}

func waitState(t *testing.T, m *Manager, what string, ok func(State) bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !ok(m.State()) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; state %+v", what, m.State())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestEntryChangesReachSubscribers(t *testing.T) {
	h := start(t, Config{}, workloadEntry("e-a", "/a", 1, "unix:uid:1000"))
	sub := subscribe(t, h.m, "unix:uid:1000")
	snap := waitSnap(t, sub, "/a", hasIDs("/a"))
	firstA := serial(snap, "/a")

	h.fake.upsert(workloadEntry("e-b", "/b", 1, "unix:uid:1000"))
	snap = waitSnap(t, sub, "/a and /b", hasIDs("/a", "/b"))
	if serial(snap, "/a") != firstA {
		t.Error("/a was re-signed although its entry did not change")
	}

	h.fake.upsert(workloadEntry("e-a", "/a", 2, "unix:uid:1000"))
	snap = waitSnap(t, sub, "re-signed /a", func(s *workloadapi.Snapshot) bool {
		return hasIDs("/a", "/b")(s) && serial(s, "/a") != firstA
	})

	h.fake.remove("e-b")
	waitSnap(t, sub, "/b gone", hasIDs("/a"))

	// An entry whose selectors no longer match leaves the snapshot.
	h.fake.upsert(workloadEntry("e-a", "/a", 3, "unix:uid:1000", "unix:gid:7"))
	waitSnap(t, sub, "no SVIDs", hasIDs())
}

func TestHalfLifeRotation(t *testing.T) {
	e := workloadEntry("e-a", "/a", 1, "unix:uid:1000")
	e.X509SvidTtl = 4
	h := start(t, Config{RotationJitter: -1}, e)
	sub := subscribe(t, h.m, "unix:uid:1000")
	snap := waitSnap(t, sub, "/a", hasIDs("/a"))
	first := snap.SVIDs[0].Certificates[0]
	// The server backdates NotBefore by 10 s; rotation must still wait for
	// half of the 4 s TTL rather than re-sign at once.
	snap = waitSnap(t, sub, "rotated /a", func(s *workloadapi.Snapshot) bool {
		return hasIDs("/a")(s) && s.SVIDs[0].Certificates[0].SerialNumber.Cmp(first.SerialNumber) != 0
	})
	if !snap.SVIDs[0].Certificates[0].NotAfter.After(first.NotAfter) {
		t.Error("rotated SVID does not outlive the old one")
	}
}

func TestExpiredSVIDIsDropped(t *testing.T) {
	e := workloadEntry("e-a", "/a", 1, "unix:uid:1000")
	e.X509SvidTtl = 2
	h := start(t, Config{}, e)
	sub := subscribe(t, h.m, "unix:uid:1000")
	waitSnap(t, sub, "/a", hasIDs("/a"))
	// The server stops renewing (as for a banned agent): the workload loses
	// the SVID when it expires, not later.
	h.fake.mu.Lock()
	h.fake.refuse["e-a"] = true
	h.fake.mu.Unlock()
	snap := waitSnap(t, sub, "no SVIDs", hasIDs())
	if snap.Bundle == nil {
		t.Error("bundle dropped with the SVID")
	}
	if st := h.m.State(); st.SVIDs != 0 || st.Entries != 1 || !strings.Contains(st.LastError, "refused") {
		t.Errorf("State() = %+v", st)
	}
}

func TestRotationTime(t *testing.T) {
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	na := nb.Add(100 * time.Minute)
	for _, tc := range []struct {
		jitter   float64
		min, max time.Duration
	}{
		{-1, 50 * time.Minute, 50 * time.Minute},
		{0, 45 * time.Minute, 55 * time.Minute}, // default 10 %
		{0.5, 25 * time.Minute, 75 * time.Minute},
	} {
		m, err := New(Config{TrustDomain: testTD, RotationJitter: tc.jitter})
		if err != nil {
			t.Fatal(err)
		}
		for range 200 {
			got := m.rotationTime(nb, na).Sub(nb)
			if got < tc.min || got > tc.max {
				t.Fatalf("jitter %v: rotation after %v, want within [%v, %v]", tc.jitter, got, tc.min, tc.max)
			}
		}
	}
}

func TestBundleRotationReachesSubscribers(t *testing.T) {
	h := start(t, Config{}, workloadEntry("e-a", "/a", 1, "unix:uid:1000"))
	sub := subscribe(t, h.m, "unix:uid:1000")
	snap := waitSnap(t, sub, "/a", hasIDs("/a"))
	oldCA := snap.Bundle.X509Authorities()[0]

	h.fake.rotateCA(t)
	snap = waitSnap(t, sub, "new bundle and an SVID under the new CA", func(s *workloadapi.Snapshot) bool {
		if !hasIDs("/a")(s) || s.Bundle.X509Authorities()[0].Equal(oldCA) {
			return false
		}
		_, _, err := x509svid.Verify(s.SVIDs[0].Certificates, x509bundle.FromX509Authorities(testTD, s.Bundle.X509Authorities()))
		return err == nil
	})
	if seq, _ := snap.Bundle.SequenceNumber(); seq != 2 {
		t.Errorf("bundle sequence %d, want 2", seq)
	}
}

func TestInvalidateAndResume(t *testing.T) {
	h := start(t, Config{}, workloadEntry("e-a", "/a", 1, "unix:uid:1000"))
	sub := subscribe(t, h.m, "unix:uid:1000")
	waitSnap(t, sub, "/a", hasIDs("/a"))

	h.m.Invalidate("node banned")
	waitSnap(t, sub, "empty state", func(s *workloadapi.Snapshot) bool { return len(s.SVIDs) == 0 })
	if _, err := h.m.FetchJWTSVIDs(context.Background(), sels("unix:uid:1000"), []string{"x"}, spiffeid.ID{}); !errors.Is(err, workloadapi.ErrNoIdentity) {
		t.Errorf("FetchJWTSVIDs after Invalidate: %v, want ErrNoIdentity", err)
	}
	st := h.m.State()
	if st.Invalidated != "node banned" || st.SVIDs != 0 || st.Entries != 0 {
		t.Errorf("State after Invalidate = %+v", st)
	}
	// A new subscriber sees the empty state too.
	sub2 := subscribe(t, h.m, "unix:uid:1000")
	if s := <-sub2.Updates(); len(s.SVIDs) != 0 {
		t.Errorf("new subscriber got %d SVIDs after Invalidate", len(s.SVIDs))
	}

	// Re-attested: the runtime hands over a new client.
	h.m.SetClient(h.fake.serve(t))
	waitSnap(t, sub, "/a again", hasIDs("/a"))
	if st := h.m.State(); st.Invalidated != "" {
		t.Errorf("still invalidated after SetClient: %+v", st)
	}
}

func TestReconnectAndResync(t *testing.T) {
	authErrs := make(chan error, 100)
	onAuth := func(err error) {
		select {
		case authErrs <- err:
		default:
		}
	}
	h := start(t, Config{OnAuthError: onAuth}, workloadEntry("e-a", "/a", 1, "unix:uid:1000"), workloadEntry("e-b", "/b", 1, "unix:uid:1000"))
	sub := subscribe(t, h.m, "unix:uid:1000")
	snap := waitSnap(t, sub, "/a /b", hasIDs("/a", "/b"))
	serialA := serial(snap, "/a")

	// Changes made while the agent is disconnected arrive with the full
	// sync on the next stream.
	h.fake.mu.Lock()
	h.fake.denyAll = true
	h.fake.mu.Unlock()
	h.fake.breakStreams()
	waitState(t, h.m, "disconnected", func(st State) bool { return !st.Connected && st.LastError != "" })
	select {
	case err := <-authErrs:
		if status.Code(err) != codes.PermissionDenied {
			t.Errorf("OnAuthError got %v", err)
		}
	case <-time.After(waitLimit):
		t.Fatal("OnAuthError was not called for a refused Sync")
	}
	h.fake.mu.Lock()
	delete(h.fake.entries, "e-b")
	h.fake.entries["e-c"] = workloadEntry("e-c", "/c", 1, "unix:uid:1000")
	h.fake.denyAll = false
	h.fake.mu.Unlock()

	snap = waitSnap(t, sub, "/a /c", hasIDs("/a", "/c"))
	if serial(snap, "/a") != serialA {
		t.Error("an unchanged entry was re-signed after reconnecting")
	}
	if h.fake.syncCalls.Load() < 2 {
		t.Errorf("%d Sync calls, want a reconnect", h.fake.syncCalls.Load())
	}
	waitState(t, h.m, "connected", func(st State) bool { return st.Connected && st.LastError == "" })
}

func TestSplitFullSyncKeepsSVIDs(t *testing.T) {
	h := start(t, Config{}, workloadEntry("e-a", "/a", 1, "unix:uid:1000"), workloadEntry("e-b", "/b", 1, "unix:uid:1000"), workloadEntry("e-c", "/c", 1, "unix:uid:1000"))
	sub := subscribe(t, h.m, "unix:uid:1000")
	snap := waitSnap(t, sub, "/a /b /c", hasIDs("/a", "/b", "/c"))
	serialB := serial(snap, "/b")

	// Reconnect: the full set arrives as {a} (more) then {b}; c was deleted
	// meanwhile. b must never disappear or be re-signed; c goes once the
	// last part arrived.
	h.fake.mu.Lock()
	h.fake.split = true
	delete(h.fake.entries, "e-c")
	h.fake.mu.Unlock()
	calls := h.fake.syncCalls.Load()
	h.fake.breakStreams()
	waitSnap(t, sub, "/a /b", func(s *workloadapi.Snapshot) bool {
		if serial(s, "/b") != serialB {
			t.Fatalf("/b was dropped or re-signed during a split full sync: %s", describeSnap(s))
		}
		return hasIDs("/a", "/b")(s)
	})
	if h.fake.syncCalls.Load() == calls {
		t.Error("no reconnect happened")
	}
	if st := h.m.State(); st.Entries != 2 {
		t.Errorf("State().Entries = %d, want 2", st.Entries)
	}
}

func TestSingleRefusalIsNotReported(t *testing.T) {
	reported := make(chan error, 10)
	h := start(t, Config{OnAuthError: func(err error) { reported <- err }}, workloadEntry("e-a", "/a", 1, "unix:uid:1000"))
	sub := subscribe(t, h.m, "unix:uid:1000")
	waitSnap(t, sub, "/a", hasIDs("/a"))
	// As after a renewal: the old stream is refused once, the next works.
	h.fake.mu.Lock()
	h.fake.denyN = 1
	h.fake.mu.Unlock()
	calls := h.fake.syncCalls.Load()
	h.fake.breakStreams()
	waitState(t, h.m, "reconnected after one refusal", func(st State) bool {
		return h.fake.syncCalls.Load() >= calls+2 && st.Connected
	})
	select {
	case err := <-reported:
		t.Errorf("a single refusal was reported: %v", err)
	default:
	}
}

func TestRefusedCSRIsRetried(t *testing.T) {
	f := Config{}
	h := start(t, f, workloadEntry("e-a", "/a", 1, "unix:uid:1000"))
	sub := subscribe(t, h.m, "unix:uid:1000")
	waitSnap(t, sub, "/a", hasIDs("/a"))

	h.fake.mu.Lock()
	h.fake.refuse["e-b"] = true
	h.fake.mu.Unlock()
	h.fake.upsert(workloadEntry("e-b", "/b", 1, "unix:uid:1000"))
	waitState(t, h.m, "a signing error", func(st State) bool { return strings.Contains(st.LastError, "PermissionDenied") })
	calls := h.fake.batchCalls.Load()
	h.fake.mu.Lock()
	h.fake.refuse["e-b"] = false
	h.fake.mu.Unlock()
	waitSnap(t, sub, "/a /b", hasIDs("/a", "/b"))
	if h.fake.batchCalls.Load() <= calls {
		t.Error("the refused CSR was not retried")
	}
}

func TestFetchJWTSVIDsCache(t *testing.T) {
	ea := workloadEntry("e-a", "/a", 1, "unix:uid:1000")
	ea.Hint = "internal"
	h := start(t, Config{JWTCacheSize: 2}, ea, workloadEntry("e-b", "/b", 1, "unix:uid:1000"))
	<-h.m.Synced()
	ctx := context.Background()
	ws := sels("unix:uid:1000")
	fetch := func(aud []string, id string) []workloadapi.JWTSVID {
		t.Helper()
		var sid spiffeid.ID
		if id != "" {
			sid = spiffeid.RequireFromString(id)
		}
		out, err := h.m.FetchJWTSVIDs(ctx, ws, aud, sid)
		if err != nil {
			t.Fatalf("FetchJWTSVIDs(%v, %q): %v", aud, id, err)
		}
		return out
	}

	tests := []struct {
		name      string
		aud       []string
		id        string
		wantIDs   []string
		wantCalls int64 // server calls made by this fetch
	}{
		{"miss for both", []string{"db", "api"}, "", []string{"/a", "/b"}, 2},
		{"hit, audience order and duplicates do not matter", []string{"api", "db", "api"}, "", []string{"/a", "/b"}, 0},
		{"one identity, hit", []string{"api", "db"}, "spiffe://example.org/b", []string{"/b"}, 0},
		{"other audience misses (and evicts LRU)", []string{"web"}, "spiffe://example.org/a", []string{"/a"}, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := h.fake.jwtCalls.Load()
			got := fetch(tc.aud, tc.id)
			var gotIDs []string
			for _, s := range got {
				gotIDs = append(gotIDs, s.ID.Path())
				claims, err := jwtsvid.ParseInsecure(s.Token, tc.aud)
				if err != nil {
					t.Fatalf("token for %s: %v", s.ID, err)
				}
				if claims.ID != s.ID {
					t.Errorf("token subject %s, want %s", claims.ID, s.ID)
				}
				if s.ID.Path() == "/a" && s.Hint != "internal" {
					t.Errorf("hint %q, want internal", s.Hint)
				}
			}
			if !slices.Equal(gotIDs, tc.wantIDs) {
				t.Errorf("IDs %v, want %v", gotIDs, tc.wantIDs)
			}
			if n := h.fake.jwtCalls.Load() - before; n != tc.wantCalls {
				t.Errorf("%d server calls, want %d", n, tc.wantCalls)
			}
		})
	}
	if n := h.m.jwt.len(); n != 2 {
		t.Errorf("JWT cache holds %d tokens, want the bound 2", n)
	}

	// A new revision of the entry is not served from the cache.
	h.fake.upsert(workloadEntry("e-a", "/a", 2, "unix:uid:1000"))
	waitState(t, h.m, "revision 2", func(State) bool {
		h.m.mu.Lock()
		defer h.m.mu.Unlock()
		return h.m.entries["e-a"].revision == 2
	})
	before := h.fake.jwtCalls.Load()
	fetch([]string{"web"}, "spiffe://example.org/a")
	if h.fake.jwtCalls.Load() != before+1 {
		t.Error("a changed entry's JWT-SVID came from the cache")
	}

	// Not entitled.
	if _, err := h.m.FetchJWTSVIDs(ctx, sels("unix:uid:1"), []string{"x"}, spiffeid.ID{}); !errors.Is(err, workloadapi.ErrNoIdentity) {
		t.Errorf("unentitled workload: %v, want ErrNoIdentity", err)
	}
	if _, err := h.m.FetchJWTSVIDs(ctx, ws, []string{"x"}, spiffeid.RequireFromString("spiffe://example.org/zzz")); !errors.Is(err, workloadapi.ErrNoIdentity) {
		t.Errorf("unknown ID: %v, want ErrNoIdentity", err)
	}
}

func TestConcurrentJWTMissesShareOneCall(t *testing.T) {
	h := start(t, Config{}, workloadEntry("e-a", "/a", 1, "unix:uid:1000"))
	<-h.m.Ready()
	gate := make(chan struct{})
	h.fake.mu.Lock()
	h.fake.jwtGate = gate
	h.fake.mu.Unlock()
	const callers = 8
	type res struct {
		tok string
		err error
	}
	results := make(chan res, callers)
	for range callers {
		go func() {
			out, err := h.m.FetchJWTSVIDs(context.Background(), sels("unix:uid:1000"), []string{"db"}, spiffeid.ID{})
			if err != nil {
				results <- res{err: err}
				return
			}
			results <- res{tok: out[0].Token}
		}()
	}
	waitState(t, h.m, "every caller waiting on one call", func(State) bool {
		h.m.jwt.mu.Lock()
		defer h.m.jwt.mu.Unlock()
		for _, c := range h.m.jwt.inflight {
			return c.waiters == callers-1
		}
		return false
	})
	close(gate)
	var first string
	for range callers {
		r := <-results
		if r.err != nil {
			t.Fatal(r.err)
		}
		if first == "" {
			first = r.tok
		}
		if r.tok != first {
			t.Error("callers got different tokens")
		}
	}
	if n := h.fake.jwtCalls.Load(); n != 1 {
		t.Errorf("%d server calls for %d concurrent misses, want 1", n, callers)
	}
}

func TestJWTCacheExpiry(t *testing.T) {
	c := newJWTCache(10)
	now := time.Now()
	c.put("k", "e", workloadapi.JWTSVID{Token: "t"}, now.Add(time.Minute))
	if _, ok := c.get("k", now); !ok {
		t.Error("fresh token missed")
	}
	if _, ok := c.get("k", now.Add(time.Minute)); ok {
		t.Error("token past its refresh time was served")
	}
	if c.len() != 0 {
		t.Error("stale token kept")
	}
}

func TestMatches(t *testing.T) {
	for _, tc := range []struct {
		name     string
		entry    []string
		workload []string
		want     bool
	}{
		{"equal sets", []string{"unix:uid:1000"}, []string{"unix:uid:1000"}, true},
		{"subset", []string{"unix:uid:1000"}, []string{"unix:uid:1000", "unix:gid:5"}, true},
		{"superset", []string{"unix:uid:1000", "unix:gid:5"}, []string{"unix:uid:1000"}, false},
		{"disjoint", []string{"unix:uid:1000"}, []string{"unix:uid:1001"}, false},
		{"type matters", []string{"unix:uid:1000"}, []string{"k8s:uid:1000"}, false},
		{"no entry selectors match nothing", nil, []string{"unix:uid:1000"}, false},
		{"no workload selectors", []string{"unix:uid:1000"}, nil, false},
		{"value is exact", []string{"unix:path:/bin/a"}, []string{"unix:path:/bin/ab"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := matches(sels(tc.entry...), selectorSet(sels(tc.workload...))); got != tc.want {
				t.Errorf("matches = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestSelectorUse(t *testing.T) {
	h := start(t, Config{}, workloadEntry("e-a", "/a", 1, "unix:uid:1000"))
	<-h.m.Synced()
	if h.m.UsesPathSelectors() || h.m.UsesSHA256Selectors() {
		t.Fatal("no entry uses path or sha256 selectors yet")
	}
	h.fake.upsert(workloadEntry("e-b", "/b", 1, "unix:sha256:abcd"))
	waitState(t, h.m, "sha256 in use", func(State) bool { return h.m.UsesSHA256Selectors() })
	if h.m.UsesPathSelectors() {
		t.Error("UsesPathSelectors with no unix:path entry")
	}
	h.fake.upsert(workloadEntry("e-c", "/c", 1, "unix:path:/usr/bin/x"))
	waitState(t, h.m, "path in use", func(State) bool { return h.m.UsesPathSelectors() })
	h.fake.remove("e-b", "e-c")
	waitState(t, h.m, "neither in use", func(State) bool { return !h.m.UsesPathSelectors() && !h.m.UsesSHA256Selectors() })
}

func TestNewRejectsBadConfig(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no trust domain", Config{}, "trust domain"},
		{"batch too large", Config{TrustDomain: testTD, BatchSize: 1001}, "batch size"},
		{"negative batch", Config{TrustDomain: testTD, BatchSize: -1}, "batch size"},
		{"jitter too large", Config{TrustDomain: testTD, RotationJitter: 0.6}, "jitter"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("New: %v, want an error about %q", err, tc.want)
			}
		})
	}
	m, err := New(Config{TrustDomain: testTD})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := m.Run(ctx); err != nil {
		t.Errorf("Run: %v", err)
	}
	if err := m.Run(ctx); err == nil {
		t.Error("second Run succeeded")
	}
}

func TestBundleFromProto(t *testing.T) {
	f := newFakeServer(t)
	good := f.bundleLocked()
	for _, tc := range []struct {
		name   string
		mutate func(b *agentv1.Bundle)
		want   string
	}{
		{"good", func(*agentv1.Bundle) {}, ""},
		{"other trust domain", func(b *agentv1.Bundle) { b.TrustDomain = "evil.org" }, "trust domain"},
		{"no authorities", func(b *agentv1.Bundle) { b.X509Authorities = nil }, "no X.509"},
		{"garbage authority", func(b *agentv1.Bundle) { b.X509Authorities = [][]byte{{1, 2, 3}} }, "parsing bundle X.509"},
		{"garbage JWT key", func(b *agentv1.Bundle) { b.JwtAuthorities[0].PublicKey = []byte{1} }, "JWT authority"},
		{"JWT key without ID", func(b *agentv1.Bundle) { b.JwtAuthorities[0].KeyId = "" }, "key ID"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := &agentv1.Bundle{TrustDomain: good.TrustDomain, X509Authorities: good.X509Authorities, SequenceNumber: 3,
				JwtAuthorities: []*agentv1.JWTAuthority{{KeyId: good.JwtAuthorities[0].KeyId, PublicKey: good.JwtAuthorities[0].PublicKey}}}
			tc.mutate(b)
			got, err := BundleFromProto(testTD, b)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				if seq, _ := got.SequenceNumber(); seq != 3 || len(got.JWTAuthorities()) != 1 || len(got.X509Authorities()) != 1 {
					t.Errorf("converted bundle: seq %d, %d JWT, %d X.509", seq, len(got.JWTAuthorities()), len(got.X509Authorities()))
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("BundleFromProto: %v, want an error about %q", err, tc.want)
			}
		})
	}
}

func TestInvalidEntriesAreIgnored(t *testing.T) {
	h := start(t, Config{},
		workloadEntry("e-a", "/a", 1, "unix:uid:1000"),
		&agentv1.Entry{Id: "e-foreign", SpiffeId: "spiffe://other.org/x", ParentId: testAgentID, Selectors: []*agentv1.Selector{{Type: "unix", Value: "uid:1000"}}},
		&agentv1.Entry{Id: "e-bad", SpiffeId: "not a spiffe id", ParentId: testAgentID, Selectors: []*agentv1.Selector{{Type: "unix", Value: "uid:1000"}}},
		&agentv1.Entry{Id: "e-emptysel", SpiffeId: "spiffe://example.org/e", ParentId: testAgentID, Selectors: []*agentv1.Selector{{Type: "unix"}}},
	)
	sub := subscribe(t, h.m, "unix:uid:1000")
	waitSnap(t, sub, "only /a", hasIDs("/a"))
	if st := h.m.State(); st.Entries != 1 {
		t.Errorf("State().Entries = %d, want 1", st.Entries)
	}
	// An update that makes a known entry unusable drops its old version.
	h.fake.upsert(&agentv1.Entry{Id: "e-a", SpiffeId: "spiffe://other.org/a", ParentId: testAgentID, RevisionNumber: 2, Selectors: []*agentv1.Selector{{Type: "unix", Value: "uid:1000"}}})
	waitSnap(t, sub, "no SVIDs", hasIDs())
}
