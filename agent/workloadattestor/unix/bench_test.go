package unix

import (
	"context"
	"os"
	"testing"
)

// BenchmarkAttest measures one attestation of the benchmark process itself:
// the /proc reads, cached name lookups and, with sha256, a hash cache hit.
func BenchmarkAttest(b *testing.B) {
	cases := []struct {
		name string
		opts []Option
	}{
		{"uid", nil},
		{"path+sha256-warm", []Option{WithPathSelectors(always), WithSHA256Selectors(always)}},
	}
	pid := int32(os.Getpid())
	for _, bc := range cases {
		b.Run(bc.name, func(b *testing.B) {
			a := New(bc.opts...)
			ctx := context.Background()
			if _, err := a.Attest(ctx, pid); err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				if _, err := a.Attest(ctx, pid); err != nil {
					b.Fatal(err)
				}
			}
			if a.HashCount() > 1 {
				b.Fatalf("hashed %d times: cache miss", a.HashCount())
			}
		})
	}
	// Cold: the hash cache is emptied before each attestation, so the
	// executable (the test binary) is read and hashed every time.
	b.Run("path+sha256-cold", func(b *testing.B) {
		a := New(WithPathSelectors(always), WithSHA256Selectors(always))
		ctx := context.Background()
		fi, err := os.Stat("/proc/self/exe")
		if err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			a.hashes.mu.Lock()
			a.hashes.items, a.hashes.ll = nil, nil
			a.hashes.mu.Unlock()
			if _, err := a.Attest(ctx, pid); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(fi.Size())/(1<<20), "exe-MiB")
	})
}
