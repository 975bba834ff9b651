package manager

import (
	"context"
	"fmt"
	"log/slog"
	"runtime"
	"testing"
	"time"

	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/workloadapi"
)

func thousandEntries() []*agentv1.Entry {
	out := make([]*agentv1.Entry, 1000)
	for i := range out {
		out[i] = workloadEntry(fmt.Sprintf("e-%04d", i), fmt.Sprintf("/svc/%04d", i), 1, "unix:uid:1000")
	}
	return out
}

// benchManager starts a manager for entries against a fake server; the
// returned stop ends it.
func benchManager(b *testing.B, f *fakeServer, client agentv1.AgentClient) (*Manager, func()) {
	m, err := New(Config{TrustDomain: testTD, Client: client, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx) }()
	return m, func() { cancel(); <-done }
}

func waitN(b *testing.B, sub workloadapi.Subscription, n int) {
	deadline := time.NewTimer(time.Minute)
	defer deadline.Stop()
	for {
		select {
		case s := <-sub.Updates():
			if len(s.SVIDs) == n {
				return
			}
		case <-deadline.C:
			b.Fatalf("no snapshot with %d SVIDs", n)
		}
	}
}

// BenchmarkFullSync1000 measures a cold start: from Run (full sync of 1,000
// entries) to a subscriber's snapshot holding all 1,000 SVIDs. Keys, CSRs
// and the fake server's signing share the process's CPUs.
func BenchmarkFullSync1000(b *testing.B) {
	f := newFakeServer(b)
	f.upsert(thousandEntries()...)
	client := f.serve(b)
	ws := []workloadapi.Selector{{Type: "unix", Value: "uid:1000"}}
	for b.Loop() {
		m, stop := benchManager(b, f, client)
		sub, err := m.Subscribe(context.Background(), ws)
		if err != nil {
			b.Fatal(err)
		}
		waitN(b, sub, 1000)
		b.StopTimer()
		sub.Close()
		stop()
		b.StartTimer()
	}
}

// BenchmarkEntryCreate measures one entry created on the server until a
// subscriber's snapshot includes its SVID, with 1,000 entries cached.
func BenchmarkEntryCreate(b *testing.B) {
	f := newFakeServer(b)
	f.upsert(thousandEntries()...)
	client := f.serve(b)
	m, stop := benchManager(b, f, client)
	defer stop()
	sub, err := m.Subscribe(context.Background(), []workloadapi.Selector{{Type: "unix", Value: "uid:1000"}})
	if err != nil {
		b.Fatal(err)
	}
	defer sub.Close()
	waitN(b, sub, 1000)
	n := 1000
	for b.Loop() {
		f.upsert(workloadEntry(fmt.Sprintf("new-%d", n), fmt.Sprintf("/new/%d", n), 1, "unix:uid:1000"))
		n++
		waitN(b, sub, n)
	}
}

// BenchmarkEntryCreateToWorkload measures an entry upserted on the Sync
// stream until a go-spiffe client watching the Workload API (real server,
// real unix attestor) receives the update holding its SVID (one SVID
// already held; the entry is deleted again, untimed, after each round).
func BenchmarkEntryCreateToWorkload(b *testing.B) {
	uid := myUID()
	h := start(b, Config{}, workloadEntry("e-0", "/w/0", 1, uid))
	<-h.m.Ready()
	_, w, _ := watchThroughWorkloadAPI(b, h.m)
	await := func(n int) {
		deadline := time.NewTimer(time.Minute)
		defer deadline.Stop()
		for {
			select {
			case c := <-w.updates:
				if len(c.SVIDs) == n {
					return
				}
			case <-deadline.C:
				b.Fatalf("the workload never saw %d SVIDs", n)
			}
		}
	}
	await(1)
	n := 1
	for b.Loop() {
		id := fmt.Sprintf("e-%d", n)
		h.fake.upsert(workloadEntry(id, fmt.Sprintf("/w/%d", n), 1, uid))
		n++
		await(2)
		b.StopTimer()
		h.fake.remove(id) // keep the workload's state at one SVID
		await(1)
		b.StartTimer()
	}
}

// BenchmarkHeap1000SVIDs reports the live heap the cache holds for 1,000
// SVIDs (keys, parsed chains, one subscriber's snapshot) after GC, as the
// difference from before the manager started, and the whole test process's
// heap in use and memory from the OS (which include the fake server).
func BenchmarkHeap1000SVIDs(b *testing.B) {
	f := newFakeServer(b)
	f.upsert(thousandEntries()...)
	client := f.serve(b)
	// Connect first: the connection's buffers are not the cache's.
	if _, err := client.NewJWTSVID(context.Background(), &agentv1.NewJWTSVIDRequest{EntryId: "warm-up", Audience: []string{"x"}}); err == nil {
		b.Fatal("warm-up call succeeded")
	}
	var before, after runtime.MemStats
	for b.Loop() {
		runtime.GC()
		runtime.ReadMemStats(&before)
		m, stop := benchManager(b, f, client)
		sub, err := m.Subscribe(context.Background(), []workloadapi.Selector{{Type: "unix", Value: "uid:1000"}})
		if err != nil {
			b.Fatal(err)
		}
		waitN(b, sub, 1000)
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/1000, "liveB/svid")
		b.ReportMetric(float64(after.HeapInuse)/(1<<20), "heapInuseMiB-process")
		b.ReportMetric(float64(after.Sys)/(1<<20), "sysMiB-process")
		runtime.KeepAlive(m)
		sub.Close()
		stop()
	}
}
