package server_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	adminv1 "github.com/ironroot/ironroot/server/api/admin/v1"
	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/server/store"
)

// BenchmarkBatchNewX509SVID measures X509-SVID signing throughput over the
// real path: gRPC over mTLS, agent authentication against the node record,
// per-CSR authorization in the entry cache, CSR parsing and an ECDSA P-256
// signature by the CA key in SoftHSM. Each caller has its own connection
// (as separate agents do) and sends batches back to back.
//
//	go test -run '^$' -bench BatchNewX509SVID -benchtime 5s ./server/
func BenchmarkBatchNewX509SVID(b *testing.B) {
	e := newEnv(b)
	a := e.newAgent()
	ctx := context.Background()
	var entryIDs []string
	for i := range 100 {
		en, err := e.srv.Store().CreateEntry(ctx, &store.Entry{
			SPIFFEID: fmt.Sprintf("spiffe://example.org/w/%d", i), ParentID: a.id.String(),
			Selectors: []store.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", i)}},
		})
		if err != nil {
			b.Fatal(err)
		}
		entryIDs = append(entryIDs, en.ID)
	}
	if err := waitCache(ctx, e, entryIDs[len(entryIDs)-1], a); err != nil {
		b.Fatal(err)
	}
	csrs := make([][]byte, 64)
	for i := range csrs {
		csrs[i] = newCSR(b)
	}
	for _, batch := range []int{100, 500} {
		req := &agentv1.BatchNewX509SVIDRequest{}
		for i := range batch {
			req.Params = append(req.Params, &agentv1.X509SVIDParams{EntryId: entryIDs[i%len(entryIDs)], Csr: csrs[i%len(csrs)]})
		}
		for _, callers := range []int{1, 4} {
			b.Run(fmt.Sprintf("batch=%d/callers=%d", batch, callers), func(b *testing.B) {
				clients := make([]agentv1.AgentClient, callers)
				for i := range clients {
					clients[i] = e.dial(a.svid)
					if _, err := clients[i].BatchNewX509SVID(ctx, req); err != nil { // warm the connection
						b.Fatal(err)
					}
				}
				var next int64
				var mu sync.Mutex
				take := func() bool {
					mu.Lock()
					defer mu.Unlock()
					next++
					return next <= int64(b.N)
				}
				errs := make(chan error, callers)
				b.ResetTimer()
				cpu0 := processCPU(b)
				start := time.Now()
				var wg sync.WaitGroup
				for _, c := range clients {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for take() {
							resp, err := c.BatchNewX509SVID(ctx, req)
							if err != nil {
								errs <- err
								return
							}
							if r := resp.Results[len(resp.Results)-1]; r.Svid == nil {
								errs <- fmt.Errorf("CSR refused: %v", r.Status)
								return
							}
						}
					}()
				}
				wg.Wait()
				elapsed := time.Since(start)
				cpu := processCPU(b) - cpu0
				b.StopTimer()
				select {
				case err := <-errs:
					b.Fatal(err)
				default:
				}
				svids := float64(b.N * batch)
				b.ReportMetric(svids/elapsed.Seconds(), "SVIDs/s")
				// CPU per SVID (server and client in this process) does not
				// depend on what else the machine runs: 2 cores / it is the
				// throughput two dedicated cores would reach.
				b.ReportMetric(float64(cpu.Microseconds())/svids, "cpu-µs/SVID")
			})
		}
	}
}

// waitCache waits until the entry cache serves entryID to the agent, so a
// benchmark does not start before its entries are visible.
func waitCache(ctx context.Context, e *env, entryID string, a *agent) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st := e.openSync(e.dial(a.svid))
	for {
		select {
		case m, ok := <-st.msgs:
			if !ok {
				return <-st.err
			}
			for _, en := range m.Upserted {
				if en.Id == entryID {
					st.cancel()
					return nil
				}
			}
		case <-ctx.Done():
			return fmt.Errorf("entry %s never reached the agent: %w", entryID, ctx.Err())
		}
	}
}

