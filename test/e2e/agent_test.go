package e2e

import (
	"context"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/ironroot/ironroot/simulator/simtest"
)

// An agent on a software TPM from the trusted manufacturer attests, and a
// workload (this test process) fetches an X509-SVID for its uid through the
// go-spiffe Workload API client; the SVID verifies against the server's
// bundle.
func TestAgentIssuesX509SVID(t *testing.T) {
	t.Parallel()
	srv := startServer(t)
	bundlePath := srv.bundle(t)
	sw := e2e.suite.Start(t)
	id := agentID(t, readEKs(t, sw)[0])

	workloadID := "spiffe://" + trustDomain + "/e2e/workload"
	uid := strconv.Itoa(os.Getuid())
	srv.cli(t, "entry", "create", "-spiffeID", workloadID, "-parentID", id, "-selector", "unix:uid:"+uid)

	a := startAgent(t, srv, sw, bundlePath)
	a.waitServing(t)

	// The server lists the attested agent under its EK-derived ID.
	if out := srv.cli(t, "agent", "list"); !strings.Contains(out, id) {
		t.Errorf("agent list lacks %s:\n%s", id, out)
	}

	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+a.socketPath))
	if err != nil {
		t.Fatalf("connecting to the Workload API: %v", err)
	}
	defer client.Close()
	svid := fetchSVID(t, ctx, client, workloadID)
	if svid.ID.String() != workloadID {
		t.Fatalf("X509-SVID is for %s, want %s", svid.ID, workloadID)
	}

	bundle, err := x509bundle.Load(spiffeid.RequireTrustDomainFromString(trustDomain), bundlePath)
	if err != nil {
		t.Fatalf("loading the bundle from bundle show: %v", err)
	}
	gotID, chains, err := x509svid.Verify(svid.Certificates, bundle)
	if err != nil {
		t.Fatalf("x509svid.Verify against the server's bundle: %v", err)
	}
	if gotID.String() != workloadID || len(chains) == 0 {
		t.Fatalf("verified %s with %d chains", gotID, len(chains))
	}
	// The bundle the agent serves is the server's.
	wlBundles, err := client.FetchX509Bundles(ctx)
	if err != nil {
		t.Fatalf("FetchX509Bundles: %v", err)
	}
	served, err := wlBundles.GetX509BundleForTrustDomain(bundle.TrustDomain())
	if err != nil || !served.Equal(bundle) {
		t.Errorf("the Workload API bundle differs from bundle show (%v)", err)
	}
}

// fetchSVID fetches X509-SVIDs until one for want arrives: the agent signs
// the workload's SVID just after it starts serving.
func fetchSVID(t *testing.T, ctx context.Context, c *workloadapi.Client, want string) *x509svid.SVID {
	t.Helper()
	var last error
	for ctx.Err() == nil {
		svids, err := c.FetchX509SVIDs(ctx)
		if err == nil {
			for _, s := range svids {
				if s.ID.String() == want {
					return s
				}
			}
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("no X509-SVID for %s: %v", want, last)
	return nil
}

// An agent whose TPM was manufactured by another CA is refused: it never
// serves the Workload API and logs the server's PermissionDenied.
func TestAgentForeignTPMRefused(t *testing.T) {
	t.Parallel()
	srv := startServer(t)
	bundlePath := srv.bundle(t)
	foreign := simtest.StartTPM(t, simtest.Manufacture(t, simtest.NewCA(t)))

	a := startAgent(t, srv, foreign, bundlePath)
	waitFor(t, a.process, "the agent to report the refusal", func() bool {
		return strings.Contains(a.stderr.String(), "PermissionDenied")
	})
	for _, want := range []string{"the server refused attestation", "EK certificate not trusted"} {
		if !strings.Contains(a.stderr.String(), want) {
			t.Errorf("agent log lacks %q:\n%s", want, a.stderr.String())
		}
	}
	if code, _, _ := run(t, agentBin, []string{"healthcheck", "-socketPath", a.socketPath}); code == 0 {
		t.Error("a refused agent serves the Workload API")
	}
	if out := srv.cli(t, "agent", "list"); strings.Contains(out, "/ironroot/agent/tpm/") {
		t.Errorf("the refused agent was stored:\n%s", out)
	}
}
