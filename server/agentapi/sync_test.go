package agentapi

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/server/entrycache"
	"github.com/ironroot/ironroot/server/store"
)

func testEntries(n int) []*agentv1.Entry {
	out := make([]*agentv1.Entry, n)
	for i := range out {
		out[i] = &agentv1.Entry{
			Id:        fmt.Sprintf("entry-%05d", i),
			SpiffeId:  fmt.Sprintf("spiffe://example.org/workload/%d", i),
			ParentId:  "spiffe://example.org/ironroot/agent/tpm/" + strings.Repeat("a", 64),
			Selectors: []*agentv1.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", i)}},
		}
	}
	return out
}

func TestSyncMessages(t *testing.T) {
	bundle := &agentv1.Bundle{TrustDomain: "example.org", X509Authorities: [][]byte{make([]byte, 600)}, SequenceNumber: 3}
	ids := func(n int) []string {
		out := make([]string, n)
		for i := range out {
			out[i] = fmt.Sprintf("deleted-%05d", i)
		}
		return out
	}
	tests := []struct {
		name      string
		full      bool
		upserted  int
		deleted   int
		bundle    *agentv1.Bundle
		budget    int
		wantMsgs  int // -1: more than one, exact count not asserted
		wantEmpty bool
	}{
		{name: "empty full set still sends one message", full: true, bundle: bundle, budget: MaxSyncMessageBytes, wantMsgs: 1},
		{name: "empty change set sends nothing", budget: MaxSyncMessageBytes, wantMsgs: 0, wantEmpty: true},
		{name: "bundle only", bundle: bundle, budget: MaxSyncMessageBytes, wantMsgs: 1},
		{name: "small full set fits one message", full: true, upserted: 100, bundle: bundle, budget: MaxSyncMessageBytes, wantMsgs: 1},
		{name: "large full set is chunked", full: true, upserted: 2000, bundle: bundle, budget: 32 << 10, wantMsgs: -1},
		{name: "upserts and deletes chunked", upserted: 500, deleted: 3000, budget: 16 << 10, wantMsgs: -1},
		{name: "budget smaller than one entry", upserted: 3, budget: 10, wantMsgs: 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up, del := testEntries(tc.upserted), ids(tc.deleted)
			msgs := syncMessages(tc.full, up, del, tc.bundle, tc.budget)
			switch {
			case tc.wantMsgs >= 0 && len(msgs) != tc.wantMsgs:
				t.Fatalf("got %d messages, want %d", len(msgs), tc.wantMsgs)
			case tc.wantMsgs < 0 && len(msgs) < 2:
				t.Fatalf("got %d messages, want the set split over several", len(msgs))
			}
			var gotUp []*agentv1.Entry
			var gotDel []string
			for i, m := range msgs {
				if i == 0 {
					if m.Full != tc.full || m.Bundle != tc.bundle {
						t.Errorf("first message: full=%t bundle=%v, want full=%t and the bundle", m.Full, m.Bundle != nil, tc.full)
					}
				} else if m.Full || m.Bundle != nil {
					t.Errorf("message %d repeats full or the bundle", i)
				}
				// Every part of a full set but the last says more follows.
				if wantMore := tc.full && i < len(msgs)-1; m.More != wantMore {
					t.Errorf("message %d of %d: more=%t, want %t", i, len(msgs), m.More, wantMore)
				}
				// One entry alone may exceed a tiny budget; otherwise every
				// message must fit.
				if n := proto.Size(m); n > tc.budget && len(m.Upserted)+len(m.DeletedIds) > 1 {
					t.Errorf("message %d is %d bytes, over the %d budget", i, n, tc.budget)
				}
				gotUp = append(gotUp, m.Upserted...)
				gotDel = append(gotDel, m.DeletedIds...)
			}
			if len(gotUp) != len(up) || len(gotDel) != len(del) {
				t.Fatalf("messages carry %d upserted and %d deleted, want %d and %d", len(gotUp), len(gotDel), len(up), len(del))
			}
			for i := range up {
				if gotUp[i] != up[i] {
					t.Fatalf("upserted entry %d out of order", i)
				}
			}
			for i := range del {
				if gotDel[i] != del[i] {
					t.Fatalf("deleted ID %d out of order", i)
				}
			}
		})
	}
}

func TestSyncMessagesFitDefaultBudget(t *testing.T) {
	// 20,000 typical entries exceed 2 MiB: the full set must be split and
	// every message stay under gRPC's 4 MiB default receive limit.
	msgs := syncMessages(true, testEntries(20000), nil, nil, MaxSyncMessageBytes)
	if len(msgs) < 2 {
		t.Fatalf("20,000 entries in %d message(s), want several", len(msgs))
	}
	for i, m := range msgs {
		if n := proto.Size(m); n > MaxSyncMessageBytes {
			t.Errorf("message %d is %d bytes, over %d", i, n, MaxSyncMessageBytes)
		}
	}
}

