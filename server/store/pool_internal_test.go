package store

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
)

// TestPoolKeepsConnections: many concurrent readers (one per Sync stream)
// reuse a bounded set of connections instead of opening and closing one per
// query, which parses the schema and pragmas each time.
func TestPoolKeepsConnections(t *testing.T) {
	ctx := context.Background()
	s, err := OpenSQLite(ctx, filepath.Join(t.TempDir(), "pool.sqlite3"), WithMaxConns(4))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	id := "spiffe://example.org/ironroot/agent/tpm/ab"
	if _, err := s.UpsertNode(ctx, &Node{SPIFFEID: id, EKHash: "ab", CertSerial: "1"}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for range 64 {
		wg.Go(func() {
			for range 20 {
				if _, err := s.GetNode(ctx, id); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	st := s.db.Stats()
	if st.MaxOpenConnections != 4 || st.OpenConnections > 4 {
		t.Errorf("pool: max %d, open %d; want at most 4", st.MaxOpenConnections, st.OpenConnections)
	}
	if st.MaxIdleClosed != 0 {
		t.Errorf("%d connections were closed for exceeding the idle limit: the pool churns", st.MaxIdleClosed)
	}
}
