package store_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ironroot/ironroot/server/store"
)

const (
	td       = "spiffe://example.org"
	serverID = td + "/ironroot/server"
	agentA   = td + "/ironroot/agent/tpm/aaaa"
	agentB   = td + "/ironroot/agent/tpm/bbbb"
)

func openStore(t testing.TB, path string, opts ...store.Option) *store.SQLStore {
	t.Helper()
	if path == "" {
		path = filepath.Join(t.TempDir(), "ironroot.db")
	}
	s, err := store.OpenSQLite(context.Background(), path, opts...)
	if err != nil {
		t.Fatalf("OpenSQLite: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func sels(t testing.TB, ss ...string) []store.Selector {
	t.Helper()
	out := make([]store.Selector, len(ss))
	for i, s := range ss {
		sel, err := store.ParseSelector(s)
		if err != nil {
			t.Fatalf("ParseSelector(%q): %v", s, err)
		}
		out[i] = sel
	}
	return out
}

func entry(t testing.TB, spiffeID, parentID string, ss ...string) *store.Entry {
	return &store.Entry{SPIFFEID: spiffeID, ParentID: parentID, Selectors: sels(t, ss...)}
}

func latest(t *testing.T, s store.Store) int64 {
	t.Helper()
	id, err := s.LatestEventID(context.Background())
	if err != nil {
		t.Fatalf("LatestEventID: %v", err)
	}
	return id
}

func TestParseSelector(t *testing.T) {
	tests := []struct {
		in      string
		want    store.Selector
		wantErr bool
	}{
		{in: "unix:uid:1000", want: store.Selector{Type: "unix", Value: "uid:1000"}},
		{in: "tpm:pcr:sha256:0:ab12", want: store.Selector{Type: "tpm", Value: "pcr:sha256:0:ab12"}},
		{in: "k8s:ns", want: store.Selector{Type: "k8s", Value: "ns"}},
		{in: "unix:path:/usr/bin/my app", want: store.Selector{Type: "unix", Value: "path:/usr/bin/my app"}},
		{in: "", wantErr: true},
		{in: "unix", wantErr: true},
		{in: ":value", wantErr: true},
		{in: "unix:", wantErr: true},
		{in: "unix:uid\x00", wantErr: true},
		{in: "unix:" + strings.Repeat("a", 2000), wantErr: true},
		{in: "unix:\xff", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := store.ParseSelector(tt.in)
			if tt.wantErr {
				if !errors.Is(err, store.ErrInvalid) {
					t.Fatalf("ParseSelector(%q) error = %v, want ErrInvalid", tt.in, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseSelector(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Fatalf("ParseSelector(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
			if got.String() != tt.in {
				t.Fatalf("String() = %q, want %q", got.String(), tt.in)
			}
		})
	}
}

func TestMigrations(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "db.sqlite")

	s, err := store.OpenSQLite(ctx, path)
	if err != nil {
		t.Fatalf("fresh open: %v", err)
	}
	v, err := s.SchemaVersion(ctx)
	if err != nil || v != 1 {
		t.Fatalf("fresh schema version = %d, %v; want 1", v, err)
	}
	var mode string
	if err := s.DB().QueryRowContext(ctx, `PRAGMA journal_mode`).Scan(&mode); err != nil || mode != "wal" {
		t.Fatalf("journal_mode = %q, %v; want wal", mode, err)
	}
	var fk int
	if err := s.DB().QueryRowContext(ctx, `PRAGMA foreign_keys`).Scan(&fk); err != nil || fk != 1 {
		t.Fatalf("foreign_keys = %d, %v; want 1", fk, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// Reopening applies nothing twice.
	s, err = store.OpenSQLite(ctx, path)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	var rows int
	if err := s.DB().QueryRowContext(ctx, `SELECT COUNT(*) FROM schema_version`).Scan(&rows); err != nil || rows != 1 {
		t.Fatalf("schema_version rows = %d, %v; want 1", rows, err)
	}
	// A newer binary wrote this database: refuse it.
	if _, err := s.DB().ExecContext(ctx, `INSERT INTO schema_version (version, applied_at) VALUES (99, 0)`); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := store.OpenSQLite(ctx, path); !errors.Is(err, store.ErrSchemaTooNew) {
		t.Fatalf("open of newer schema: err = %v, want ErrSchemaTooNew", err)
	}
}

func TestOpenBadPath(t *testing.T) {
	for _, p := range []string{"", ":memory:", "/tmp/x?mode=ro", filepath.Join(t.TempDir(), "missing-dir", "db")} {
		t.Run(p, func(t *testing.T) {
			if s, err := store.OpenSQLite(context.Background(), p); err == nil {
				_ = s.Close()
				t.Fatalf("OpenSQLite(%q) succeeded, want error", p)
			}
		})
	}
}

func TestNodeLifecycle(t *testing.T) {
	ctx := context.Background()
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	s := openStore(t, "", store.WithClock(clock))

	n := &store.Node{
		SPIFFEID: agentA, EKHash: "aaaa",
		Selectors:    sels(t, "tpm:manufacturer:IBM", "tpm:ek_hash:aaaa", "tpm:manufacturer:IBM"),
		Evidence:     []byte(`{"manufacturer":"IBM"}`),
		CertSerial:   "1234",
		CertNotAfter: now.Add(time.Hour),
		Clock:        []byte(`{"reset_count":1}`),
	}
	got, err := s.UpsertNode(ctx, n)
	if err != nil {
		t.Fatalf("UpsertNode: %v", err)
	}
	if want := sels(t, "tpm:ek_hash:aaaa", "tpm:manufacturer:IBM"); !reflect.DeepEqual(got.Selectors, want) {
		t.Fatalf("selectors = %v, want sorted, deduplicated %v", got.Selectors, want)
	}
	created := got.CreatedAt
	if !created.Equal(now) {
		t.Fatalf("CreatedAt = %v, want %v", created, now)
	}

	// Re-attestation replaces selectors, evidence, serial and clock; keeps CreatedAt.
	now = now.Add(time.Minute)
	n2 := &store.Node{SPIFFEID: agentA, EKHash: "aaaa", Selectors: sels(t, "tpm:ek_hash:aaaa", "tpm:secure_boot:enabled"),
		Evidence: []byte(`{"v":2}`), CertSerial: "5678", CertNotAfter: now.Add(time.Hour), Clock: []byte(`{"reset_count":2}`)}
	if _, err := s.UpsertNode(ctx, n2); err != nil {
		t.Fatalf("re-attest UpsertNode: %v", err)
	}
	got, err = s.GetNode(ctx, agentA)
	if err != nil {
		t.Fatalf("GetNode: %v", err)
	}
	if !got.CreatedAt.Equal(created) || !got.UpdatedAt.Equal(now) {
		t.Fatalf("times = %v/%v, want created %v updated %v", got.CreatedAt, got.UpdatedAt, created, now)
	}
	if got.CertSerial != "5678" || string(got.Evidence) != `{"v":2}` || string(got.Clock) != `{"reset_count":2}` ||
		!reflect.DeepEqual(got.Selectors, n2.Selectors) || !got.CertNotAfter.Equal(n2.CertNotAfter) {
		t.Fatalf("re-attested node = %+v, want fields of %+v", got, n2)
	}

	// Selector filters see the replaced selectors only.
	list, _, err := s.ListNodes(ctx, store.ListNodesRequest{BySelectors: &store.SelectorFilter{
		Selectors: sels(t, "tpm:manufacturer:IBM"), Match: store.MatchSuperset}})
	if err != nil || len(list) != 0 {
		t.Fatalf("old selector still matches: %d nodes, %v", len(list), err)
	}

	// Ban: serial cleared, re-attestation refused.
	before := latest(t, s)
	banned, err := s.BanNode(ctx, agentA)
	if err != nil {
		t.Fatalf("BanNode: %v", err)
	}
	if !banned.Banned || banned.CertSerial != "" {
		t.Fatalf("banned node = banned %v serial %q, want banned and empty serial", banned.Banned, banned.CertSerial)
	}
	if latest(t, s) != before+1 {
		t.Fatalf("ban appended %d events, want 1", latest(t, s)-before)
	}
	if _, err := s.UpsertNode(ctx, n2); !errors.Is(err, store.ErrBanned) {
		t.Fatalf("UpsertNode of banned node: err = %v, want ErrBanned", err)
	}
	if got, _ := s.GetNode(ctx, agentA); got.CertSerial != "" || !got.Banned {
		t.Fatalf("refused re-attestation changed the node: %+v", got)
	}

	// Evict: record gone, fresh attestation allowed.
	if err := s.DeleteNode(ctx, agentA); err != nil {
		t.Fatalf("DeleteNode: %v", err)
	}
	if _, err := s.GetNode(ctx, agentA); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetNode after evict: %v, want ErrNotFound", err)
	}
	if err := s.DeleteNode(ctx, agentA); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("second DeleteNode: %v, want ErrNotFound", err)
	}
	if _, err := s.BanNode(ctx, agentA); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("BanNode of missing node: %v, want ErrNotFound", err)
	}
	again, err := s.UpsertNode(ctx, n)
	if err != nil || again.Banned {
		t.Fatalf("attest after evict: %+v, %v", again, err)
	}
	evs, err := s.Events(ctx, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	var ops []string
	for _, e := range evs {
		if e.Kind != store.EventNode || e.ObjectID != agentA {
			t.Fatalf("unexpected event %+v", e)
		}
		ops = append(ops, string(e.Op))
	}
	if want := []string{"create", "update", "ban", "delete", "create"}; !reflect.DeepEqual(ops, want) {
		t.Fatalf("node events = %v, want %v", ops, want)
	}
}

func TestUpsertNodeInvalid(t *testing.T) {
	s := openStore(t, "")
	tests := []struct {
		name string
		node *store.Node
	}{
		{"nil", nil},
		{"bad id", &store.Node{SPIFFEID: "not-an-id"}},
		{"uppercase td", &store.Node{SPIFFEID: "spiffe://EXAMPLE.org/x"}},
		{"bad ek hash", &store.Node{SPIFFEID: agentA, EKHash: "ABCD"}},
		{"bad selector", &store.Node{SPIFFEID: agentA, Selectors: []store.Selector{{Type: "tpm"}}}},
		{"huge evidence", &store.Node{SPIFFEID: agentA, Evidence: make([]byte, 2<<20)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := s.UpsertNode(context.Background(), tt.node); !errors.Is(err, store.ErrInvalid) {
				t.Fatalf("err = %v, want ErrInvalid", err)
			}
		})
	}
	if id := latest(t, s); id != 0 {
		t.Fatalf("invalid upserts appended events: latest = %d", id)
	}
}

func TestListNodes(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, "")
	for i := range 5 {
		id := fmt.Sprintf("%s/ironroot/agent/tpm/%04x", td, i)
		ss := sels(t, fmt.Sprintf("tpm:ek_hash:%04x", i), "tpm:manufacturer:IBM")
		if i%2 == 1 {
			ss = append(ss, store.Selector{Type: "tpm", Value: "secure_boot:enabled"})
		}
		if _, err := s.UpsertNode(ctx, &store.Node{SPIFFEID: id, Selectors: ss}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.BanNode(ctx, td+"/ironroot/agent/tpm/0003"); err != nil {
		t.Fatal(err)
	}
	yes, no := true, false
	tests := []struct {
		name string
		req  store.ListNodesRequest
		want int
	}{
		{"all", store.ListNodesRequest{}, 5},
		{"banned", store.ListNodesRequest{Banned: &yes}, 1},
		{"not banned", store.ListNodesRequest{Banned: &no}, 4},
		{"superset secure boot", store.ListNodesRequest{BySelectors: &store.SelectorFilter{Selectors: sels(t, "tpm:secure_boot:enabled"), Match: store.MatchSuperset}}, 2},
		{"subset", store.ListNodesRequest{BySelectors: &store.SelectorFilter{Selectors: sels(t, "tpm:ek_hash:0000", "tpm:manufacturer:IBM", "tpm:other:x"), Match: store.MatchSubset}}, 1},
		{"exact", store.ListNodesRequest{BySelectors: &store.SelectorFilter{Selectors: sels(t, "tpm:ek_hash:0002", "tpm:manufacturer:IBM"), Match: store.MatchExact}}, 1},
		{"any", store.ListNodesRequest{BySelectors: &store.SelectorFilter{Selectors: sels(t, "tpm:ek_hash:0002", "tpm:ek_hash:0004"), Match: store.MatchAny}}, 2},
		{"banned and secure boot", store.ListNodesRequest{Banned: &yes, BySelectors: &store.SelectorFilter{Selectors: sels(t, "tpm:secure_boot:enabled"), Match: store.MatchSuperset}}, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, next, err := s.ListNodes(ctx, tt.req)
			if err != nil {
				t.Fatalf("ListNodes: %v", err)
			}
			if len(got) != tt.want || next != "" {
				t.Fatalf("got %d nodes (next %q), want %d", len(got), next, tt.want)
			}
		})
	}
	// Pagination visits every node exactly once.
	seen := map[string]bool{}
	token := ""
	for pages := 0; ; pages++ {
		page, next, err := s.ListNodes(ctx, store.ListNodesRequest{PageSize: 2, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range page {
			if seen[n.SPIFFEID] {
				t.Fatalf("node %s listed twice", n.SPIFFEID)
			}
			seen[n.SPIFFEID] = true
		}
		if next == "" {
			break
		}
		if pages > 5 {
			t.Fatal("pagination does not end")
		}
		token = next
	}
	if len(seen) != 5 {
		t.Fatalf("pagination saw %d nodes, want 5", len(seen))
	}
}

func TestEntryValidation(t *testing.T) {
	s := openStore(t, "")
	ok := func() *store.Entry { return entry(t, td+"/web", agentA, "unix:uid:1000") }
	tests := []struct {
		name   string
		mutate func(e *store.Entry)
	}{
		{"bad spiffe id", func(e *store.Entry) { e.SPIFFEID = "web" }},
		{"bad parent id", func(e *store.Entry) { e.ParentID = "spiffe://example.org/a/../b" }},
		{"other trust domain", func(e *store.Entry) { e.ParentID = "spiffe://other.org/agent" }},
		{"own parent", func(e *store.Entry) { e.ParentID = e.SPIFFEID }},
		{"no selectors", func(e *store.Entry) { e.Selectors = nil }},
		{"empty selector value", func(e *store.Entry) { e.Selectors = []store.Selector{{Type: "unix"}} }},
		{"negative ttl", func(e *store.Entry) { e.X509SVIDTTL = -1 }},
		{"bad dns", func(e *store.Entry) { e.DNSNames = []string{"bad name.example"} }},
		{"dns label dash", func(e *store.Entry) { e.DNSNames = []string{"-a.example"} }},
		{"hint control char", func(e *store.Entry) { e.Hint = "a\nb" }},
		{"bad entry id", func(e *store.Entry) { e.ID = "a/b" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := ok()
			tt.mutate(e)
			if _, err := s.CreateEntry(context.Background(), e); !errors.Is(err, store.ErrInvalid) {
				t.Fatalf("CreateEntry err = %v, want ErrInvalid", err)
			}
		})
	}
	if _, err := s.CreateEntry(context.Background(), &store.Entry{SPIFFEID: td + "/w", ParentID: agentA,
		Selectors: sels(t, "unix:uid:1"), DNSNames: []string{"*.example.org", "a-b.example"}}); err != nil {
		t.Fatalf("valid entry refused: %v", err)
	}
	if n := latest(t, s); n != 1 {
		t.Fatalf("latest event = %d, want 1 (only the valid entry)", n)
	}
}

func TestEntryCRUD(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, "")

	in := entry(t, td+"/web", agentA, "unix:uid:1000", "unix:gid:0", "unix:uid:1000")
	in.X509SVIDTTL, in.JWTSVIDTTL, in.DNSNames, in.Hint = 600, 60, []string{"web.example.org"}, "web"
	e, err := s.CreateEntry(ctx, in)
	if err != nil {
		t.Fatalf("CreateEntry: %v", err)
	}
	if len(e.ID) != 36 || e.RevisionNumber != 0 {
		t.Fatalf("created entry ID %q revision %d, want a UUID and 0", e.ID, e.RevisionNumber)
	}
	if want := sels(t, "unix:gid:0", "unix:uid:1000"); !reflect.DeepEqual(e.Selectors, want) {
		t.Fatalf("selectors = %v, want %v", e.Selectors, want)
	}
	got, err := s.GetEntry(ctx, e.ID)
	if err != nil {
		t.Fatalf("GetEntry: %v", err)
	}
	if !reflect.DeepEqual(got, e) {
		t.Fatalf("GetEntry = %+v\nwant %+v", got, e)
	}

	// Same SPIFFE ID, parent and selector set (in another order) exists already.
	dup := entry(t, td+"/web", agentA, "unix:gid:0", "unix:uid:1000")
	if _, err := s.CreateEntry(ctx, dup); !errors.Is(err, store.ErrAlreadyExists) {
		t.Fatalf("duplicate CreateEntry: %v, want ErrAlreadyExists", err)
	}
	// A caller-chosen ID that is taken.
	if _, err := s.CreateEntry(ctx, &store.Entry{ID: e.ID, SPIFFEID: td + "/x", ParentID: agentA, Selectors: sels(t, "unix:uid:1")}); !errors.Is(err, store.ErrAlreadyExists) {
		t.Fatalf("CreateEntry with taken ID: %v, want ErrAlreadyExists", err)
	}
	other, err := s.CreateEntry(ctx, entry(t, td+"/web", agentA, "unix:uid:1000"))
	if err != nil {
		t.Fatalf("entry with a different selector set: %v", err)
	}

	// Update: revision increments, fields replaced, CreatedAt kept.
	upd := e.Clone()
	upd.Selectors = sels(t, "unix:uid:2000")
	upd.DNSNames = nil
	upd.Hint = "web2"
	u, err := s.UpdateEntry(ctx, upd)
	if err != nil {
		t.Fatalf("UpdateEntry: %v", err)
	}
	if u.RevisionNumber != 1 || u.Hint != "web2" || u.DNSNames != nil || !u.CreatedAt.Equal(e.CreatedAt) {
		t.Fatalf("updated entry = %+v", u)
	}
	if got, _ := s.GetEntry(ctx, e.ID); !reflect.DeepEqual(got, u) {
		t.Fatalf("stored after update = %+v\nwant %+v", got, u)
	}
	// Selector index follows the update.
	found, _, err := s.ListEntries(ctx, store.ListEntriesRequest{BySelectors: &store.SelectorFilter{Selectors: sels(t, "unix:gid:0"), Match: store.MatchAny}})
	if err != nil || len(found) != 0 {
		t.Fatalf("old selector still indexed: %d entries, %v", len(found), err)
	}
	// Updating into another entry's identity is refused.
	clash := u.Clone()
	clash.Selectors = other.Selectors
	if _, err := s.UpdateEntry(ctx, clash); !errors.Is(err, store.ErrAlreadyExists) {
		t.Fatalf("clashing UpdateEntry: %v, want ErrAlreadyExists", err)
	}
	missing := u.Clone()
	missing.ID = "no-such-entry"
	if _, err := s.UpdateEntry(ctx, missing); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("UpdateEntry of missing: %v, want ErrNotFound", err)
	}
	if _, err := s.UpdateEntry(ctx, &store.Entry{SPIFFEID: td + "/x", ParentID: agentA, Selectors: sels(t, "a:b")}); !errors.Is(err, store.ErrInvalid) {
		t.Fatalf("UpdateEntry without ID: %v, want ErrInvalid", err)
	}

	// Delete.
	del, err := s.DeleteEntry(ctx, e.ID)
	if err != nil || del.ID != e.ID {
		t.Fatalf("DeleteEntry = %+v, %v", del, err)
	}
	if _, err := s.GetEntry(ctx, e.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetEntry after delete: %v, want ErrNotFound", err)
	}
	if _, err := s.DeleteEntry(ctx, e.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("second DeleteEntry: %v, want ErrNotFound", err)
	}
	var selRows int
	if err := s.DB().QueryRowContext(ctx, `SELECT COUNT(*) FROM entry_selectors WHERE entry_id = ?`, e.ID).Scan(&selRows); err != nil || selRows != 0 {
		t.Fatalf("deleted entry left %d selector rows (%v)", selRows, err)
	}

	evs, err := s.Events(ctx, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	var got2 []string
	for _, ev := range evs {
		got2 = append(got2, string(ev.Op)+" "+ev.ObjectID)
	}
	want := []string{"create " + e.ID, "create " + other.ID, "update " + e.ID, "delete " + e.ID}
	if !reflect.DeepEqual(got2, want) {
		t.Fatalf("events = %v, want %v (failed writes must append none)", got2, want)
	}
}

func TestCreateEntriesAllOrNothing(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name      string
		batch     func(t *testing.T) []*store.Entry
		wantIndex int
		wantErr   error
	}{
		{"invalid third", func(t *testing.T) []*store.Entry {
			return []*store.Entry{entry(t, td+"/a", agentA, "u:1"), entry(t, td+"/b", agentA, "u:2"), entry(t, "bad", agentA, "u:3")}
		}, 2, store.ErrInvalid},
		{"duplicate inside batch", func(t *testing.T) []*store.Entry {
			return []*store.Entry{entry(t, td+"/a", agentA, "u:1"), entry(t, td+"/a", agentA, "u:1")}
		}, 1, store.ErrAlreadyExists},
		{"nil entry", func(t *testing.T) []*store.Entry {
			return []*store.Entry{entry(t, td+"/a", agentA, "u:1"), nil}
		}, 1, store.ErrInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openStore(t, "")
			notify, cancel := s.Subscribe()
			defer cancel()
			_, err := s.CreateEntries(ctx, tt.batch(t))
			var be *store.BatchError
			if !errors.As(err, &be) || be.Index != tt.wantIndex || !errors.Is(err, tt.wantErr) {
				t.Fatalf("CreateEntries err = %v, want BatchError index %d wrapping %v", err, tt.wantIndex, tt.wantErr)
			}
			all, _, err := s.ListEntries(ctx, store.ListEntriesRequest{})
			if err != nil || len(all) != 0 {
				t.Fatalf("failed batch left %d entries (%v)", len(all), err)
			}
			if id := latest(t, s); id != 0 {
				t.Fatalf("failed batch left events up to %d", id)
			}
			select {
			case <-notify:
				t.Fatal("failed batch woke subscribers")
			default:
			}
		})
	}
	t.Run("good batch", func(t *testing.T) {
		s := openStore(t, "")
		batch := make([]*store.Entry, 100)
		for i := range batch {
			batch[i] = entry(t, fmt.Sprintf("%s/w%d", td, i), agentA, fmt.Sprintf("unix:uid:%d", i))
		}
		out, err := s.CreateEntries(ctx, batch)
		if err != nil || len(out) != 100 {
			t.Fatalf("CreateEntries = %d, %v", len(out), err)
		}
		if id := latest(t, s); id != 100 {
			t.Fatalf("latest event = %d, want 100", id)
		}
	})
}

func TestListEntries(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, "")
	mk := func(id, parent string, ss ...string) *store.Entry {
		e, err := s.CreateEntry(ctx, entry(t, td+id, parent, ss...))
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	a := mk("/a", agentA, "unix:uid:1")
	b := mk("/b", agentA, "unix:uid:1", "unix:gid:1")
	c := mk("/c", agentB, "unix:uid:2")
	alias := mk("/alias", serverID, "tpm:manufacturer:IBM")
	ids := func(es []*store.Entry) map[string]bool {
		m := map[string]bool{}
		for _, e := range es {
			m[e.ID] = true
		}
		return m
	}
	set := func(es ...*store.Entry) map[string]bool { return ids(es) }
	filter := func(m store.MatchMode, ss ...string) *store.SelectorFilter {
		return &store.SelectorFilter{Selectors: sels(t, ss...), Match: m}
	}
	tests := []struct {
		name string
		req  store.ListEntriesRequest
		want map[string]bool
	}{
		{"all", store.ListEntriesRequest{}, set(a, b, c, alias)},
		{"by spiffe id", store.ListEntriesRequest{SPIFFEID: td + "/b"}, set(b)},
		{"by parent", store.ListEntriesRequest{ParentID: agentA}, set(a, b)},
		{"node aliases", store.ListEntriesRequest{ParentID: serverID}, set(alias)},
		{"exact", store.ListEntriesRequest{BySelectors: filter(store.MatchExact, "unix:uid:1")}, set(a)},
		{"exact unordered", store.ListEntriesRequest{BySelectors: filter(store.MatchExact, "unix:uid:1", "unix:gid:1")}, set(b)},
		{"subset", store.ListEntriesRequest{BySelectors: filter(store.MatchSubset, "unix:uid:1", "unix:gid:1", "unix:gid:9")}, set(a, b)},
		{"subset none", store.ListEntriesRequest{BySelectors: filter(store.MatchSubset, "unix:gid:1")}, set()},
		{"superset", store.ListEntriesRequest{BySelectors: filter(store.MatchSuperset, "unix:uid:1")}, set(a, b)},
		{"any", store.ListEntriesRequest{BySelectors: filter(store.MatchAny, "unix:uid:2", "unix:gid:1")}, set(b, c)},
		{"parent and selectors", store.ListEntriesRequest{ParentID: agentB, BySelectors: filter(store.MatchSuperset, "unix:uid:1")}, set()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, _, err := s.ListEntries(ctx, tt.req)
			if err != nil {
				t.Fatalf("ListEntries: %v", err)
			}
			if !reflect.DeepEqual(ids(got), tt.want) {
				t.Fatalf("got %v, want %v", ids(got), tt.want)
			}
		})
	}
	bad := []store.ListEntriesRequest{
		{PageSize: -1},
		{BySelectors: &store.SelectorFilter{}},
		{BySelectors: &store.SelectorFilter{Selectors: sels(t, "a:b"), Match: 42}},
	}
	for i, req := range bad {
		if _, _, err := s.ListEntries(ctx, req); !errors.Is(err, store.ErrInvalid) {
			t.Fatalf("bad request %d: err = %v, want ErrInvalid", i, err)
		}
	}
	// Pagination in pages of 3 over 4 entries.
	p1, next, err := s.ListEntries(ctx, store.ListEntriesRequest{PageSize: 3})
	if err != nil || len(p1) != 3 || next == "" {
		t.Fatalf("page 1 = %d entries, next %q, %v", len(p1), next, err)
	}
	p2, next2, err := s.ListEntries(ctx, store.ListEntriesRequest{PageSize: 3, PageToken: next})
	if err != nil || len(p2) != 1 || next2 != "" {
		t.Fatalf("page 2 = %d entries, next %q, %v", len(p2), next2, err)
	}
	if got := ids(append(p1, p2...)); !reflect.DeepEqual(got, set(a, b, c, alias)) {
		t.Fatalf("pages cover %v", got)
	}
	// GetEntries returns those that exist.
	got, err := s.GetEntries(ctx, []string{a.ID, "missing", c.ID})
	if err != nil || !reflect.DeepEqual(ids(got), set(a, c)) {
		t.Fatalf("GetEntries = %v, %v", ids(got), err)
	}
}

// newCA returns a self-signed CA certificate, its PKIX public key and the
// PKCS#8 private key (which must never reach the store).
func newCA(t testing.TB, cn string) (cert, pub, priv []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(td)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs: []*url.URL{u},
	}
	cert, err = x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	pub, err = x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	priv, err = x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return cert, pub, priv
}

func TestAuthorities(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, "")
	certA, _, _ := newCA(t, "A")
	certB, _, _ := newCA(t, "B")
	_, jwtPub, _ := newCA(t, "J")
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	x1 := &store.Authority{Kind: store.AuthorityX509, ID: "x509-CA-1", State: store.StateActive, KeyToken: "ironroot",
		KeyID: []byte{1, 2}, KeyLabel: "x509-CA-1", Certificate: certA, NotBefore: nb, NotAfter: nb.Add(24 * time.Hour)}
	x2 := &store.Authority{Kind: store.AuthorityX509, ID: "x509-CA-2", State: store.StatePrepared, KeyToken: "ironroot",
		KeyID: []byte{3}, KeyLabel: "x509-CA-2", Certificate: certB, NotBefore: nb.Add(12 * time.Hour), NotAfter: nb.Add(36 * time.Hour)}
	j1 := &store.Authority{Kind: store.AuthorityJWT, ID: "JWT-Signer-1", State: store.StateActive, KeyToken: "ironroot",
		KeyID: []byte{4}, PublicKey: jwtPub, KeyIDJWT: "kid-1", NotBefore: nb, NotAfter: nb.Add(24 * time.Hour)}
	if err := s.PutAuthority(ctx, x1, x2, j1); err != nil {
		t.Fatalf("PutAuthority: %v", err)
	}
	xs, err := s.ListAuthorities(ctx, store.AuthorityX509)
	if err != nil || len(xs) != 2 || xs[0].ID != "x509-CA-1" || !bytes.Equal(xs[1].Certificate, certB) || !xs[1].NotAfter.Equal(x2.NotAfter) {
		t.Fatalf("ListAuthorities(x509) = %+v, %v", xs, err)
	}
	all, err := s.ListAuthorities(ctx, "")
	if err != nil || len(all) != 3 {
		t.Fatalf("ListAuthorities(all) = %d, %v", len(all), err)
	}
	j, err := s.GetAuthority(ctx, store.AuthorityJWT, "JWT-Signer-1")
	if err != nil || j.KeyIDJWT != "kid-1" || !bytes.Equal(j.PublicKey, jwtPub) {
		t.Fatalf("GetAuthority = %+v, %v", j, err)
	}

	// Two active X.509 authorities are refused, and nothing of the call sticks.
	x2active := *x2
	x2active.State = store.StateActive
	if err := s.PutAuthority(ctx, &x2active); !errors.Is(err, store.ErrInvalid) {
		t.Fatalf("second active: err = %v, want ErrInvalid", err)
	}
	if got, _ := s.GetAuthority(ctx, store.AuthorityX509, "x509-CA-2"); got.State != store.StatePrepared {
		t.Fatalf("refused put changed state to %s", got.State)
	}
	// Rotation in one call: demote and promote.
	x1old := *x1
	x1old.State = store.StateOld
	if err := s.PutAuthority(ctx, &x1old, &x2active); err != nil {
		t.Fatalf("rotation PutAuthority: %v", err)
	}
	if got, _ := s.GetAuthority(ctx, store.AuthorityX509, "x509-CA-1"); got.State != store.StateOld {
		t.Fatalf("x509-CA-1 state = %s, want old", got.State)
	}

	invalid := []*store.Authority{
		{Kind: "rsa", ID: "x", State: store.StateOld, NotBefore: nb, NotAfter: nb.Add(time.Hour)},
		{Kind: store.AuthorityX509, ID: "x", State: "weird", Certificate: certA, NotBefore: nb, NotAfter: nb.Add(time.Hour)},
		{Kind: store.AuthorityX509, ID: "x", State: store.StateOld, Certificate: []byte("not a cert"), NotBefore: nb, NotAfter: nb.Add(time.Hour)},
		{Kind: store.AuthorityJWT, ID: "j", State: store.StateOld, PublicKey: jwtPub, NotBefore: nb, NotAfter: nb.Add(time.Hour)},
		{Kind: store.AuthorityJWT, ID: "j", State: store.StateOld, KeyIDJWT: "k", PublicKey: []byte{1}, NotBefore: nb, NotAfter: nb.Add(time.Hour)},
		{Kind: store.AuthorityX509, ID: "", State: store.StateOld, Certificate: certA, NotBefore: nb, NotAfter: nb.Add(time.Hour)},
		{Kind: store.AuthorityX509, ID: "x", State: store.StateOld, Certificate: certA, NotBefore: nb, NotAfter: nb},
	}
	for i, a := range invalid {
		if err := s.PutAuthority(ctx, a); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("invalid authority %d: err = %v, want ErrInvalid", i, err)
		}
	}

	if err := s.DeleteAuthority(ctx, store.AuthorityX509, "x509-CA-1"); err != nil {
		t.Fatalf("DeleteAuthority: %v", err)
	}
	if err := s.DeleteAuthority(ctx, store.AuthorityX509, "x509-CA-1"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("second DeleteAuthority: %v, want ErrNotFound", err)
	}
	if _, err := s.GetAuthority(ctx, store.AuthorityX509, "x509-CA-1"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetAuthority after delete: %v", err)
	}

	for want := int64(1); want <= 3; want++ {
		seq, err := s.BumpBundleSequence(ctx)
		if err != nil || seq != want {
			t.Fatalf("BumpBundleSequence = %d, %v; want %d", seq, err, want)
		}
	}
	if seq, err := s.BundleSequence(ctx); err != nil || seq != 3 {
		t.Fatalf("BundleSequence = %d, %v; want 3", seq, err)
	}
	evs, err := s.Events(ctx, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range evs {
		if e.Kind != store.EventBundle {
			t.Fatalf("unexpected event %+v", e)
		}
	}
	// 3 puts + 2 rotation puts + 1 delete + 3 bumps.
	if len(evs) != 9 {
		t.Fatalf("bundle events = %d, want 9", len(evs))
	}
}

func TestEventsAndPrune(t *testing.T) {
	ctx := context.Background()
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s := openStore(t, "", store.WithClock(func() time.Time { return now }))
	for i := range 10 {
		now = now.Add(time.Minute)
		if _, err := s.CreateEntry(ctx, entry(t, fmt.Sprintf("%s/w%d", td, i), agentA, "unix:uid:1")); err != nil {
			t.Fatal(err)
		}
	}
	page, err := s.Events(ctx, 3, 4)
	if err != nil || len(page) != 4 || page[0].ID != 4 || page[3].ID != 7 {
		t.Fatalf("Events(3, 4) = %+v, %v", page, err)
	}
	if !page[0].CreatedAt.Equal(time.Date(2026, 1, 1, 0, 4, 0, 0, time.UTC)) {
		t.Fatalf("event time = %v", page[0].CreatedAt)
	}
	// Prune everything older than minute 6 (events 1..5), but keep the last 3 anyway.
	n, err := s.PruneEvents(ctx, time.Date(2026, 1, 1, 0, 6, 0, 0, time.UTC), 3)
	if err != nil || n != 5 {
		t.Fatalf("PruneEvents = %d, %v; want 5", n, err)
	}
	if _, err := s.Events(ctx, 2, 0); !errors.Is(err, store.ErrEventsPruned) {
		t.Fatalf("Events after pruned ID: %v, want ErrEventsPruned", err)
	}
	if evs, err := s.Events(ctx, 5, 0); err != nil || len(evs) != 5 {
		t.Fatalf("Events(5) = %d, %v; want 5", len(evs), err)
	}
	// keepLast wins over age.
	if n, err := s.PruneEvents(ctx, now.Add(time.Hour), 2); err != nil || n != 3 {
		t.Fatalf("PruneEvents(keepLast 2) = %d, %v; want 3", n, err)
	}
	if n, err := s.PruneEvents(ctx, now.Add(time.Hour), 0); err != nil || n != 2 {
		t.Fatalf("PruneEvents(all) = %d, %v; want 2", n, err)
	}
	// The newest ID survives pruning of every row: followers stay in step.
	if id := latest(t, s); id != 10 {
		t.Fatalf("LatestEventID after pruning all = %d, want 10", id)
	}
	e, err := s.CreateEntry(ctx, entry(t, td+"/after", agentA, "unix:uid:1"))
	if err != nil {
		t.Fatal(err)
	}
	if evs, err := s.Events(ctx, 10, 0); err != nil || len(evs) != 1 || evs[0].ID != 11 || evs[0].ObjectID != e.ID {
		t.Fatalf("Events(10) = %+v, %v", evs, err)
	}
	if _, err := s.PruneEvents(ctx, now, -1); !errors.Is(err, store.ErrInvalid) {
		t.Fatalf("negative keepLast: %v", err)
	}
}

func TestSubscribe(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, "")
	n1, cancel1 := s.Subscribe()
	n2, cancel2 := s.Subscribe()
	defer cancel2()

	// Many commits coalesce into one pending signal; nothing blocks.
	for i := range 5 {
		if _, err := s.CreateEntry(ctx, entry(t, fmt.Sprintf("%s/w%d", td, i), agentA, "unix:uid:1")); err != nil {
			t.Fatal(err)
		}
	}
	for i, ch := range []<-chan struct{}{n1, n2} {
		select {
		case <-ch:
		default:
			t.Fatalf("subscriber %d not signalled after commit", i)
		}
		select {
		case <-ch:
			t.Fatalf("subscriber %d got a second, uncoalesced signal", i)
		default:
		}
	}

	// A waiter blocked on the channel wakes when another goroutine commits.
	done := make(chan error, 1)
	go func() {
		_, err := s.UpsertNode(ctx, &store.Node{SPIFFEID: agentA})
		done <- err
	}()
	<-n2
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	<-n1 // the node upsert's signal, pending since before the cancel
	cancel1()
	cancel1() // idempotent
	if _, err := s.BumpBundleSequence(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-n1:
		t.Fatal("cancelled subscriber was signalled")
	default:
	}
	select {
	case <-n2:
	default:
		t.Fatal("bundle change did not signal")
	}
	// Reads and failed writes do not signal.
	if _, err := s.GetNode(ctx, agentA); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateEntry(ctx, entry(t, "bad", agentA, "unix:uid:1")); err == nil {
		t.Fatal("bad entry accepted")
	}
	select {
	case <-n2:
		t.Fatal("read or failed write signalled")
	default:
	}
}

