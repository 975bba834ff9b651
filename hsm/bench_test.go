//go:build cgo

package hsm

import (
	"context"
	"crypto"
	"crypto/sha256"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
)

// BenchmarkSignECDSAP256 compares the hsm signer (pool, recovery checks,
// DER encoding) with a bare miekg/pkcs11 C_SignInit+C_Sign loop, one
// session per goroutine, on the same SoftHSM token and key.
//
//	go test -run '^$' -bench SignECDSAP256 -benchtime 3s ./hsm/
func BenchmarkSignECDSAP256(b *testing.B) {
	h, _ := openToken(b, WithMaxSessions(8))
	k := generate(b, h, ECP256, "bench-p256")
	digest := sha256.Sum256([]byte("benchmark"))
	ctx := context.Background()
	for _, g := range []int{1, 2, 4, 8} {
		b.Run(fmt.Sprintf("raw/goroutines=%d", g), func(b *testing.B) {
			sessions := make([]pkcs11.SessionHandle, g)
			for i := range sessions {
				sh, err := h.mod.ctx.OpenSession(h.state.Load().slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
				if err != nil {
					b.Fatalf("C_OpenSession: %v", err)
				}
				sessions[i] = sh
			}
			b.Cleanup(func() {
				for _, sh := range sessions {
					_ = h.mod.ctx.CloseSession(sh)
				}
			})
			priv := k.handles.Load().priv
			mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}
			runSigners(b, g, func(w int) error {
				if err := h.mod.ctx.SignInit(sessions[w], mech, priv); err != nil {
					return err
				}
				_, err := h.mod.ctx.Sign(sessions[w], digest[:])
				return err
			})
		})
		b.Run(fmt.Sprintf("signer/goroutines=%d", g), func(b *testing.B) {
			runSigners(b, g, func(int) error {
				_, err := k.SignContext(ctx, digest[:], crypto.SHA256)
				return err
			})
		})
	}
}

// BenchmarkSignECDSAP256Paired measures the signer and the raw loop in
// alternating chunks of 256 signatures, so both see the same machine load;
// it reports both rates and their ratio (signer/raw; target >= 0.9).
//
//	go test -run '^$' -bench SignECDSAP256Paired -benchtime 20000x ./hsm/
func BenchmarkSignECDSAP256Paired(b *testing.B) {
	h, _ := openToken(b, WithMaxSessions(8))
	k := generate(b, h, ECP256, "bench-paired")
	digest := sha256.Sum256([]byte("benchmark"))
	ctx := context.Background()
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}
	for _, g := range []int{1, 2, 4, 8} {
		b.Run(fmt.Sprintf("goroutines=%d", g), func(b *testing.B) {
			sessions := make([]pkcs11.SessionHandle, g)
			for i := range sessions {
				sh, err := h.mod.ctx.OpenSession(h.state.Load().slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
				if err != nil {
					b.Fatalf("C_OpenSession: %v", err)
				}
				sessions[i] = sh
			}
			b.Cleanup(func() {
				for _, sh := range sessions {
					_ = h.mod.ctx.CloseSession(sh)
				}
			})
			priv := k.handles.Load().priv
			raw := func(w int) error {
				if err := h.mod.ctx.SignInit(sessions[w], mech, priv); err != nil {
					return err
				}
				_, err := h.mod.ctx.Sign(sessions[w], digest[:])
				return err
			}
			signer := func(int) error {
				_, err := k.SignContext(ctx, digest[:], crypto.SHA256)
				return err
			}
			var rawTime, signerTime time.Duration
			const chunk = 256
			b.ResetTimer()
			for done := 0; done < b.N; done += chunk {
				n := min(chunk, b.N-done)
				d, err := timeSigners(g, n, raw)
				if err != nil {
					b.Fatalf("raw signing: %v", err)
				}
				rawTime += d
				if d, err = timeSigners(g, n, signer); err != nil {
					b.Fatalf("signer: %v", err)
				}
				signerTime += d
			}
			b.StopTimer()
			rawRate := float64(b.N) / rawTime.Seconds()
			signerRate := float64(b.N) / signerTime.Seconds()
			b.ReportMetric(rawRate, "raw-sig/s")
			b.ReportMetric(signerRate, "signer-sig/s")
			b.ReportMetric(signerRate/rawRate, "signer/raw")
		})
	}
}

// timeSigners makes n signatures with g goroutines and returns the time.
func timeSigners(g, n int, sign func(w int) error) (time.Duration, error) {
	var (
		next    atomic.Int64
		wg      sync.WaitGroup
		errOnce sync.Once
		firstEr error
	)
	start := time.Now()
	for w := range g {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				if err := sign(w); err != nil {
					errOnce.Do(func() { firstEr = err })
					return
				}
			}
		}()
	}
	wg.Wait()
	return time.Since(start), firstEr
}

// runSigners shares b.N signatures among g goroutines (worker index w) and
// reports signatures per second.
func runSigners(b *testing.B, g int, sign func(w int) error) {
	b.Helper()
	var (
		next    atomic.Int64
		wg      sync.WaitGroup
		errOnce sync.Once
		firstEr error
	)
	b.ResetTimer()
	start := time.Now()
	for w := range g {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(b.N) {
				if err := sign(w); err != nil {
					errOnce.Do(func() { firstEr = err })
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	if firstEr != nil {
		b.Fatalf("signing: %v", firstEr)
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "sig/s")
}
