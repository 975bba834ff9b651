package e2e

import (
	"bytes"
	"context"
	"crypto/x509"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// x509Update is what a watching workload saw in one X509Context update.
type x509Update struct {
	svid *x509svid.SVID
	cas  []*x509.Certificate // the trust domain's X.509 authorities
}

// contextWatcher records every X509Context update and watch error.
type contextWatcher struct {
	td      spiffeid.TrustDomain
	updates chan x509Update
	errs    chan error
	nerrs   atomic.Int32
}

func (w *contextWatcher) OnX509ContextUpdate(c *workloadapi.X509Context) {
	u := x509Update{svid: c.DefaultSVID()}
	if b, err := c.Bundles.GetX509BundleForTrustDomain(w.td); err == nil {
		u.cas = b.X509Authorities()
	}
	w.updates <- u
}

func (w *contextWatcher) OnX509ContextWatchError(err error) {
	w.nerrs.Add(1)
	select {
	case w.errs <- err:
	default:
	}
}

// next returns the first update for which ok holds; a watch error before
// it (the stream broke and go-spiffe reconnected) fails the test.
func (w *contextWatcher) next(t *testing.T, ctx context.Context, what string, ok func(x509Update) bool) x509Update {
	t.Helper()
	for {
		select {
		case u := <-w.updates:
			if ok(u) {
				return u
			}
		case err := <-w.errs:
			t.Fatalf("waiting for %s: the watch stream failed: %v", what, err)
		case <-ctx.Done():
			t.Fatalf("waiting for %s: not within the test's time", what)
		}
	}
}

func containsCert(cs []*x509.Certificate, c *x509.Certificate) bool {
	for _, x := range cs {
		if x.Equal(c) {
			return true
		}
	}
	return false
}

// issuedBy reports whether the SVID's leaf was signed by ca.
func issuedBy(s *x509svid.SVID, ca *x509.Certificate) bool {
	leaf := s.Certificates[0]
	return bytes.Equal(leaf.AuthorityKeyId, ca.SubjectKeyId) && leaf.CheckSignatureFrom(ca) == nil
}

// TestRotationAndBan runs the server with short TTLs: a watching workload
// receives renewed SVIDs on its open stream, the CA rotation reaches it as a
// bundle update holding old and new CA (overlap) before SVIDs from the new
// CA arrive; then the agent is banned, its renewal is refused and the
// workload loses its SVIDs.
func TestRotationAndBan(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*readyTimeout)
	defer cancel()
	// CA: prepared at 1/2, active at 5/6 of 15 s; SVIDs renew at half of 4 s;
	// the agent re-attests at half of 8 s.
	srv := startServer(t, withServerKeys(`  ca_ttl = "15s"
  default_x509_svid_ttl = "4s"
  agent_ttl = "8s"`))
	bundlePath := srv.bundle(t)
	sw := e2e.suite.Start(t)
	id := agentID(t, readEKs(t, sw)[0])
	wl := "spiffe://" + trustDomain + "/e2e/rotating"
	srv.cli(t, "entry", "create", "-spiffeID", wl, "-parentID", id, "-selector", "unix:uid:"+strconv.Itoa(os.Getuid()))
	a := startAgent(t, srv, sw, bundlePath)
	a.waitServing(t)
	client := newClient(t, ctx, a)

	w := &contextWatcher{td: spiffeid.RequireTrustDomainFromString(trustDomain), updates: make(chan x509Update, 64), errs: make(chan error, 1)}
	watchCtx, stopWatch := context.WithCancel(ctx)
	watchDone := make(chan error, 1)
	go func() { watchDone <- client.WatchX509Context(watchCtx, w) }()
	t.Cleanup(func() { stopWatch(); <-watchDone })

	first := w.next(t, ctx, "the first SVID", func(u x509Update) bool { return u.svid != nil && u.svid.ID.String() == wl })
	// The CA that signed the first SVID is the one to rotate away from
	// (under load the first rotation may already be under way).
	var oldCA *x509.Certificate
	for _, c := range first.cas {
		if issuedBy(first.svid, c) {
			oldCA = c
		}
	}
	if oldCA == nil {
		t.Fatalf("the first SVID's issuer is not in the bundle it came with (%d CAs)", len(first.cas))
	}

	// SVID renewal on the same stream.
	w.next(t, ctx, "a renewed SVID", func(u x509Update) bool {
		return u.svid != nil && u.svid.Certificates[0].SerialNumber.Cmp(first.svid.Certificates[0].SerialNumber) != 0
	})
	// CA rotation: first the bundle gains the prepared CA (overlap), then
	// SVIDs come from it while the old CA is still in the bundle.
	overlap := w.next(t, ctx, "the next CA in the bundle", func(u x509Update) bool {
		for _, c := range u.cas {
			if !c.Equal(oldCA) {
				return true
			}
		}
		return false
	})
	if !containsCert(overlap.cas, oldCA) {
		t.Fatal("the bundle dropped the old CA when the new one was published")
	}
	rotated := overlap
	if overlap.svid == nil || issuedBy(overlap.svid, oldCA) {
		rotated = w.next(t, ctx, "an SVID from the new CA", func(u x509Update) bool {
			return u.svid != nil && !issuedBy(u.svid, oldCA)
		})
	}
	if !containsCert(rotated.cas, oldCA) {
		t.Error("SVIDs from the new CA arrived with a bundle that no longer holds the old CA (no overlap)")
	}
	if _, _, err := x509svid.Verify(rotated.svid.Certificates, x509BundleOf(w.td, rotated.cas)); err != nil {
		t.Fatalf("SVID from the new CA does not verify against the bundle it came with: %v", err)
	}
	if n := w.nerrs.Load(); n != 0 {
		t.Fatalf("the workload's stream broke %d times during rotation", n)
	}

	// Ban: the agent's next re-attestation is refused, it fails closed and
	// the workload's stream ends with PermissionDenied.
	srv.cli(t, "agent", "ban", "-spiffeID", id)
	select {
	case err := <-w.errs:
		if status.Code(err) != codes.PermissionDenied {
			t.Fatalf("after the ban the stream ended with %v, want PermissionDenied", err)
		}
	case <-ctx.Done():
		t.Fatal("the workload kept its SVIDs after the agent was banned")
	}
	if _, err := client.FetchX509SVID(ctx); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("FetchX509SVID after the ban: %v, want PermissionDenied", err)
	}
	waitFor(t, a.process, "the agent to log the refused re-attestation", func() bool {
		return strings.Contains(a.stderr.String(), "refused re-attestation")
	})
}

func x509BundleOf(td spiffeid.TrustDomain, cas []*x509.Certificate) *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(td, cas)
}
