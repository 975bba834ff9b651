package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/ironroot/ironroot/agent/config"
)

// BenchmarkStart measures an agent start until its cache is ready (first
// full sync applied, the one workload SVID signed), against an in-process
// server on SoftHSM and the agent on swtpm: "attest" starts from an empty
// data directory (full TPM attestation), "resume" from a saved identity.
// Stopping the agent is not timed.
func BenchmarkStart(b *testing.B) {
	srv := newServer(b, nil)
	sw := suite.Start(b)
	cfg := agentConfig(b, srv, sw)
	warm := startAgent(b, cfg)
	svid := warm.waitAttested()
	srv.createEntry(workloadID, svid.ID)
	waitReady(b, warm)
	warm.stop()

	for _, bc := range []struct {
		name   string
		resume bool
	}{{"attest", false}, {"resume", true}} {
		b.Run(bc.name, func(b *testing.B) {
			for b.Loop() {
				if !bc.resume {
					b.StopTimer()
					for _, f := range []string{svidFile, keyBlobFile} {
						if err := os.Remove(filepath.Join(cfg.DataDir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
							b.Fatal(err)
						}
					}
					b.StartTimer()
				}
				a := runAgent(b, cfg)
				b.StopTimer()
				a.stop()
				b.StartTimer()
			}
		})
	}
}

// runAgent starts an agent and waits until its cache is ready.
func runAgent(b *testing.B, cfg *config.Config) *testAgent {
	ta := startAgent(b, cfg)
	waitReady(b, ta)
	return ta
}

// waitReady waits for the agent's first full sync to be signed.
func waitReady(tb testing.TB, ta *testAgent) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	select {
	case <-ta.a.mgr.Ready():
	case <-ctx.Done():
		tb.Fatalf("the agent's cache was not ready within %s", deadline)
	}
}