func TestRestartKeepsEverything(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "db.sqlite")
	s, err := store.OpenSQLite(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	cert, _, _ := newCA(t, "A")
	nb := time.Now().UTC().Truncate(time.Second)
	e, err := s.CreateEntry(ctx, &store.Entry{SPIFFEID: td + "/web", ParentID: agentA, Selectors: sels(t, "unix:uid:1"),
		X509SVIDTTL: 300, DNSNames: []string{"a.example"}, Hint: "h"})
	if err != nil {
		t.Fatal(err)
	}
	n, err := s.UpsertNode(ctx, &store.Node{SPIFFEID: agentA, EKHash: "aaaa", Selectors: sels(t, "tpm:ek_hash:aaaa"),
		Evidence: []byte("{}"), CertSerial: "42", CertNotAfter: nb.Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	a := &store.Authority{Kind: store.AuthorityX509, ID: "x509-CA-1", State: store.StateActive, KeyID: []byte{9},
		Certificate: cert, NotBefore: nb, NotAfter: nb.Add(time.Hour)}
	if err := s.PutAuthority(ctx, a); err != nil {
		t.Fatal(err)
	}
	if _, err := s.BumpBundleSequence(ctx); err != nil {
		t.Fatal(err)
	}
	lastEvent := latest(t, s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s2 := openStore(t, path)
	if got, err := s2.GetEntry(ctx, e.ID); err != nil || !reflect.DeepEqual(got, e) {
		t.Fatalf("entry after restart = %+v, %v\nwant %+v", got, err, e)
	}
	if got, err := s2.GetNode(ctx, agentA); err != nil || !reflect.DeepEqual(got, n) {
		t.Fatalf("node after restart = %+v, %v\nwant %+v", got, err, n)
	}
	if got, err := s2.GetAuthority(ctx, store.AuthorityX509, "x509-CA-1"); err != nil || !bytes.Equal(got.Certificate, cert) || !got.NotAfter.Equal(a.NotAfter) {
		t.Fatalf("authority after restart = %+v, %v", got, err)
	}
	if seq, err := s2.BundleSequence(ctx); err != nil || seq != 1 {
		t.Fatalf("bundle sequence after restart = %d, %v", seq, err)
	}
	if got := latest(t, s2); got != lastEvent {
		t.Fatalf("latest event after restart = %d, want %d", got, lastEvent)
	}
}

// TestNoPrivateKeyMaterial checks the schema has nowhere to put a secret and
// that storing a CA journal leaves no private key bytes in the files.
func TestNoPrivateKeyMaterial(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openStore(t, filepath.Join(dir, "db.sqlite"))
	rows, err := s.DB().QueryContext(ctx, `SELECT m.name, p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p WHERE m.type = 'table'`)
	if err != nil {
		t.Fatal(err)
	}
	cols := 0
	for rows.Next() {
		var table, col string
		if err := rows.Scan(&table, &col); err != nil {
			t.Fatal(err)
		}
		cols++
		for _, bad := range []string{"private", "secret", "pin", "password", "priv", "seed"} {
			if strings.Contains(strings.ToLower(col), bad) {
				t.Errorf("column %s.%s looks like it could hold secret material", table, col)
			}
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if cols < 20 {
		t.Fatalf("schema introspection saw only %d columns", cols)
	}

	cert, pub, priv := newCA(t, "A")
	key, err := x509.ParsePKCS8PrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	d := key.(*ecdsa.PrivateKey).D.FillBytes(make([]byte, 32))
	nb := time.Now()
	if err := s.PutAuthority(ctx,
		&store.Authority{Kind: store.AuthorityX509, ID: "x509-CA-1", State: store.StateActive, Certificate: cert, NotBefore: nb, NotAfter: nb.Add(time.Hour)},
		&store.Authority{Kind: store.AuthorityJWT, ID: "JWT-Signer-1", State: store.StateActive, PublicKey: pub, KeyIDJWT: "k", NotBefore: nb, NotAfter: nb.Add(time.Hour)},
	); err != nil {
		t.Fatal(err)
	}
	// A private key is not a public key: the JWT column refuses it.
	if err := s.PutAuthority(ctx, &store.Authority{Kind: store.AuthorityJWT, ID: "JWT-Signer-2", State: store.StateOld,
		PublicKey: priv, KeyIDJWT: "k2", NotBefore: nb, NotAfter: nb.Add(time.Hour)}); !errors.Is(err, store.ErrInvalid) {
		t.Fatalf("private key as public key: err = %v, want ErrInvalid", err)
	}
	if _, err := s.DB().ExecContext(ctx, `PRAGMA wal_checkpoint(FULL)`); err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "*"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, d) || bytes.Contains(b, priv) {
			t.Fatalf("%s contains private key material", f)
		}
	}
	if len(files) == 0 {
		t.Fatal("no database files found")
	}
}

func TestConcurrentReadersAndWriters(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, "")
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 25 {
				if _, err := s.CreateEntry(ctx, entry(t, fmt.Sprintf("%s/w%d-%d", td, w, i), agentA, "unix:uid:1")); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 25 {
				if _, _, err := s.ListEntries(ctx, store.ListEntriesRequest{ParentID: agentA}); err != nil {
					errs <- err
					return
				}
				if _, err := s.Events(ctx, 0, 10); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	all, _, err := s.ListEntries(ctx, store.ListEntriesRequest{})
	if err != nil || len(all) != 100 {
		t.Fatalf("entries = %d, %v; want 100", len(all), err)
	}
	evs, err := s.Events(ctx, 0, 0)
	if err != nil || len(evs) != 100 {
		t.Fatalf("events = %d, %v; want 100", len(evs), err)
	}
	for i, e := range evs {
		if e.ID != int64(i+1) {
			t.Fatalf("event %d has ID %d: IDs must be dense and ordered", i, e.ID)
		}
	}
}

// TestConcurrentOpen opens one fresh file from several goroutines at once,
// as two server processes starting together would: each migration is
// applied exactly once.
func TestConcurrentOpen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "db.sqlite")
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := store.OpenSQLite(ctx, path)
			if err != nil {
				errs <- err
				return
			}
			errs <- s.Close()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("concurrent open: %v", err)
		}
	}
	s := openStore(t, path)
	var rows int
	if err := s.DB().QueryRowContext(ctx, `SELECT COUNT(*) FROM schema_version`).Scan(&rows); err != nil || rows != 1 {
		t.Fatalf("schema_version rows = %d, %v; want 1", rows, err)
	}
}

func TestRunEventPruner(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := openStore(t, "")
	for i := range 5 {
		if _, err := s.CreateEntry(ctx, entry(t, fmt.Sprintf("%s/w%d", td, i), agentA, "unix:uid:1")); err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan error, 1)
	go func() {
		done <- store.RunEventPruner(ctx, s, store.WithPruneInterval(time.Millisecond), store.WithEventRetention(0, 2))
	}()
	// Wait until the pruner has run; the deadline only turns a hang into a failure.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := s.Events(ctx, 2, 0); errors.Is(err, store.ErrEventsPruned) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("pruner did not prune")
		}
		time.Sleep(time.Millisecond)
	}
	evs, err := s.Events(ctx, 3, 0)
	if err != nil || len(evs) != 2 {
		t.Fatalf("after pruning: %d events, %v; want the last 2", len(evs), err)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("RunEventPruner returned %v, want context.Canceled", err)
	}
	if err := store.RunEventPruner(context.Background(), nil); !errors.Is(err, store.ErrInvalid) {
		t.Fatalf("nil store: %v", err)
	}
}
