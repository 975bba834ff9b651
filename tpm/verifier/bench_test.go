package verifier

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/ironroot/ironroot/simulator"
	"github.com/ironroot/ironroot/tpm"
)

// BenchmarkAttestation measures the verifier's CPU per attestation (Begin +
// Activate + Finish) on evidence recorded from swtpm once: the TPM's own
// time is not in the loop. The quote and key certification are made over a
// fixed nonce, which each iteration substitutes for the fresh one Activate
// mints; the activation secret is taken from the session, as only the TPM
// could recover it.
func BenchmarkAttestation(b *testing.B) {
	for _, bc := range []struct {
		name  string
		alg   string
		log   bool
		cache int
	}{
		{"rsa2048", tpm.AlgRSA2048, false, defaultChainCacheSize},
		{"rsa2048/no-chain-cache", tpm.AlgRSA2048, false, 0},
		{"ecc-p384", tpm.AlgP384, false, defaultChainCacheSize},
		{"rsa2048+eventlog", tpm.AlgRSA2048, true, defaultChainCacheSize},
	} {
		b.Run(bc.name, func(b *testing.B) {
			ctx := context.Background()
			sw := suite.Start(b)
			pcrs := defaultPCRs
			var opts []tpm.Option
			if bc.log {
				l, err := simulator.UEFIBootLog(simulator.BootOptions{SecureBoot: true})
				if err != nil {
					b.Fatal(err)
				}
				extend(b, sw, l)
				path := filepath.Join(b.TempDir(), "log")
				if err := os.WriteFile(path, l.Bytes(), 0o600); err != nil {
					b.Fatal(err)
				}
				opts = append(opts, tpm.WithEventLogPath(path))
				pcrs = []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}
			}
			n := openNode(b, sw, opts...)
			v := suiteVerifier(b, func(c *Config) { c.PCRs = pcrs }, WithEKChainCache(bc.cache))
			ak, err := n.tpm.NewAK(ctx)
			if err != nil {
				b.Fatal(err)
			}
			id := ak.Identity(n.eks[bc.alg])
			fixed := bytes.Repeat([]byte{0x42}, 32)
			ev, _ := evidence(b, n, ak, fixed, pcrs)
			once := func(prev *ClockInfo) (*Result, error) {
				s, _, err := v.Begin(ctx, id)
				if err != nil {
					return nil, err
				}
				s.mu.Lock()
				secret := s.secret
				s.mu.Unlock()
				nonce, err := s.Activate(ctx, tpm.ActivationProof{Secret: secret})
				if err != nil {
					return nil, err
				}
				v.mu.Lock()
				exp := v.nonces[string(nonce)]
				delete(v.nonces, string(nonce))
				v.nonces[string(fixed)] = exp
				v.mu.Unlock()
				s.mu.Lock()
				s.nonce = fixed
				s.mu.Unlock()
				return s.Finish(ctx, ev, prev)
			}
			res, err := once(nil)
			if err != nil {
				b.Fatalf("recorded evidence does not verify: %v", err)
			}
			if bc.log && res.SecureBoot == nil {
				b.Fatal("event log not evaluated")
			}
			prev := res.Clock
			prev.Clock--
			b.ReportAllocs()
			// The machine is shared: wall time per op depends on the load,
			// so the process CPU time per op is reported as well.
			cpu0 := cpuTime(b)
			for b.Loop() {
				if _, err := once(&prev); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64((cpuTime(b)-cpu0).Nanoseconds())/float64(b.N), "cpu-ns/op")
		})
	}
}

// cpuTime is the process's user+system CPU time.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