// TestAgentSetFollowsCache applies random entry changes (leaves, node
// aliases, entries parented to other entries, re-parenting, renaming,
// deletion) and checks after each that the incrementally kept set, and the
// changes it emitted, equal a full recomputation.
func TestAgentSetFollowsCache(t *testing.T) {
	ctx := context.Background()
	st, err := store.OpenSQLite(ctx, filepath.Join(t.TempDir(), "set.sqlite3"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	serverID := spiffeid.RequireFromString("spiffe://example.org" + ServerPath)
	cache, err := entrycache.New(ctx, st, serverID)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cache.Close)

	agent := spiffeid.RequireFromString("spiffe://example.org" + AgentPathPrefix + "aa")
	other := "spiffe://example.org" + AgentPathPrefix + "bb"
	nodeSels := []store.Selector{{Type: "tpm", Value: "manufacturer:x"}, {Type: "tpm", Value: "secure_boot:enabled"}}
	set := newAgentSet(cache, agent, nodeSels)
	mirror := map[string]*store.Entry{} // what an agent following the emitted changes holds

	rng := rand.New(rand.NewPCG(1, 2))
	names := []string{"/a", "/b", "/c", "/d", "/e", "/f"}
	parents := func() string {
		switch rng.IntN(5) {
		case 0:
			return agent.String()
		case 1:
			return other
		case 2:
			return serverID.String()
		default:
			return "spiffe://example.org" + names[rng.IntN(len(names))]
		}
	}
	selectors := func(parent string) []store.Selector {
		if parent == serverID.String() {
			// Node aliases: some match the node, some do not.
			return [][]store.Selector{{nodeSels[0]}, nodeSels, {{Type: "tpm", Value: "manufacturer:y"}}}[rng.IntN(3)]
		}
		return []store.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", rng.IntN(1000000))}}
	}
	var ids []string
	advances := 0
	for step := range 400 {
		switch op := rng.IntN(10); {
		case op < 5 || len(ids) == 0:
			p := parents()
			id := "spiffe://example.org" + names[rng.IntN(len(names))]
			if id == p {
				continue
			}
			e, err := st.CreateEntry(ctx, &store.Entry{SPIFFEID: id, ParentID: p, Selectors: selectors(p)})
			if errors.Is(err, store.ErrAlreadyExists) {
				continue // the same alias drawn twice
			}
			if err != nil {
				t.Fatalf("step %d: %v", step, err)
			}
			ids = append(ids, e.ID)
		case op < 8:
			cur, err := st.GetEntry(ctx, ids[rng.IntN(len(ids))])
			if err != nil {
				continue // deleted
			}
			if rng.IntN(2) == 0 {
				cur.ParentID = parents()
			} else {
				cur.SPIFFEID = "spiffe://example.org" + names[rng.IntN(len(names))]
			}
			if cur.SPIFFEID == cur.ParentID {
				continue
			}
			cur.Selectors = selectors(cur.ParentID)
			if _, err := st.UpdateEntry(ctx, cur); err != nil && !errors.Is(err, store.ErrAlreadyExists) {
				t.Fatalf("step %d: %v", step, err)
			}
		default:
			_, _ = st.DeleteEntry(ctx, ids[rng.IntN(len(ids))])
		}
		// Sometimes several commits land between two advances.
		if rng.IntN(3) == 0 {
			continue
		}
		if err := cache.Refresh(ctx); err != nil {
			t.Fatal(err)
		}
		up, rm := set.advance(nodeSels, false)
		advances++
		for _, e := range up {
			mirror[e.ID] = e
		}
		for _, e := range rm {
			delete(mirror, e.ID)
		}
		want := map[string]int64{}
		for _, e := range cache.Authorized(agent, nodeSels) {
			want[e.ID] = e.RevisionNumber
		}
		for name, got := range map[string]map[string]*store.Entry{"set": set.byID, "agent's mirror": mirror} {
			if len(got) != len(want) {
				t.Fatalf("step %d: %s has %d entries, a full recomputation %d", step, name, len(got), len(want))
			}
			for id, rev := range want {
				if e, ok := got[id]; !ok || e.RevisionNumber != rev {
					t.Fatalf("step %d: %s: entry %s missing or at a stale revision", step, name, id)
				}
			}
		}
	}
	// Both the incremental path and the fall-back must have been exercised.
	if full := set.recomputes - 1; full == 0 || full >= advances {
		t.Errorf("%d of %d advances recomputed in full; want some but not all", full, advances)
	}
	t.Logf("%d of %d advances recomputed in full", set.recomputes-1, advances)
}
