package e2e

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	adminv1 "github.com/ironroot/ironroot/server/api/admin/v1"
	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
)

// These benchmarks measure the running system: the real server and agent
// binaries, swtpm and SoftHSM, a go-spiffe workload. Run them with
//
//	go test -run '^$' -bench . -benchtime 50x ./test/e2e/
//
// (without -race: the binaries are then built without it too).

// system is a server and an attested agent with a go-spiffe watcher.
type system struct {
	srv     *server
	agent   *agent
	agentID string
	admin   adminv1.AdminClient
	updates chan *workloadapi.X509Context
}

type countWatcher struct{ updates chan *workloadapi.X509Context }

func (w countWatcher) OnX509ContextUpdate(c *workloadapi.X509Context) {
	select {
	case w.updates <- c:
	default:
		// Keep only the newest: drop the oldest queued update.
		select {
		case <-w.updates:
		default:
		}
		w.updates <- c
	}
}

func (w countWatcher) OnX509ContextWatchError(error) {}

func startSystem(b *testing.B) *system {
	b.Helper()
	srv := startServer(b)
	bundle := srv.bundle(b)
	sw := e2e.suite.Start(b)
	id := agentID(b, readEKs(b, sw)[0])
	a := startAgent(b, srv, sw, bundle)
	a.waitServing(b)
	conn, err := grpc.NewClient("unix://"+srv.socketPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	s := &system{srv: srv, agent: a, agentID: id, admin: adminv1.NewAdminClient(conn), updates: make(chan *workloadapi.X509Context, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	b.Cleanup(cancel)
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+a.socketPath))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { client.Close() })
	go func() { _ = client.WatchX509Context(ctx, countWatcher{s.updates}) }()
	// Warm up: one entry, so the watcher holds an identity (a workload with
	// none gets PermissionDenied and go-spiffe backs off before retrying).
	warm := s.entries("warm", 1)[0]
	if _, err := s.admin.BatchCreateEntry(ctx, &adminv1.BatchCreateEntryRequest{Entries: []*agentv1.Entry{warm}}); err != nil {
		b.Fatal(err)
	}
	s.waitFor(b, warm.SpiffeId, func(c *workloadapi.X509Context) bool { return hasID(c, warm.SpiffeId) })
	return s
}

// entries makes n workload entries for this process's uid under the agent.
func (s *system) entries(prefix string, n int) []*agentv1.Entry {
	uid := strconv.Itoa(os.Getuid())
	out := make([]*agentv1.Entry, n)
	for i := range out {
		out[i] = &agentv1.Entry{
			SpiffeId:  fmt.Sprintf("spiffe://%s/bench/%s/%d", trustDomain, prefix, i),
			ParentId:  s.agentID,
			Selectors: []*agentv1.Selector{{Type: "unix", Value: "uid:" + uid}},
		}
	}
	return out
}

// waitFor waits for a watcher update satisfying ok.
func (s *system) waitFor(b *testing.B, what string, ok func(*workloadapi.X509Context) bool) {
	b.Helper()
	timeout := time.After(time.Minute)
	for {
		select {
		case c := <-s.updates:
			if ok(c) {
				return
			}
		case <-timeout:
			b.Fatalf("no workload update with %s", what)
		}
	}
}

func hasID(c *workloadapi.X509Context, id string) bool {
	for _, sv := range c.SVIDs {
		if sv.ID.String() == id {
			return true
		}
	}
	return false
}

// BenchmarkEntryCreateToWorkload is the latency from an entry committed by
// the admin API to a watching workload holding its SVID: server Sync push,
// agent CSR and BatchNewX509SVID, Workload API update. SPIRE's agent polls
// every 5 s; the target here is < 0.5 s.
func BenchmarkEntryCreateToWorkload(b *testing.B) {
	s := startSystem(b)
	ctx := context.Background()
	var lat []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		e := s.entries(fmt.Sprintf("latency-%d", i), 1)[0]
		start := time.Now()
		if _, err := s.admin.BatchCreateEntry(ctx, &adminv1.BatchCreateEntryRequest{Entries: []*agentv1.Entry{e}}); err != nil {
			b.Fatal(err)
		}
		s.waitFor(b, e.SpiffeId, func(c *workloadapi.X509Context) bool { return hasID(c, e.SpiffeId) })
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	reportPercentiles(b, lat)
}

// BenchmarkThousandEntriesToWorkload creates 1,000 entries in one batch and
// measures until one workload has all 1,000 SVIDs (target < 1 s), then
// reports the agent's resident memory with them cached (target ≤ 35 MB).
func BenchmarkThousandEntriesToWorkload(b *testing.B) {
	const n = 1000
	var total time.Duration
	var rss int64
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		s := startSystem(b)
		es := s.entries("thousand", n)
		b.StartTimer()
		start := time.Now()
		if _, err := s.admin.BatchCreateEntry(context.Background(), &adminv1.BatchCreateEntryRequest{Entries: es}); err != nil {
			b.Fatal(err)
		}
		s.waitFor(b, fmt.Sprintf("%d SVIDs", n), func(c *workloadapi.X509Context) bool { return len(c.SVIDs) >= n+1 })
		total += time.Since(start)
		b.StopTimer()
		rss = max(rss, vmRSS(b, s.agent.cmd.Process.Pid))
	}
	b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms/1000-SVIDs")
	b.ReportMetric(float64(rss)/1024, "agent-RSS-MB")
}

// vmRSS reads a process's resident set size in KiB.
func vmRSS(b *testing.B, pid int) int64 {
	b.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				b.Fatal(err)
			}
			return kb
		}
	}
	b.Fatal("no VmRSS")
	return 0
}

func reportPercentiles(b *testing.B, d []time.Duration) {
	if len(d) == 0 {
		return
	}
	slices.Sort(d)
	p := func(q float64) float64 { return float64(d[int(q*float64(len(d)-1))].Microseconds()) / 1000 }
	b.ReportMetric(p(0.5), "p50-ms")
	b.ReportMetric(p(0.99), "p99-ms")
}

// BenchmarkNewConnectionFetchX509Context is a workload's cost of asking the
// real agent for its identity on a new connection: dial the socket, unix
// attestation (SO_PEERCRED, /proc), FetchX509Context, close (target p50 ≤
// 0.7 ms).
func BenchmarkNewConnectionFetchX509Context(b *testing.B) {
	s := startSystem(b)
	addr := workloadapi.WithAddr("unix://" + s.agent.socketPath)
	ctx := context.Background()
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		c, err := workloadapi.FetchX509Context(ctx, addr)
		if err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
		if len(c.SVIDs) == 0 {
			b.Fatal("no SVID")
		}
	}
	b.StopTimer()
	reportPercentiles(b, lat)
}
