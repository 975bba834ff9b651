package agentapi_test

import (
	"context"
	"crypto/x509"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/ironroot/ironroot/hsm"
	"github.com/ironroot/ironroot/server/agentapi"
	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/server/ca"
	"github.com/ironroot/ironroot/server/entrycache"
	"github.com/ironroot/ironroot/server/store"
	"github.com/ironroot/ironroot/simulator/simtest"
	"github.com/ironroot/ironroot/tpm/verifier"
)

// serveService runs the agent API alone, built from the same real parts
// as server.New (SQLite, the CA on a SoftHSM token, the verifier), with a
// step timeout the server's configuration does not expose. It serves
// without TLS: only Attest is called, which needs no client certificate.
func serveService(t *testing.T, stepTimeout time.Duration) (agentv1.AgentClient, store.Store) {
	t.Helper()
	ctx := context.Background()
	st, err := store.OpenSQLite(ctx, filepath.Join(t.TempDir(), "datastore.sqlite3"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	tok := simtest.SoftHSMToken(t, softHSM)
	h, err := hsm.Open(ctx, tok.URI)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	uri, err := hsm.ParseURI(tok.URI)
	if err != nil {
		t.Fatal(err)
	}
	m, err := ca.NewManager(ctx, ca.Config{TrustDomain: td, Store: st, Keys: ca.HSMKeyStore(h, uri.Token)})
	if err != nil {
		t.Fatal(err)
	}
	entries, err := entrycache.New(ctx, st, spiffeid.RequireFromPath(td, agentapi.ServerPath))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { entries.Close() })
	v, err := verifier.New(verifier.Config{EKRoots: []*x509.Certificate{suite.CA.Root()}, EKIntermediates: []*x509.Certificate{suite.CA.Intermediate()}})
	if err != nil {
		t.Fatal(err)
	}
	svc, err := agentapi.New(agentapi.Config{TrustDomain: td, Store: st, Entries: entries, CA: m, Verifier: v,
		StepTimeout: stepTimeout, AttestRatePerIP: 1e6})
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	agentv1.RegisterAgentServer(gs, svc)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return agentv1.NewAgentClient(conn), st
}

// TestAttestStepTimeout checks that an agent that stalls mid-protocol
// loses its session: the server ends the stream with DeadlineExceeded
// instead of waiting. Nothing is asserted about how long it took.
func TestAttestStepTimeout(t *testing.T) {
	// Long enough for the server's own work on a loaded machine (the step
	// deadline covers it too), short enough for a quick test.
	client, st := serveService(t, time.Second)
	n := startNode(t, suite)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	t.Run("no identity", func(t *testing.T) {
		stream, err := client.Attest(ctx)
		if err != nil {
			t.Fatal(err)
		}
		_, err = stream.Recv()
		wantCode(t, err, codes.DeadlineExceeded, "no identity within the step timeout")
	})
	t.Run("no proof", func(t *testing.T) {
		ak, err := n.tpm.NewAK(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer ak.Close()
		eks, err := n.tpm.EndorsementKeys(ctx)
		if err != nil {
			t.Fatal(err)
		}
		stream, err := client.Attest(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := stream.Send(identityMsg(ak.Identity(eks[0]))); err != nil {
			t.Fatal(err)
		}
		if r, err := stream.Recv(); err != nil || r.GetChallenge() == nil {
			t.Fatalf("want a challenge, got %v, %v", r, err)
		}
		// The agent never answers the challenge.
		_, err = stream.Recv()
		wantCode(t, err, codes.DeadlineExceeded, "no proof within the step timeout")
	})
	ns, _, err := st.ListNodes(ctx, store.ListNodesRequest{})
	if err != nil || len(ns) != 0 {
		t.Fatalf("nodes after stalled attestations: %d, %v", len(ns), err)
	}
}
