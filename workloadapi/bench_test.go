package workloadapi_test

import (
	"context"
	"slices"
	"testing"
	"time"

	gsw "github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/ironroot/ironroot/agent/workloadattestor/unix"
	"github.com/ironroot/ironroot/workloadapi"
)

// BenchmarkNewConnectionFetchX509Context measures what a workload pays for
// a one-shot fetch: dial, handshake (SO_PEERCRED, pidfd), attestation with
// the real unix attestor, FetchX509Context with one SVID, close. p50 and p99
// of the recorded durations are reported as custom metrics.
func BenchmarkNewConnectionFetchX509Context(b *testing.B) {
	always := func() bool { return true }
	cases := []struct {
		name     string
		attestor workloadapi.Attestor
	}{
		{"uid", unix.New()},
		{"path+sha256-warm", unix.New(unix.WithPathSelectors(always), unix.WithSHA256Selectors(always))},
	}
	for _, bc := range cases {
		b.Run(bc.name, func(b *testing.B) {
			f := newFixture(b, fixtureOpts{attestor: bc.attestor, svids: 1})
			ctx := context.Background()
			fetch := func() {
				c, err := gsw.New(ctx, gsw.WithAddr(f.addr))
				if err != nil {
					b.Fatal(err)
				}
				xc, err := c.FetchX509Context(ctx)
				if err != nil {
					b.Fatal(err)
				}
				if len(xc.SVIDs) != 1 {
					b.Fatalf("%d SVIDs", len(xc.SVIDs))
				}
				c.Close()
			}
			fetch() // warms the hash and name caches
			durs := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for b.Loop() {
				start := time.Now()
				fetch()
				durs = append(durs, time.Since(start))
			}
			b.StopTimer()
			slices.Sort(durs)
			pct := func(p float64) float64 {
				return float64(durs[int(p*float64(len(durs)-1))].Microseconds()) / 1000
			}
			b.ReportMetric(pct(0.50), "p50-ms")
			b.ReportMetric(pct(0.99), "p99-ms")
		})
	}
}
