package workloadapi

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// feedSource hands out one Feed the test pushes to.
type feedSource struct{ feed *Feed }

func (s feedSource) Subscribe(context.Context, []Selector) (Subscription, error) { return s.feed, nil }
func (feedSource) FetchJWTSVIDs(context.Context, []Selector, []string, spiffeid.ID) ([]JWTSVID, error) {
	return nil, ErrNoIdentity
}

type nopAttestor struct{}

func (nopAttestor) Attest(context.Context, int32) ([]Selector, error) { return nil, nil }

// TestFollowSkipsUnchangedResponses checks that a stream sends a response
// only when it differs from the last one sent (a bundle stream must not
// repeat itself when only an SVID changed).
func TestFollowSkipsUnchangedResponses(t *testing.T) {
	feed := NewFeed(nil, nil)
	srv, err := New(nopAttestor{}, feedSource{feed})
	if err != nil {
		t.Fatal(err)
	}
	// Each snapshot's "bundle" is its single hint; build is what a stream
	// sends for it.
	built := make(chan string, 10)
	build := func(s *Snapshot) (*workload.X509BundlesResponse, error) {
		h := s.SVIDs[0].Hint
		built <- h
		return &workload.X509BundlesResponse{Bundles: map[string][]byte{"spiffe://example.org": []byte(h)}}, nil
	}
	var sent []string
	send := func(r *workload.X509BundlesResponse) error {
		sent = append(sent, string(r.Bundles["spiffe://example.org"]))
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- follow(srv, ctx, nil, slog.New(slog.DiscardHandler), build, send) }()

	step := func(hint string) {
		t.Helper()
		feed.Push(&Snapshot{SVIDs: []X509SVID{{Hint: hint}}})
		select {
		case got := <-built:
			if got != hint {
				t.Fatalf("built %q, want %q", got, hint)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("snapshot %q never built", hint)
		}
	}
	// Waiting for each build keeps the Feed from merging snapshots; the
	// stream handles them in order, so by the time "c" is built the
	// comparison for the second "a" is done.
	for _, h := range []string{"a", "a", "b", "b", "b", "a", "c"} {
		step(h)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("follow: %v", err)
	}
	want := []string{"a", "b", "a", "c"}
	if len(sent) != len(want) {
		t.Fatalf("sent %v, want %v", sent, want)
	}
	for i := range want {
		if sent[i] != want[i] {
			t.Fatalf("sent %v, want %v", sent, want)
		}
	}
}

func TestX509ResponseDigest(t *testing.T) {
	base := func() *workload.X509SVIDResponse {
		return &workload.X509SVIDResponse{
			Svids: []*workload.X509SVID{
				{SpiffeId: "spiffe://example.org/a", X509Svid: []byte{1, 2}, X509SvidKey: []byte{3}, Bundle: []byte{4}, Hint: "h"},
				{SpiffeId: "spiffe://example.org/b", X509Svid: []byte{5}, X509SvidKey: []byte{6}, Bundle: []byte{4}},
			},
			FederatedBundles: map[string][]byte{"spiffe://x.test": {7}, "spiffe://y.test": {8}},
		}
	}
	want, ok := responseDigest(base())
	if !ok {
		t.Fatal("no digest")
	}
	if again, _ := responseDigest(base()); again != want {
		t.Fatal("equal responses digest differently")
	}
	for _, tc := range []struct {
		name   string
		mutate func(r *workload.X509SVIDResponse)
	}{
		{"SVID order", func(r *workload.X509SVIDResponse) { r.Svids[0], r.Svids[1] = r.Svids[1], r.Svids[0] }},
		{"rotated certificate", func(r *workload.X509SVIDResponse) { r.Svids[0].X509Svid = []byte{1, 3} }},
		{"new key", func(r *workload.X509SVIDResponse) { r.Svids[1].X509SvidKey = []byte{9} }},
		{"bundle", func(r *workload.X509SVIDResponse) { r.Svids[1].Bundle = []byte{4, 4} }},
		{"hint", func(r *workload.X509SVIDResponse) { r.Svids[0].Hint = "" }},
		{"bytes moved between fields", func(r *workload.X509SVIDResponse) {
			r.Svids[0].X509Svid, r.Svids[0].X509SvidKey = []byte{1}, []byte{2, 3}
		}},
		{"SVID removed", func(r *workload.X509SVIDResponse) { r.Svids = r.Svids[:1] }},
		{"federated bundle changed", func(r *workload.X509SVIDResponse) { r.FederatedBundles["spiffe://y.test"] = []byte{9} }},
		{"federated bundle removed", func(r *workload.X509SVIDResponse) { delete(r.FederatedBundles, "spiffe://x.test") }},
		{"CRL added", func(r *workload.X509SVIDResponse) { r.Crl = [][]byte{{1}} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := base()
			tc.mutate(r)
			if got, _ := responseDigest(r); got == want {
				t.Error("a different response has the same digest")
			}
		})
	}
}