// BenchmarkSyncLatency measures how long an entry change takes to reach a
// connected Sync stream: from the start of the commit (store.CreateEntry in
// the server's process, or the admin API call the CLI makes) to the
// agent's Recv of the message carrying it. Reports p50 and p99 in ms; the
// target is < 100 ms.
//
//	go test -run '^$' -bench SyncLatency -benchtime 500x ./server/
func BenchmarkSyncLatency(b *testing.B) {
	e := newEnv(b)
	a := e.newAgent()
	other := e.newAgent()
	ctx := context.Background()
	// Background entries the agent is not authorized for, so authorization
	// is computed among realistic numbers.
	var batch []*store.Entry
	for i := range 1000 {
		batch = append(batch, &store.Entry{
			SPIFFEID: fmt.Sprintf("spiffe://example.org/bg/%d", i), ParentID: other.id.String(),
			Selectors: []store.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", i)}},
		})
	}
	if _, err := e.srv.Store().CreateEntries(ctx, batch); err != nil {
		b.Fatal(err)
	}
	conn, err := grpc.NewClient("unix://"+e.cfg.SocketPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	admin := adminv1.NewAdminClient(conn)

	st := e.openSync(e.dial(a.svid))
	st.next(b) // the full set

	create := map[string]func(i int) (string, error){
		"store-commit": func(i int) (string, error) {
			en, err := e.srv.Store().CreateEntry(ctx, &store.Entry{
				SPIFFEID: fmt.Sprintf("spiffe://example.org/s/%d", i), ParentID: a.id.String(),
				Selectors: []store.Selector{{Type: "unix", Value: "uid:1"}},
			})
			if err != nil {
				return "", err
			}
			return en.ID, nil
		},
		"admin-api": func(i int) (string, error) {
			resp, err := admin.BatchCreateEntry(ctx, &adminv1.BatchCreateEntryRequest{Entries: []*agentv1.Entry{{
				SpiffeId: fmt.Sprintf("spiffe://example.org/a/%d", i), ParentId: a.id.String(),
				Selectors: []*agentv1.Selector{{Type: "unix", Value: "uid:1"}},
			}}})
			if err != nil {
				return "", err
			}
			return resp.Entries[0].Id, nil
		},
	}
	var round int
	for _, name := range []string{"store-commit", "admin-api"} {
		b.Run(name, func(b *testing.B) {
			lat := make([]time.Duration, 0, b.N)
			for range b.N {
				round++
				start := time.Now()
				id, err := create[name](round)
				if err != nil {
					b.Fatal(err)
				}
				for got := false; !got; {
					m := st.next(b)
					got = slices.ContainsFunc(m.Upserted, func(en *agentv1.Entry) bool { return en.Id == id })
				}
				lat = append(lat, time.Since(start))
			}
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(ms(lat[len(lat)/2]), "p50-ms")
			b.ReportMetric(ms(lat[(len(lat)*99)/100]), "p99-ms")
			b.ReportMetric(ms(lat[len(lat)-1]), "max-ms")
		})
	}
}

// processCPU is the user+system CPU time this process has used.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// BenchmarkSyncFanout measures one entry change reaching many connected
// agents: every iteration creates an entry under a node alias all of them
// match, and waits until every stream received it. Reports the latency to
// the last stream (p50, p99) and the process CPU per change, which is what
// grows with the number of connected agents.
//
//	go test -run '^$' -bench SyncFanout -benchtime 200x ./server/
func BenchmarkSyncFanout(b *testing.B) {
	e := newEnv(b)
	ctx := context.Background()
	sel := store.Selector{Type: "tpm", Value: manufacturer}
	alias, err := e.srv.Store().CreateEntry(ctx, &store.Entry{
		SPIFFEID: "spiffe://example.org/fleet", ParentID: "spiffe://example.org/ironroot/server", Selectors: []store.Selector{sel},
	})
	if err != nil {
		b.Fatal(err)
	}
	var seq int // entry names stay unique across b.Run's repeated calls
	for _, agents := range []int{10, 100, 500} {
		b.Run(fmt.Sprintf("agents=%d", agents), func(b *testing.B) {
			streams := make([]*syncStream, agents)
			for i := range streams {
				a := e.newAgent(sel)
				streams[i] = e.openSync(e.dial(a.svid))
				streams[i].next(b)
			}
			defer func() {
				for _, st := range streams {
					st.cancel()
				}
			}()
			lat := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			cpu0 := processCPU(b)
			for range b.N {
				seq++
				start := time.Now()
				en, err := e.srv.Store().CreateEntry(ctx, &store.Entry{
					SPIFFEID: fmt.Sprintf("spiffe://example.org/fan/%d", seq), ParentID: alias.SPIFFEID,
					Selectors: []store.Selector{{Type: "unix", Value: "uid:1"}},
				})
				if err != nil {
					b.Fatal(err)
				}
				for _, st := range streams {
					for got := false; !got; {
						m := st.next(b)
						got = slices.ContainsFunc(m.Upserted, func(x *agentv1.Entry) bool { return x.Id == en.ID })
					}
				}
				lat = append(lat, time.Since(start))
			}
			cpu := processCPU(b) - cpu0
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(ms(lat[len(lat)/2]), "p50-ms")
			b.ReportMetric(ms(lat[(len(lat)*99)/100]), "p99-ms")
			b.ReportMetric(float64(cpu.Microseconds())/float64(b.N)/1000, "cpu-ms/change")
		})
	}
}
