package agentapi

import (
	"fmt"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
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
