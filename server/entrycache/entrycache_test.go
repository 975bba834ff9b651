package entrycache_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ironroot/ironroot/server/entrycache"
	"github.com/ironroot/ironroot/server/store"
)

const td = "spiffe://example.org"

var (
	serverID = spiffeid.RequireFromString(td + "/ironroot/server")
	agentA   = spiffeid.RequireFromString(td + "/ironroot/agent/tpm/aaaa")
	agentB   = spiffeid.RequireFromString(td + "/ironroot/agent/tpm/bbbb")
)

func openStore(t testing.TB) *store.SQLStore {
	t.Helper()
	s, err := store.OpenSQLite(context.Background(), filepath.Join(t.TempDir(), "db.sqlite"))
	if err != nil {
		t.Fatalf("OpenSQLite: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func newCache(t testing.TB, s store.Store) *entrycache.Cache {
	t.Helper()
	c, err := entrycache.New(context.Background(), s, serverID)
	if err != nil {
		t.Fatalf("entrycache.New: %v", err)
	}
	t.Cleanup(c.Close)
	return c
}

func sels(t testing.TB, ss ...string) []store.Selector {
	t.Helper()
	out := make([]store.Selector, len(ss))
	for i, s := range ss {
		sel, err := store.ParseSelector(s)
		if err != nil {
			t.Fatal(err)
		}
		out[i] = sel
	}
	return out
}

// create stores an entry with SPIFFE ID td+path under parent and returns its ID.
func create(t testing.TB, s store.Store, path, parent string, ss ...string) string {
	t.Helper()
	e, err := s.CreateEntry(context.Background(), &store.Entry{SPIFFEID: td + path, ParentID: parent, Selectors: sels(t, ss...)})
	if err != nil {
		t.Fatalf("CreateEntry(%s): %v", path, err)
	}
	return e.ID
}

func spiffeIDs(es []*store.Entry) []string {
	out := []string{}
	for _, e := range es {
		out = append(out, e.SPIFFEID[len(td):])
	}
	sort.Strings(out)
	return out
}

func TestAuthorized(t *testing.T) {
	s := openStore(t)
	a, b, srv := agentA.String(), agentB.String(), serverID.String()

	// Direct children of each agent.
	create(t, s, "/web", a, "unix:uid:1000")
	create(t, s, "/db", b, "unix:uid:999")
	// Node aliases.
	create(t, s, "/alias/ibm", srv, "tpm:manufacturer:IBM")
	create(t, s, "/alias/ibm-sb", srv, "tpm:manufacturer:IBM", "tpm:secure_boot:enabled")
	create(t, s, "/alias/nuvoton", srv, "tpm:manufacturer:NTC")
	// Entries under aliases, and a chain below them.
	create(t, s, "/ibm-workload", td+"/alias/ibm", "unix:uid:1")
	create(t, s, "/sb-workload", td+"/alias/ibm-sb", "unix:uid:2")
	create(t, s, "/ntc-workload", td+"/alias/nuvoton", "unix:uid:3")
	create(t, s, "/chain1", td+"/web", "k:v1")
	create(t, s, "/chain2", td+"/chain1", "k:v2")
	// A cycle: loop1 -> loop2 -> loop1, reachable from agent B only.
	create(t, s, "/loop1", b, "k:l1")
	create(t, s, "/loop2", td+"/loop1", "k:l2")
	create(t, s, "/loop1", td+"/loop2", "k:l3")
	// One SPIFFE ID under two parents, only one of them authorized for B.
	create(t, s, "/shared", td+"/nobody", "k:s1")
	create(t, s, "/shared", b, "k:s2")
	create(t, s, "/under-shared", td+"/shared", "k:s3")
	// Unreachable: parent nobody is authorized for.
	create(t, s, "/orphan", td+"/nobody", "k:o")
	// An entry that names the server ID must not open up every alias.
	create(t, s, "/ironroot/server", a, "k:srv")

	c := newCache(t, s)
	tests := []struct {
		name  string
		agent spiffeid.ID
		node  []string
		want  []string
	}{
		{"direct and transitive chain", agentA, nil,
			[]string{"/chain1", "/chain2", "/ironroot/server", "/web"}},
		{"alias subset", agentA, []string{"tpm:manufacturer:IBM", "tpm:ek_hash:aaaa"},
			[]string{"/alias/ibm", "/chain1", "/chain2", "/ibm-workload", "/ironroot/server", "/web"}},
		{"both aliases", agentA, []string{"tpm:manufacturer:IBM", "tpm:secure_boot:enabled", "tpm:manufacturer:IBM"},
			[]string{"/alias/ibm", "/alias/ibm-sb", "/chain1", "/chain2", "/ibm-workload", "/ironroot/server", "/sb-workload", "/web"}},
		{"alias not subset", agentB, []string{"tpm:secure_boot:enabled"},
			[]string{"/db", "/loop1", "/loop1", "/loop2", "/shared", "/under-shared"}},
		{"cycle terminates", agentB, []string{"tpm:manufacturer:NTC"},
			[]string{"/alias/nuvoton", "/db", "/loop1", "/loop1", "/loop2", "/ntc-workload", "/shared", "/under-shared"}},
		{"unknown agent", spiffeid.RequireFromString(td + "/ironroot/agent/tpm/cccc"), nil, []string{}},
		{"unknown agent via alias only", spiffeid.RequireFromString(td + "/ironroot/agent/tpm/cccc"), []string{"tpm:manufacturer:NTC"},
			[]string{"/alias/nuvoton", "/ntc-workload"}},
		{"server ID as agent", serverID, []string{"tpm:manufacturer:IBM"}, []string{}},
		{"zero agent", spiffeid.ID{}, nil, []string{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := c.Authorized(tt.agent, sels(t, tt.node...))
			if ids := spiffeIDs(got); !reflect.DeepEqual(ids, tt.want) {
				t.Fatalf("Authorized = %v, want %v", ids, tt.want)
			}
			for _, e := range got {
				if e.SPIFFEID == td+"/orphan" {
					t.Fatal("orphan entry returned")
				}
			}
			seen := map[string]bool{}
			for _, e := range got {
				if seen[e.ID] {
					t.Fatalf("entry %s returned twice", e.SPIFFEID)
				}
				seen[e.ID] = true
			}
		})
	}

	// AuthorizedEntry agrees with Authorized for every entry and every case.
	all, _, err := s.ListEntries(context.Background(), store.ListEntriesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range tests {
		node := sels(t, tt.node...)
		want := map[string]bool{}
		for _, e := range c.Authorized(tt.agent, node) {
			want[e.ID] = true
		}
		for _, e := range all {
			got, ok := c.AuthorizedEntry(tt.agent, node, e.ID)
			if ok != want[e.ID] || (ok && got.ID != e.ID) {
				t.Errorf("%s: AuthorizedEntry(%s) = %v, Authorized says %v", tt.name, e.SPIFFEID, ok, want[e.ID])
			}
		}
		if _, ok := c.AuthorizedEntry(tt.agent, node, "no-such-entry"); ok {
			t.Errorf("%s: missing entry authorized", tt.name)
		}
	}
}

// TestFollowsStore checks that creates, updates and deletes made through the
// store reach the cache via Run, that subscribers are woken, and that the
// diff of an agent's set tells what changed.
func TestFollowsStore(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	s := openStore(t)
	a := agentA.String()
	create(t, s, "/web", a, "unix:uid:1")
	c := newCache(t, s)
	runErr := make(chan error, 1)
	go func() { runErr <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-runErr; !errors.Is(err, context.Canceled) {
			t.Errorf("Run returned %v, want context.Canceled", err)
		}
	})
	notify, unsub := c.Subscribe()
	defer unsub()

	// wait blocks until the cache has applied the store's latest event; the
	// deadline only turns a hang into a failure, it times nothing.
	wait := func() {
		t.Helper()
		want, err := s.LatestEventID(ctx)
		if err != nil {
			t.Fatal(err)
		}
		deadline := time.After(30 * time.Second)
		for c.LastEventID() < want {
			select {
			case <-notify:
			case <-deadline:
				t.Fatalf("cache stuck at event %d, store at %d", c.LastEventID(), want)
			}
		}
	}

	prev := c.Authorized(agentA, nil)
	if len(prev) != 1 {
		t.Fatalf("initial set = %v", spiffeIDs(prev))
	}

	// Create.
	apiID := create(t, s, "/api", a, "unix:uid:2")
	wait()
	next := c.Authorized(agentA, nil)
	added, updated, removed := entrycache.Diff(prev, next)
	if len(added) != 1 || added[0].ID != apiID || len(updated) != 0 || len(removed) != 0 {
		t.Fatalf("after create: diff = +%v ~%v -%v", spiffeIDs(added), spiffeIDs(updated), spiffeIDs(removed))
	}
	prev = next

	// Update.
	e, _ := c.Entry(apiID)
	upd := e.Clone()
	upd.Hint = "api"
	if _, err := s.UpdateEntry(ctx, upd); err != nil {
		t.Fatal(err)
	}
	wait()
	next = c.Authorized(agentA, nil)
	added, updated, removed = entrycache.Diff(prev, next)
	if len(added) != 0 || len(updated) != 1 || updated[0].Hint != "api" || updated[0].RevisionNumber != 1 || len(removed) != 0 {
		t.Fatalf("after update: diff = +%v ~%v -%v", spiffeIDs(added), spiffeIDs(updated), spiffeIDs(removed))
	}
	prev = next

	// Reparent away from the agent: it leaves A's set, enters B's.
	upd = updated[0].Clone()
	upd.ParentID = agentB.String()
	if _, err := s.UpdateEntry(ctx, upd); err != nil {
		t.Fatal(err)
	}
	wait()
	next = c.Authorized(agentA, nil)
	_, _, removed = entrycache.Diff(prev, next)
	if len(removed) != 1 || removed[0].ID != apiID {
		t.Fatalf("after reparent: removed = %v", spiffeIDs(removed))
	}
	if got := spiffeIDs(c.Authorized(agentB, nil)); !reflect.DeepEqual(got, []string{"/api"}) {
		t.Fatalf("agent B after reparent = %v", got)
	}
	prev = next

	// Delete, and a batch.
	if _, err := s.DeleteEntry(ctx, apiID); err != nil {
		t.Fatal(err)
	}
	batch := make([]*store.Entry, 50)
	for i := range batch {
		batch[i] = &store.Entry{SPIFFEID: fmt.Sprintf("%s/b%d", td, i), ParentID: a, Selectors: sels(t, "unix:uid:5")}
	}
	if _, err := s.CreateEntries(ctx, batch); err != nil {
		t.Fatal(err)
	}
	wait()
	if c.Len() != 51 {
		t.Fatalf("cache has %d entries, want 51", c.Len())
	}
	if _, ok := c.Entry(apiID); ok {
		t.Fatal("deleted entry still cached")
	}
	next = c.Authorized(agentA, nil)
	added, _, removed = entrycache.Diff(prev, next)
	if len(added) != 50 || len(removed) != 0 {
		t.Fatalf("after batch: +%d -%d", len(added), len(removed))
	}

	// Node events wake subscribers and bump the revision, without changing entries.
	rev := c.Revision()
	if _, err := s.UpsertNode(ctx, &store.Node{SPIFFEID: a}); err != nil {
		t.Fatal(err)
	}
	wait()
	if c.Revision() <= rev {
		t.Fatalf("revision %d did not increase after a node event (was %d)", c.Revision(), rev)
	}
}

// TestReloadAfterPrune checks that a cache that fell behind the pruned event
// feed rebuilds itself from a full listing.
func TestReloadAfterPrune(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	c := newCache(t, s)
	id := create(t, s, "/web", agentA.String(), "unix:uid:1")
	create(t, s, "/api", agentA.String(), "unix:uid:2")
	if _, err := s.DeleteEntry(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PruneEvents(ctx, time.Now().Add(time.Hour), 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Refresh(ctx); err != nil {
		t.Fatalf("Refresh after prune: %v", err)
	}
	if got := spiffeIDs(c.Authorized(agentA, nil)); !reflect.DeepEqual(got, []string{"/api"}) {
		t.Fatalf("after reload = %v, want [/api]", got)
	}
	if c.LastEventID() != 3 {
		t.Fatalf("LastEventID = %d, want 3", c.LastEventID())
	}
}

func TestNewErrors(t *testing.T) {
	s := openStore(t)
	if _, err := entrycache.New(context.Background(), nil, serverID); err == nil {
		t.Fatal("nil store accepted")
	}
	if _, err := entrycache.New(context.Background(), s, spiffeid.ID{}); err == nil {
		t.Fatal("zero server ID accepted")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := entrycache.New(context.Background(), s, serverID); err == nil {
		t.Fatal("closed store accepted")
	}
}

func TestDiff(t *testing.T) {
	t0 := time.Unix(100, 0)
	e := func(id string, rev int64, at time.Time) *store.Entry {
		return &store.Entry{ID: id, RevisionNumber: rev, UpdatedAt: at}
	}
	ids := func(es []*store.Entry) []string {
		out := []string{}
		for _, e := range es {
			out = append(out, e.ID)
		}
		return out
	}
	tests := []struct {
		name                    string
		prev, next              []*store.Entry
		added, updated, removed []string
	}{
		{"empty", nil, nil, []string{}, []string{}, []string{}},
		{"all new", nil, []*store.Entry{e("b", 0, t0), e("a", 0, t0)}, []string{"a", "b"}, []string{}, []string{}},
		{"all gone", []*store.Entry{e("a", 0, t0)}, nil, []string{}, []string{}, []string{"a"}},
		{"revision", []*store.Entry{e("a", 0, t0), e("b", 1, t0)}, []*store.Entry{e("a", 1, t0), e("b", 1, t0)}, []string{}, []string{"a"}, []string{}},
		{"recreated same id", []*store.Entry{e("a", 0, t0)}, []*store.Entry{e("a", 0, t0.Add(time.Second))}, []string{}, []string{"a"}, []string{}},
		{"mixed", []*store.Entry{e("a", 0, t0), e("b", 0, t0)}, []*store.Entry{e("b", 2, t0), e("c", 0, t0)}, []string{"c"}, []string{"b"}, []string{"a"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, u, r := entrycache.Diff(tt.prev, tt.next)
			if !reflect.DeepEqual(ids(a), tt.added) || !reflect.DeepEqual(ids(u), tt.updated) || !reflect.DeepEqual(ids(r), tt.removed) {
				t.Fatalf("Diff = +%v ~%v -%v, want +%v ~%v -%v", ids(a), ids(u), ids(r), tt.added, tt.updated, tt.removed)
			}
		})
	}
}

// TestConcurrentReadersAndWriter runs Authorized from many goroutines while
// the store is written and the cache follows; -race checks the locking.
func TestConcurrentReadersAndWriter(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	s := openStore(t)
	create(t, s, "/alias", serverID.String(), "tpm:manufacturer:IBM")
	c := newCache(t, s)
	runErr := make(chan error, 1)
	go func() { runErr <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-runErr
	})

	node := sels(t, "tpm:manufacturer:IBM")
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				for _, e := range c.Authorized(agentA, node) {
					if e.ParentID != agentA.String() && e.ParentID != serverID.String() && e.ParentID != td+"/alias" {
						t.Errorf("unauthorized entry %s under %s", e.SPIFFEID, e.ParentID)
						return
					}
				}
			}
		}()
	}
	for i := range 40 {
		parent := agentA.String()
		switch i % 3 {
		case 1:
			parent = td + "/alias"
		case 2:
			parent = agentB.String()
		}
		id := create(t, s, fmt.Sprintf("/w%d", i), parent, "unix:uid:1")
		if i%5 == 0 {
			if _, err := s.DeleteEntry(ctx, id); err != nil {
				t.Fatal(err)
			}
		}
	}
	close(stop)
	wg.Wait()
	if err := c.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	// 1 alias + 40 created - 8 deleted.
	if c.Len() != 33 {
		t.Fatalf("cache has %d entries, want 33", c.Len())
	}
	got := c.Authorized(agentA, node)
	// Agent A: alias + A's (i%3==0: 14, minus deleted i in {0,15,30}) + alias's (i%3==1: 13, minus deleted {10,25}).
	if len(got) != 1+11+11 {
		t.Fatalf("agent A authorized for %d entries, want 23", len(got))
	}
}

func TestNodeRevision(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	c := newCache(t, s)
	node := func(id spiffeid.ID, serial string) *store.Node {
		return &store.Node{SPIFFEID: id.String(), EKHash: id.Path()[len("/ironroot/agent/tpm/"):], CertSerial: serial}
	}
	steps := []struct {
		name        string
		act         func() error
		wantChanged bool // did agent A's NodeRevision move past the previous revision?
	}{
		{"A attests", func() error { _, err := s.UpsertNode(ctx, node(agentA, "1")); return err }, true},
		{"B attests", func() error { _, err := s.UpsertNode(ctx, node(agentB, "1")); return err }, false},
		{"an entry is created", func() error { create(t, s, "/web", agentA.String(), "unix:uid:1"); return nil }, false},
		{"A re-attests", func() error { _, err := s.UpsertNode(ctx, node(agentA, "2")); return err }, true},
		{"B is banned", func() error { _, err := s.BanNode(ctx, agentB.String()); return err }, false},
		{"A is banned", func() error { _, err := s.BanNode(ctx, agentA.String()); return err }, true},
		{"A is evicted", func() error { return s.DeleteNode(ctx, agentA.String()) }, true},
		{"events are pruned: a reload marks every node changed", func() error {
			create(t, s, "/api", agentB.String(), "unix:uid:2")
			_, err := s.PruneEvents(ctx, time.Now().Add(time.Hour), 0)
			return err
		}, true},
	}
	for _, st := range steps {
		before := c.Revision()
		if err := st.act(); err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		if err := c.Refresh(ctx); err != nil {
			t.Fatalf("%s: Refresh: %v", st.name, err)
		}
		if c.Revision() <= before {
			t.Fatalf("%s: cache revision did not move", st.name)
		}
		if changed := c.NodeRevision(agentA.String()) > before; changed != st.wantChanged {
			t.Errorf("%s: NodeRevision(A) moved = %t, want %t", st.name, changed, st.wantChanged)
		}
	}
}

func TestChangedSince(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	c, err := entrycache.New(ctx, s, serverID, entrycache.WithHistory(16, 1000))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	start := c.Revision()
	a := create(t, s, "/a", agentA.String(), "unix:uid:1")
	b := create(t, s, "/b", "spiffe://example.org/a", "unix:uid:2")
	if err := c.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	mid := c.Revision()
	if _, err := s.DeleteEntry(ctx, a); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UpsertNode(ctx, &store.Node{SPIFFEID: agentB.String(), EKHash: "bbbb"}); err != nil {
		t.Fatal(err)
	}
	if err := c.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		rev  uint64
		want []string
	}{
		{"from the start", start, []string{a, b}},
		{"after the creations", mid, []string{a}},
		{"up to date", c.Revision(), nil},
	}
	for _, tc := range tests {
		ids, upTo, ok := c.ChangedSince(tc.rev)
		sort.Strings(ids)
		want := append([]string(nil), tc.want...)
		sort.Strings(want)
		if !ok || upTo != c.Revision() || !reflect.DeepEqual(ids, want) && len(want)+len(ids) > 0 {
			t.Errorf("%s: ChangedSince = %v, %d, %t; want %v, %d, true", tc.name, ids, upTo, ok, want, c.Revision())
		}
	}
	if !c.HasChildren("spiffe://example.org/a") || c.HasChildren("spiffe://example.org/b") {
		t.Error("HasChildren: /a parents /b, /b parents nothing")
	}

	// History is bounded: a caller further behind must recompute.
	for i := range 20 {
		create(t, s, fmt.Sprintf("/h%d", i), agentA.String(), "unix:uid:3")
		if err := c.Refresh(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, ok := c.ChangedSince(mid); ok {
		t.Error("ChangedSince a revision older than the kept history claims to know the changes")
	}
	recent := c.Revision() - 10
	if ids, _, ok := c.ChangedSince(recent); !ok || len(ids) != 10 {
		t.Errorf("ChangedSince 10 revisions back = %d IDs, %t; want 10, true", len(ids), ok)
	}

	// The bound on IDs trims too.
	c2, err := entrycache.New(ctx, s, serverID, entrycache.WithHistory(100, 3))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c2.Close)
	revs := []uint64{c2.Revision()}
	for i := range 4 {
		create(t, s, fmt.Sprintf("/i%d", i), agentA.String(), "unix:uid:5")
		if err := c2.Refresh(ctx); err != nil {
			t.Fatal(err)
		}
		revs = append(revs, c2.Revision())
	}
	for i, want := range []bool{false, true, true, true, true} {
		if ids, _, ok := c2.ChangedSince(revs[i]); ok != want || ok && len(ids) != 4-i {
			t.Errorf("ChangedSince(revision %d of 5) with 3 IDs kept = %d IDs, %t; want %t", i, len(ids), ok, want)
		}
	}

	// A reload (events pruned) cannot list changes.
	before := c.Revision()
	create(t, s, "/x", agentA.String(), "unix:uid:4")
	if _, err := s.PruneEvents(ctx, time.Now().Add(time.Hour), 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if _, _, ok := c.ChangedSince(before); ok {
		t.Error("ChangedSince across a reload claims to know the changes")
	}
}
