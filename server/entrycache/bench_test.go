package entrycache_test

import (
	"context"
	"fmt"
	"runtime"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ironroot/ironroot/server/entrycache"
	"github.com/ironroot/ironroot/server/store"
)

// fixture10k stores 10,000 entries: 100 node aliases (manufacturer, PCR 7
// and, for half, secure boot), 10 workload entries under each alias, and
// 89 workload entries under each of 100 agents. It returns the node
// selectors of agent 3, which match 5 aliases, so agent 3 is authorized for
// 89 + 5 + 50 = 144 entries.
func fixture10k(b *testing.B) (*store.SQLStore, spiffeid.ID, []store.Selector) {
	b.Helper()
	s := openStore(b)
	var batch []*store.Entry
	add := func(id, parent string, ss ...store.Selector) {
		batch = append(batch, &store.Entry{SPIFFEID: id, ParentID: parent, Selectors: ss})
	}
	for i := range 100 {
		alias := fmt.Sprintf("%s/alias/%d", td, i)
		ss := []store.Selector{
			{Type: "tpm", Value: fmt.Sprintf("manufacturer:M%d", i%10)},
			{Type: "tpm", Value: fmt.Sprintf("pcr:sha256:7:%064x", i%20)},
		}
		if i%2 == 0 {
			ss = append(ss, store.Selector{Type: "tpm", Value: "secure_boot:enabled"})
		}
		add(alias, serverID.String(), ss...)
		for w := range 10 {
			add(fmt.Sprintf("%s/alias-workload/%d/%d", td, i, w), alias, store.Selector{Type: "unix", Value: fmt.Sprintf("uid:%d", w)})
		}
	}
	for a := range 100 {
		agent := fmt.Sprintf("%s/ironroot/agent/tpm/%064x", td, a)
		for w := range 89 {
			add(fmt.Sprintf("%s/workload/%d/%d", td, a, w), agent, store.Selector{Type: "unix", Value: fmt.Sprintf("uid:%d", w)})
		}
	}
	if len(batch) != 10000 {
		b.Fatalf("fixture has %d entries", len(batch))
	}
	if _, err := s.CreateEntries(context.Background(), batch); err != nil {
		b.Fatal(err)
	}
	node := []store.Selector{
		{Type: "tpm", Value: fmt.Sprintf("ek_hash:%064x", 3)},
		{Type: "tpm", Value: "manufacturer:M3"},
		{Type: "tpm", Value: "secure_boot:disabled"},
	}
	for pcr := range 24 {
		node = append(node, store.Selector{Type: "tpm", Value: fmt.Sprintf("pcr:sha256:%d:%064x", pcr, 3)})
	}
	return s, spiffeid.RequireFromString(fmt.Sprintf("%s/ironroot/agent/tpm/%064x", td, 3)), node
}

// BenchmarkAuthorized computes one agent's authorized set among 10,000
// entries and 100 node aliases.
func BenchmarkAuthorized(b *testing.B) {
	s, agent, node := fixture10k(b)
	c := newCache(b, s)
	if got := len(c.Authorized(agent, node)); got != 144 {
		b.Fatalf("authorized set has %d entries, want 144", got)
	}
	b.ReportAllocs()
	for b.Loop() {
		c.Authorized(agent, node)
	}
}

// BenchmarkAuthorizedEntry checks one entry two levels below a node alias,
// the per-CSR check of BatchNewX509SVID, among 10,000 entries.
func BenchmarkAuthorizedEntry(b *testing.B) {
	s, agent, node := fixture10k(b)
	c := newCache(b, s)
	es, _, err := s.ListEntries(context.Background(), store.ListEntriesRequest{SPIFFEID: td + "/alias-workload/23/7"})
	if err != nil || len(es) != 1 {
		b.Fatalf("fixture entry: %v", err)
	}
	if _, ok := c.AuthorizedEntry(agent, node, es[0].ID); !ok {
		b.Fatal("fixture entry not authorized")
	}
	b.ReportAllocs()
	for b.Loop() {
		c.AuthorizedEntry(agent, node, es[0].ID)
	}
}

// BenchmarkAuthorizedParallel is BenchmarkAuthorized from all cores at once,
// as many Sync streams recompute after one change.
func BenchmarkAuthorizedParallel(b *testing.B) {
	s, agent, node := fixture10k(b)
	c := newCache(b, s)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			c.Authorized(agent, node)
		}
	})
}

// BenchmarkLoad10k builds the cache from a store holding 10,000 entries.
// The "heap-MB" metric is the live heap that one loaded cache holds.
func BenchmarkLoad10k(b *testing.B) {
	s, _, _ := fixture10k(b)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		c, err := entrycache.New(ctx, s, serverID)
		if err != nil {
			b.Fatal(err)
		}
		if c.Len() != 10000 {
			b.Fatalf("loaded %d entries", c.Len())
		}
		c.Close()
	}
	b.StopTimer()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	c, err := entrycache.New(ctx, s, serverID)
	if err != nil {
		b.Fatal(err)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(c)
	c.Close()
	b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/(1<<20), "heap-MB")
}

// BenchmarkPropagation measures one entry creation through the store until
// a cache subscriber (a Sync stream) has been woken with the change applied,
// among 10,000 entries. The "propagation-µs" metric is the part after the
// store's commit returned.
func BenchmarkPropagation(b *testing.B) {
	s, _, _ := fixture10k(b)
	ctx, cancel := context.WithCancel(context.Background())
	c := newCache(b, s)
	runErr := make(chan error, 1)
	go func() { runErr <- c.Run(ctx) }()
	b.Cleanup(func() {
		cancel()
		<-runErr
	})
	notify, unsub := c.Subscribe()
	defer unsub()
	var after time.Duration
	i := 0
	for b.Loop() {
		i++
		e, err := s.CreateEntry(ctx, &store.Entry{SPIFFEID: fmt.Sprintf("%s/new/%d", td, i), ParentID: agentA.String(),
			Selectors: []store.Selector{{Type: "unix", Value: "uid:1"}}})
		if err != nil {
			b.Fatal(err)
		}
		committed := time.Now()
		for {
			if _, ok := c.Entry(e.ID); ok {
				break
			}
			<-notify
		}
		after += time.Since(committed)
	}
	b.ReportMetric(float64(after.Microseconds())/float64(i), "propagation-µs")
}
