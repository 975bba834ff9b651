package tpm

import (
	"context"
	"crypto"
	"crypto/sha256"
	"testing"
)

// Benchmarks run against swtpm: go test -run '^$' -bench . -benchtime 2s ./tpm/

func BenchmarkNewAK(b *testing.B) {
	for _, tr := range transports {
		b.Run(tr.name, func(b *testing.B) {
			_, tp := startAndOpen(b, tr.opts...)
			ctx := context.Background()
			for b.Loop() {
				ak, err := tp.NewAK(ctx)
				if err != nil {
					b.Fatal(err)
				}
				ak.Close()
			}
		})
	}
}

func BenchmarkActivateCredential(b *testing.B) {
	for _, alg := range []string{AlgRSA2048, AlgP384} {
		b.Run(alg, func(b *testing.B) {
			_, tp := startAndOpen(b)
			ctx := context.Background()
			ak := newAK(b, tp)
			ek := eksByAlg(b, tp)[alg]
			ch := challenge(b, ek, ak.AttestationParameters().Public, nonce(b))
			for b.Loop() {
				if _, err := ak.ActivateCredential(ctx, ek, ch); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkQuote(b *testing.B) {
	for _, tr := range transports {
		b.Run(tr.name, func(b *testing.B) {
			_, tp := startAndOpen(b, tr.opts...)
			ctx := context.Background()
			ak := newAK(b, tp)
			n := nonce(b)
			for b.Loop() {
				if _, _, err := ak.Quote(ctx, n, PCRSelection{}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkNewKey(b *testing.B) {
	_, tp := startAndOpen(b)
	ctx := context.Background()
	ak := newAK(b, tp)
	n := nonce(b)
	for b.Loop() {
		k, _, err := tp.NewKey(ctx, ak, n)
		if err != nil {
			b.Fatal(err)
		}
		k.Close()
	}
}

func BenchmarkKeySign(b *testing.B) {
	for _, tr := range transports {
		b.Run(tr.name, func(b *testing.B) {
			_, tp := startAndOpen(b, tr.opts...)
			ak := newAK(b, tp)
			key, _, err := tp.NewKey(context.Background(), ak, nonce(b))
			if err != nil {
				b.Fatal(err)
			}
			d := sha256.Sum256([]byte("bench"))
			for b.Loop() {
				if _, err := key.Sign(nil, d[:], crypto.SHA256); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkEndorsementKeys(b *testing.B) {
	_, tp := startAndOpen(b)
	ctx := context.Background()
	for b.Loop() {
		if _, err := tp.EndorsementKeys(ctx); err != nil {
			b.Fatal(err)
		}
	}
}
