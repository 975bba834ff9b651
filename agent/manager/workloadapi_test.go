package manager

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	gsw "github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/ironroot/ironroot/agent/workloadattestor/unix"
	"github.com/ironroot/ironroot/workloadapi"
)

// watcher records what a go-spiffe client watching the Workload API sees.
type watcher struct{ updates chan *gsw.X509Context }

func (w watcher) OnX509ContextUpdate(c *gsw.X509Context) { w.updates <- c }
func (w watcher) OnX509ContextWatchError(error)          {}

func myUID() string { return "unix:uid:" + strconv.Itoa(os.Geteuid()) }

// watchThroughWorkloadAPI serves m on a Workload API socket with the real
// unix attestor and has a go-spiffe client watch it; all stops at cleanup.
func watchThroughWorkloadAPI(t testing.TB, m *Manager) (context.Context, watcher, *gsw.Client) {
	t.Helper()
	srv, err := workloadapi.New(unix.New(unix.WithPathSelectors(m.UsesPathSelectors), unix.WithSHA256Selectors(m.UsesSHA256Selectors)), m)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "agent.sock")
	lis, err := workloadapi.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, lis) }()
	client, err := gsw.New(ctx, gsw.WithAddr(workloadapi.SocketPathAddress(sock)))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	w := watcher{updates: make(chan *gsw.X509Context, 16)}
	watched := make(chan error, 1)
	go func() { watched <- client.WatchX509Context(ctx, w) }()
	t.Cleanup(func() {
		cancel()
		<-watched
		client.Close()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return ctx, w, client
}

// TestThroughWorkloadAPI runs the manager behind the real Workload API
// server and unix attestor, and a go-spiffe client watching it.
func TestThroughWorkloadAPI(t *testing.T) {
	uid := myUID()
	h := start(t, Config{}, workloadEntry("e-a", "/a", 1, uid))
	<-h.m.Ready()
	ctx, w, client := watchThroughWorkloadAPI(t, h.m)

	await := func(want ...string) *gsw.X509Context {
		t.Helper()
		deadline := time.NewTimer(waitLimit)
		defer deadline.Stop()
		for {
			select {
			case c := <-w.updates:
				var got []string
				for _, s := range c.SVIDs {
					got = append(got, s.ID.Path())
				}
				if slices.Equal(got, want) {
					return c
				}
			case <-deadline.C:
				t.Fatalf("workload never saw %v", want)
			}
		}
	}
	c := await("/a")
	if _, _, err := x509svid.Verify(c.SVIDs[0].Certificates, c.Bundles); err != nil {
		t.Fatalf("SVID does not verify: %v", err)
	}

	h.fake.upsert(workloadEntry("e-b", "/b", 1, uid))
	await("/a", "/b")
	h.fake.remove("e-a")
	await("/b")

	tok, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "db"})
	if err != nil {
		t.Fatalf("FetchJWTSVID: %v", err)
	}
	if tok.ID.Path() != "/b" {
		t.Errorf("JWT-SVID for %s, want /b", tok.ID)
	}
	if _, err := client.ValidateJWTSVID(ctx, tok.Marshal(), "db"); err != nil {
		t.Errorf("ValidateJWTSVID: %v", err)
	}
	if _, err := client.ValidateJWTSVID(ctx, tok.Marshal(), "other"); err == nil {
		t.Error("ValidateJWTSVID accepted the wrong audience")
	}
}
