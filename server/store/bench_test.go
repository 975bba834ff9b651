package store_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/ironroot/ironroot/server/store"
)

// BenchmarkCreateEntry stores one entry per transaction (synchronous=FULL,
// so each includes the WAL fsync).
func BenchmarkCreateEntry(b *testing.B) {
	s := openStore(b, "")
	ctx := context.Background()
	i := 0
	b.ReportAllocs()
	for b.Loop() {
		i++
		if _, err := s.CreateEntry(ctx, &store.Entry{SPIFFEID: fmt.Sprintf("%s/w/%d", td, i), ParentID: agentA,
			Selectors: []store.Selector{{Type: "unix", Value: "uid:1000"}, {Type: "unix", Value: fmt.Sprintf("path:/bin/%d", i)}}}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkCreateEntriesBatch100 stores 100 entries per transaction; the
// reported ns/op is per batch.
func BenchmarkCreateEntriesBatch100(b *testing.B) {
	s := openStore(b, "")
	ctx := context.Background()
	i := 0
	b.ReportAllocs()
	for b.Loop() {
		batch := make([]*store.Entry, 100)
		for j := range batch {
			i++
			batch[j] = &store.Entry{SPIFFEID: fmt.Sprintf("%s/w/%d", td, i), ParentID: agentA,
				Selectors: []store.Selector{{Type: "unix", Value: "uid:1000"}}}
		}
		if _, err := s.CreateEntries(ctx, batch); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkListEntries10k lists all of 10,000 entries (the cache's load).
func BenchmarkListEntries10k(b *testing.B) {
	s := openStore(b, "")
	ctx := context.Background()
	batch := make([]*store.Entry, 10000)
	for j := range batch {
		batch[j] = &store.Entry{SPIFFEID: fmt.Sprintf("%s/w/%d", td, j), ParentID: agentA,
			Selectors: []store.Selector{{Type: "unix", Value: "uid:1000"}, {Type: "unix", Value: "gid:0"}}}
	}
	if _, err := s.CreateEntries(ctx, batch); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		es, _, err := s.ListEntries(ctx, store.ListEntriesRequest{})
		if err != nil || len(es) != 10000 {
			b.Fatalf("listed %d, %v", len(es), err)
		}
	}
}
