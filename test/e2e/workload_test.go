package e2e

import (
	"context"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// idWatcher is a go-spiffe X509Context watcher that passes on the SPIFFE IDs
// of every update.
type idWatcher struct{ updates chan []string }

func (w idWatcher) OnX509ContextUpdate(c *workloadapi.X509Context) {
	ids := make([]string, 0, len(c.SVIDs))
	for _, s := range c.SVIDs {
		ids = append(ids, s.ID.String())
	}
	slices.Sort(ids)
	w.updates <- ids
}

func (w idWatcher) OnX509ContextWatchError(error) {}

// next returns the first update for which ok holds.
func (w idWatcher) next(t *testing.T, ctx context.Context, what string, ok func([]string) bool) []string {
	t.Helper()
	for {
		select {
		case ids := <-w.updates:
			if ok(ids) {
				return ids
			}
		case <-ctx.Done():
			t.Fatalf("watching workload: no update with %s", what)
		}
	}
}

func newClient(t *testing.T, ctx context.Context, a *agent) *workloadapi.Client {
	t.Helper()
	c, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+a.socketPath))
	if err != nil {
		t.Fatalf("connecting to the Workload API: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestWorkloadLifecycle follows one node through the life the issue's
// end-to-end suite describes, with the real binaries: Workload API misuse,
// X509 and JWT SVIDs validated, entries created and deleted under a
// watching workload, an agent restart resumed from its data directory, and
// a server restart the agent rides out.
func TestWorkloadLifecycle(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*readyTimeout)
	defer cancel()
	srv := startServer(t)
	bundlePath := srv.bundle(t)
	td := spiffeid.RequireTrustDomainFromString(trustDomain)
	bundle, err := x509bundle.Load(td, bundlePath)
	if err != nil {
		t.Fatal(err)
	}
	sw := e2e.suite.Start(t)
	id := agentID(t, readEKs(t, sw)[0])
	a := startAgent(t, srv, sw, bundlePath)
	a.waitServing(t)
	client := newClient(t, ctx, a)
	uid := "unix:uid:" + strconv.Itoa(os.Getuid())

	// Misuse: no entry for this uid yet, and a call without the security
	// header.
	if _, err := client.FetchX509SVID(ctx); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("FetchX509SVID for an unregistered uid: %v, want PermissionDenied", err)
	}
	noHeader(t, ctx, a)

	wlA := "spiffe://" + trustDomain + "/e2e/a"
	srv.cli(t, "entry", "create", "-spiffeID", wlA, "-parentID", id, "-selector", uid)
	svid := fetchSVID(t, ctx, client, wlA)
	if _, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil {
		t.Fatalf("X509-SVID does not verify against bundle show: %v", err)
	}
	checkJWT(t, ctx, client, wlA)

	// A watching workload receives a new entry's SVID on its open stream,
	// and loses it when the entry is deleted.
	w := idWatcher{updates: make(chan []string, 16)}
	watchCtx, stopWatch := context.WithCancel(ctx)
	watchDone := make(chan error, 1)
	go func() { watchDone <- client.WatchX509Context(watchCtx, w) }()
	t.Cleanup(func() { stopWatch(); <-watchDone })
	w.next(t, ctx, wlA, func(ids []string) bool { return slices.Equal(ids, []string{wlA}) })
	wlB := "spiffe://" + trustDomain + "/e2e/b"
	out := srv.cli(t, "entry", "create", "-spiffeID", wlB, "-parentID", id, "-selector", uid)
	entryB := entryIDFrom(t, out)
	w.next(t, ctx, wlB+" added", func(ids []string) bool { return slices.Equal(ids, []string{wlA, wlB}) })
	srv.cli(t, "entry", "delete", "-entryID", entryB)
	w.next(t, ctx, wlB+" removed", func(ids []string) bool { return slices.Equal(ids, []string{wlA}) })
	stopWatch()

	// Agent restart: it resumes its SVID (TPM key blob) from the data
	// directory instead of attesting again, and serves the same identities.
	a.restart(t)
	a.waitServing(t)
	if !strings.Contains(a.stderr.String(), "resumed saved agent SVID") {
		t.Errorf("the restarted agent did not resume from %s", a.dataDir)
	}
	client = newClient(t, ctx, a)
	fetchSVID(t, ctx, client, wlA)

	// Server restart: the workload keeps its SVID meanwhile, and the agent
	// reconnects by itself and follows entries made afterwards.
	srv.process.stop(t)
	if s, err := client.FetchX509SVID(ctx); err != nil || s.ID.String() != wlA {
		t.Fatalf("FetchX509SVID while the server is down: %v", err)
	}
	srv.restart(t)
	wlC := "spiffe://" + trustDomain + "/e2e/c"
	srv.cli(t, "entry", "create", "-spiffeID", wlC, "-parentID", id, "-selector", uid)
	svidC := fetchSVID(t, ctx, client, wlC)
	if _, _, err := x509svid.Verify(svidC.Certificates, bundle); err != nil {
		t.Fatalf("X509-SVID signed after the server restart does not verify against the first bundle: %v", err)
	}
	if out := srv.cli(t, "agent", "list"); strings.Count(out, "/ironroot/agent/tpm/") != 1 {
		t.Errorf("want exactly one agent after the restarts:\n%s", out)
	}
}

// noHeader calls FetchX509SVID without the workload.spiffe.io header.
func noHeader(t *testing.T, ctx context.Context, a *agent) {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+a.socketPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := workload.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("FetchX509SVID without the security header: %v, want InvalidArgument", err)
	}
}

// checkJWT fetches a JWT-SVID and validates it locally against the JWT
// bundles and through the agent, with the right and a wrong audience.
func checkJWT(t *testing.T, ctx context.Context, c *workloadapi.Client, want string) {
	t.Helper()
	const aud = "e2e-audience"
	svid, err := c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: aud})
	if err != nil {
		t.Fatalf("FetchJWTSVID: %v", err)
	}
	if svid.ID.String() != want {
		t.Fatalf("JWT-SVID for %s, want %s", svid.ID, want)
	}
	bundles, err := c.FetchJWTBundles(ctx)
	if err != nil {
		t.Fatalf("FetchJWTBundles: %v", err)
	}
	if _, err := jwtsvid.ParseAndValidate(svid.Marshal(), bundles, []string{aud}); err != nil {
		t.Errorf("ParseAndValidate with the right audience: %v", err)
	}
	if _, err := jwtsvid.ParseAndValidate(svid.Marshal(), bundles, []string{"someone-else"}); err == nil {
		t.Error("ParseAndValidate accepted a wrong audience")
	}
	if got, err := c.ValidateJWTSVID(ctx, svid.Marshal(), aud); err != nil || got.ID.String() != want {
		t.Errorf("ValidateJWTSVID with the right audience: %v", err)
	}
	if _, err := c.ValidateJWTSVID(ctx, svid.Marshal(), "someone-else"); status.Code(err) != codes.InvalidArgument {
		t.Errorf("ValidateJWTSVID with a wrong audience: %v, want InvalidArgument", err)
	}
}

func entryIDFrom(t *testing.T, out string) string {
	t.Helper()
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(line, "Entry ID         : "); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("no entry ID in:\n%s", out)
	return ""
}
