package workloadapi_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	gsw "github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"

	"github.com/ironroot/ironroot/agent/workloadattestor/unix"
	"github.com/ironroot/ironroot/workloadapi"
)

// mySelector is the unix:uid selector of the test process, as the real
// attestor reports it.
func mySelector() string { return "unix:uid:" + strconv.Itoa(os.Geteuid()) }

type fixture struct {
	srv      *workloadapi.Server
	pki, fed *testPKI
	src      *testSource
	sock     string
	addr     string
	stop     func()
}

type fixtureOpts struct {
	entitled []string
	attestor workloadapi.Attestor
	opts     []workloadapi.Option
	svids    int
}

// newFixture starts a server with the real unix attestor on a socket in a
// temporary directory (in a subdirectory that Listen must create).
func newFixture(t testing.TB, fo fixtureOpts) *fixture {
	t.Helper()
	f := &fixture{pki: newPKI(t, "example.org"), fed: newPKI(t, "partner.test")}
	if fo.svids == 0 {
		fo.svids = 2
	}
	snap := &workloadapi.Snapshot{
		Bundle:           f.pki.bundle(),
		FederatedBundles: []*spiffebundle.Bundle{f.fed.bundle()},
	}
	for i := range fo.svids {
		snap.SVIDs = append(snap.SVIDs, f.pki.svid(t, fmt.Sprintf("/workload/%d", i), fmt.Sprintf("hint-%d", i)))
	}
	if fo.entitled == nil {
		fo.entitled = []string{mySelector()}
	}
	f.src = newTestSource(f.pki, snap, fo.entitled...)
	if fo.attestor == nil {
		fo.attestor = unix.New()
	}
	srv, err := workloadapi.New(fo.attestor, f.src, fo.opts...)
	if err != nil {
		t.Fatal(err)
	}
	f.srv = srv
	f.sock = filepath.Join(t.TempDir(), "run", "agent.sock")
	f.addr = workloadapi.SocketPathAddress(f.sock)
	lis, err := workloadapi.Listen(f.sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, lis) }()
	stopped := false
	f.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}
	t.Cleanup(f.stop)
	return f
}

func (f *fixture) client(t testing.TB) *gsw.Client {
	t.Helper()
	c, err := gsw.New(context.Background(), gsw.WithAddr(f.addr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// raw returns a plain gRPC client that adds no security header.
func (f *fixture) raw(t testing.TB) (workload.SpiffeWorkloadAPIClient, *grpc.ClientConn) {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+f.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return workload.NewSpiffeWorkloadAPIClient(conn), conn
}

func withHeader(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, workloadapi.SecurityHeader, "true")
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func wantCode(t *testing.T, err error, code codes.Code, msg string) {
	t.Helper()
	st, ok := status.FromError(err)
	if !ok || st.Code() != code {
		t.Fatalf("error %v, want code %v", err, code)
	}
	if msg != "" && st.Message() != msg {
		t.Fatalf("error message %q, want %q", st.Message(), msg)
	}
}

func TestFetchX509SVID(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	c := f.client(t)
	ctx := testCtx(t)

	svid, err := c.FetchX509SVID(ctx)
	if err != nil {
		t.Fatalf("FetchX509SVID: %v", err)
	}
	if want := f.src.snap.SVIDs[0].ID; svid.ID != want {
		t.Fatalf("default SVID %s, want the first, %s", svid.ID, want)
	}
	if svid.Hint != "hint-0" {
		t.Fatalf("hint %q, want hint-0", svid.Hint)
	}
	id, _, err := x509svid.Verify(svid.Certificates, x509bundle.FromX509Authorities(f.pki.td, []*x509.Certificate{f.pki.caCert}))
	if err != nil {
		t.Fatalf("x509svid.Verify: %v", err)
	}
	if id != svid.ID {
		t.Fatalf("verified ID %s, want %s", id, svid.ID)
	}
	pub, ok := svid.PrivateKey.Public().(*ecdsa.PublicKey)
	if !ok || !pub.Equal(svid.Certificates[0].PublicKey) {
		t.Fatal("private key does not match the leaf")
	}

	xc, err := c.FetchX509Context(ctx)
	if err != nil {
		t.Fatalf("FetchX509Context: %v", err)
	}
	if len(xc.SVIDs) != 2 || xc.SVIDs[1].Hint != "hint-1" {
		t.Fatalf("got %d SVIDs, want 2 with hints", len(xc.SVIDs))
	}
	for _, td := range []spiffeid.TrustDomain{f.pki.td, f.fed.td} {
		b, err := xc.Bundles.GetX509BundleForTrustDomain(td)
		if err != nil {
			t.Fatalf("bundle for %s: %v", td, err)
		}
		if len(b.X509Authorities()) != 1 {
			t.Fatalf("bundle for %s has %d authorities", td, len(b.X509Authorities()))
		}
	}
	for _, s := range xc.SVIDs {
		if _, _, err := x509svid.Verify(s.Certificates, xc.Bundles); err != nil {
			t.Fatalf("verifying %s against the fetched bundles: %v", s.ID, err)
		}
	}

	bundles, err := c.FetchX509Bundles(ctx)
	if err != nil {
		t.Fatalf("FetchX509Bundles: %v", err)
	}
	if bundles.Len() != 2 || !bundles.Has(f.pki.td) || !bundles.Has(f.fed.td) {
		t.Fatalf("FetchX509Bundles returned %d bundles", bundles.Len())
	}
}

func TestX509ResponseEncoding(t *testing.T) {
	f := newFixture(t, fixtureOpts{svids: 3})
	// A duplicate hint: the first SVID carrying it wins.
	snap := *f.src.snap
	snap.SVIDs = slices.Clone(snap.SVIDs)
	snap.SVIDs[2].Hint = "hint-0"
	f.src.set(&snap)

	cl, _ := f.raw(t)
	stream, err := cl.FetchX509SVID(withHeader(testCtx(t)), &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatalf("Recv: %v", err)
	}
	if len(resp.Svids) != 2 {
		t.Fatalf("%d SVIDs, want 2 (duplicate hint dropped)", len(resp.Svids))
	}
	for i, s := range resp.Svids {
		if s.SpiffeId != snap.SVIDs[i].ID.String() {
			t.Errorf("svid %d is %s, want %s", i, s.SpiffeId, snap.SVIDs[i].ID)
		}
		// DER, not PEM.
		if _, err := x509.ParseCertificates(s.X509Svid); err != nil {
			t.Errorf("svid %d certificates are not DER: %v", i, err)
		}
		if _, err := x509.ParsePKCS8PrivateKey(s.X509SvidKey); err != nil {
			t.Errorf("svid %d key is not PKCS#8 DER: %v", i, err)
		}
		if certs, err := x509.ParseCertificates(s.Bundle); err != nil || len(certs) != 1 || !certs[0].Equal(f.pki.caCert) {
			t.Errorf("svid %d bundle is not the CA in DER (%v)", i, err)
		}
	}
	if fb, ok := resp.FederatedBundles["spiffe://partner.test"]; !ok {
		t.Errorf("federated bundles %v lack spiffe://partner.test", resp.FederatedBundles)
	} else if certs, err := x509.ParseCertificates(fb); err != nil || !certs[0].Equal(f.fed.caCert) {
		t.Errorf("federated bundle is not the partner CA (%v)", err)
	}
	if _, ok := resp.FederatedBundles["spiffe://example.org"]; ok {
		t.Error("own trust domain listed as federated")
	}
}

type watcher struct {
	updates chan *gsw.X509Context
	errs    chan error
}

func (w *watcher) OnX509ContextUpdate(c *gsw.X509Context) { w.updates <- c }
func (w *watcher) OnX509ContextWatchError(err error) {
	select {
	case w.errs <- err:
	default:
	}
}

func TestWatchX509ContextGetsUpdatesOnOneStream(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	c := f.client(t)
	ctx, cancel := context.WithCancel(testCtx(t))
	w := &watcher{updates: make(chan *gsw.X509Context, 10), errs: make(chan error, 1)}
	done := make(chan error, 1)
	go func() { done <- c.WatchX509Context(ctx, w) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})

	next := func() *gsw.X509Context {
		t.Helper()
		select {
		case u := <-w.updates:
			return u
		case err := <-w.errs:
			t.Fatalf("watch error: %v", err)
		case <-ctx.Done():
			t.Fatal("no update")
		}
		return nil
	}
	first := next()
	if first.DefaultSVID().ID != f.src.snap.SVIDs[0].ID {
		t.Fatalf("first update default %s", first.DefaultSVID().ID)
	}
	oldSerial := first.DefaultSVID().Certificates[0].SerialNumber

	// Rotate the default SVID and add a CA to the bundle.
	snap := *f.src.snap
	snap.SVIDs = slices.Clone(snap.SVIDs)
	snap.SVIDs[0] = f.pki.svid(t, "/workload/0", "hint-0")
	newCA := newPKI(t, "example.org")
	b := f.pki.bundle()
	b.AddX509Authority(newCA.caCert)
	snap.Bundle = b
	f.src.set(&snap)

	second := next()
	if second.DefaultSVID().Certificates[0].SerialNumber.Cmp(oldSerial) == 0 {
		t.Fatal("second update carries the old SVID")
	}
	got, err := second.Bundles.GetX509BundleForTrustDomain(f.pki.td)
	if err != nil || len(got.X509Authorities()) != 2 {
		t.Fatalf("second update bundle has %v authorities (%v), want 2", got, err)
	}
	if n := f.src.subscribes.Load(); n != 1 {
		t.Fatalf("%d subscriptions, want 1: updates must arrive without reconnecting", n)
	}
}

func TestJWT(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	c := f.client(t)
	ctx := testCtx(t)

	bundles, err := c.FetchJWTBundles(ctx)
	if err != nil {
		t.Fatalf("FetchJWTBundles: %v", err)
	}
	for _, p := range []*testPKI{f.pki, f.fed} {
		b, err := bundles.GetJWTBundleForTrustDomain(p.td)
		if err != nil {
			t.Fatalf("JWT bundle for %s: %v", p.td, err)
		}
		if _, ok := b.FindJWTAuthority(p.kid); !ok {
			t.Fatalf("JWT bundle for %s lacks kid %s", p.td, p.kid)
		}
	}

	svid, err := c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "spiffe://example.org/db"})
	if err != nil {
		t.Fatalf("FetchJWTSVID: %v", err)
	}
	if svid.ID != f.src.snap.SVIDs[0].ID {
		t.Fatalf("JWT-SVID for %s, want the default %s", svid.ID, f.src.snap.SVIDs[0].ID)
	}
	parsed, err := jwtsvid.ParseAndValidate(svid.Marshal(), bundles, []string{"spiffe://example.org/db"})
	if err != nil {
		t.Fatalf("jwtsvid.ParseAndValidate: %v", err)
	}
	if parsed.ID != svid.ID {
		t.Fatalf("validated ID %s, want %s", parsed.ID, svid.ID)
	}

	all, err := c.FetchJWTSVIDs(ctx, jwtsvid.Params{Audience: "a"})
	if err != nil || len(all) != 2 {
		t.Fatalf("FetchJWTSVIDs: %d SVIDs, %v; want 2", len(all), err)
	}
	one, err := c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "a", Subject: f.src.snap.SVIDs[1].ID})
	if err != nil || one.ID != f.src.snap.SVIDs[1].ID {
		t.Fatalf("FetchJWTSVID for the second identity: %v, %v", one, err)
	}
	_, err = c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "a", Subject: spiffeid.RequireFromString("spiffe://example.org/not-mine")})
	wantCode(t, err, codes.PermissionDenied, "no identity issued")

	// ValidateJWTSVID, right and wrong audience, and junk.
	v, err := c.ValidateJWTSVID(ctx, svid.Marshal(), "spiffe://example.org/db")
	if err != nil {
		t.Fatalf("ValidateJWTSVID: %v", err)
	}
	if v.ID != svid.ID {
		t.Fatalf("ValidateJWTSVID ID %s, want %s", v.ID, svid.ID)
	}
	cl, _ := f.raw(t)
	resp, err := cl.ValidateJWTSVID(withHeader(ctx), &workload.ValidateJWTSVIDRequest{Audience: "spiffe://example.org/db", Svid: svid.Marshal()})
	if err != nil {
		t.Fatal(err)
	}
	if resp.SpiffeId != svid.ID.String() || resp.Claims.Fields["sub"].GetStringValue() != svid.ID.String() {
		t.Fatalf("ValidateJWTSVID response %v", resp)
	}
	if aud := resp.Claims.Fields["aud"]; aud == nil {
		t.Fatal("claims lack aud")
	}
	if exp := resp.Claims.Fields["exp"].GetNumberValue(); exp < float64(time.Now().Unix()) {
		t.Fatalf("claims exp %v", exp)
	}

	foreign := newPKI(t, "example.org") // same trust domain, unknown key
	forged, _, err := foreign.jwt(svid.ID, []string{"spiffe://example.org/db"}, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	expired, _, err := f.pki.jwt(svid.ID, []string{"spiffe://example.org/db"}, -time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		token    string
		audience string
	}{
		{"wrong audience", svid.Marshal(), "spiffe://example.org/other"},
		{"not a JWT", "junk", "spiffe://example.org/db"},
		{"unknown signing key", forged, "spiffe://example.org/db"},
		{"expired", expired, "spiffe://example.org/db"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := c.ValidateJWTSVID(ctx, tt.token, tt.audience)
			wantCode(t, err, codes.InvalidArgument, "")
		})
	}
}

func TestBadRequests(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	cl, _ := f.raw(t)
	ctx := withHeader(testCtx(t))
	tests := []struct {
		name string
		call func() error
		code codes.Code
	}{
		{"FetchJWTSVID without audience", func() error {
			_, err := cl.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{})
			return err
		}, codes.InvalidArgument},
		{"FetchJWTSVID with an empty audience", func() error {
			_, err := cl.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{""}})
			return err
		}, codes.InvalidArgument},
		{"FetchJWTSVID with a malformed SPIFFE ID", func() error {
			_, err := cl.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"a"}, SpiffeId: "http://x"})
			return err
		}, codes.InvalidArgument},
		{"ValidateJWTSVID without audience", func() error {
			_, err := cl.ValidateJWTSVID(ctx, &workload.ValidateJWTSVIDRequest{Svid: "x"})
			return err
		}, codes.InvalidArgument},
		{"ValidateJWTSVID without svid", func() error {
			_, err := cl.ValidateJWTSVID(ctx, &workload.ValidateJWTSVIDRequest{Audience: "a"})
			return err
		}, codes.InvalidArgument},
		{"FetchWITSVID is not implemented", func() error {
			s, err := cl.FetchWITSVID(ctx, &workload.WITSVIDRequest{})
			if err != nil {
				return err
			}
			_, err = s.Recv()
			return err
		}, codes.Unimplemented},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { wantCode(t, tt.call(), tt.code, "") })
	}
}

func TestSecurityHeader(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	cl, _ := f.raw(t)
	base := testCtx(t)
	headers := []struct {
		name string
		ctx  context.Context
	}{
		{"missing", base},
		{"wrong case value", metadata.AppendToOutgoingContext(base, workloadapi.SecurityHeader, "True")},
		{"false", metadata.AppendToOutgoingContext(base, workloadapi.SecurityHeader, "false")},
		{"two values", metadata.AppendToOutgoingContext(base, workloadapi.SecurityHeader, "true", workloadapi.SecurityHeader, "true")},
	}
	for _, h := range headers {
		calls := map[string]func(ctx context.Context) error{
			"FetchX509SVID": func(ctx context.Context) error {
				s, err := cl.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
				if err != nil {
					return err
				}
				_, err = s.Recv()
				return err
			},
			"FetchX509Bundles": func(ctx context.Context) error {
				s, err := cl.FetchX509Bundles(ctx, &workload.X509BundlesRequest{})
				if err != nil {
					return err
				}
				_, err = s.Recv()
				return err
			},
			"FetchJWTBundles": func(ctx context.Context) error {
				s, err := cl.FetchJWTBundles(ctx, &workload.JWTBundlesRequest{})
				if err != nil {
					return err
				}
				_, err = s.Recv()
				return err
			},
			"FetchJWTSVID": func(ctx context.Context) error {
				_, err := cl.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"a"}})
				return err
			},
			"ValidateJWTSVID": func(ctx context.Context) error {
				_, err := cl.ValidateJWTSVID(ctx, &workload.ValidateJWTSVIDRequest{Audience: "a", Svid: "b"})
				return err
			},
		}
		for name, call := range calls {
			t.Run(h.name+"/"+name, func(t *testing.T) {
				wantCode(t, call(h.ctx), codes.InvalidArgument, "security header missing from request")
			})
		}
	}
}

func TestUnregisteredCaller(t *testing.T) {
	other := "unix:uid:" + strconv.Itoa(os.Geteuid()+4242)
	t.Run("no identity", func(t *testing.T) {
		f := newFixture(t, fixtureOpts{entitled: []string{other}})
		c := f.client(t)
		ctx := testCtx(t)
		_, err := c.FetchX509SVID(ctx)
		wantCode(t, err, codes.PermissionDenied, "no identity issued")
		_, err = c.FetchX509Bundles(ctx)
		wantCode(t, err, codes.PermissionDenied, "no identity issued")
		_, err = c.FetchJWTBundles(ctx)
		wantCode(t, err, codes.PermissionDenied, "no identity issued")
		_, err = c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "a"})
		wantCode(t, err, codes.PermissionDenied, "no identity issued")
		// Validation needs no identity of one's own.
		tok, _, err := f.pki.jwt(spiffeid.RequireFromString("spiffe://example.org/x"), []string{"a"}, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.ValidateJWTSVID(ctx, tok, "a"); err != nil {
			t.Fatalf("ValidateJWTSVID without an identity: %v", err)
		}
	})
	t.Run("unauthenticated verifiers allowed", func(t *testing.T) {
		f := newFixture(t, fixtureOpts{entitled: []string{other}, opts: []workloadapi.Option{workloadapi.WithAllowUnauthenticatedVerifiers(true)}})
		c := f.client(t)
		ctx := testCtx(t)
		if b, err := c.FetchX509Bundles(ctx); err != nil || b.Len() != 2 {
			t.Fatalf("FetchX509Bundles: %v", err)
		}
		if b, err := c.FetchJWTBundles(ctx); err != nil || b.Len() != 2 {
			t.Fatalf("FetchJWTBundles: %v", err)
		}
		_, err := c.FetchX509SVID(ctx)
		wantCode(t, err, codes.PermissionDenied, "no identity issued")
	})
}

func TestIdentityRemovedEndsStream(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	cl, _ := f.raw(t)
	stream, err := cl.FetchX509SVID(withHeader(testCtx(t)), &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	f.src.set(&workloadapi.Snapshot{Bundle: f.pki.bundle()})
	_, err = stream.Recv()
	wantCode(t, err, codes.PermissionDenied, "no identity issued")
}

type failingAttestor struct{}

func (failingAttestor) Attest(context.Context, int32) ([]workloadapi.Selector, error) {
	return nil, errors.New("no /proc for you")
}

func TestAttestationFailure(t *testing.T) {
	f := newFixture(t, fixtureOpts{attestor: failingAttestor{}})
	c := f.client(t)
	ctx := testCtx(t)
	_, err := c.FetchX509SVID(ctx)
	wantCode(t, err, codes.Unavailable, "workload attestation failed")
	_, err = c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "a"})
	wantCode(t, err, codes.Unavailable, "workload attestation failed")
}

func TestHealthAndReflection(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	_, conn := f.raw(t)
	ctx := testCtx(t)
	for _, svc := range []string{"", "SpiffeWorkloadAPI"} {
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("health of %q: %v %v", svc, resp, err)
		}
	}
	check := func(want healthpb.HealthCheckResponse_ServingStatus) {
		t.Helper()
		for _, svc := range []string{"", "SpiffeWorkloadAPI"} {
			resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
			if err != nil || resp.Status != want {
				t.Fatalf("health of %q: %v %v, want %v", svc, resp, err, want)
			}
		}
	}
	f.srv.SetServing(false)
	check(healthpb.HealthCheckResponse_NOT_SERVING)
	f.srv.SetServing(true)
	check(healthpb.HealthCheckResponse_SERVING)

	rs, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := rs.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := rs.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.Name)
	}
	if !slices.Contains(names, "SpiffeWorkloadAPI") {
		t.Fatalf("reflection lists %v, want SpiffeWorkloadAPI", names)
	}
	_ = rs.CloseSend()
}

func TestStopEndsStreams(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	cl, _ := f.raw(t)
	stream, err := cl.FetchX509SVID(withHeader(testCtx(t)), &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	f.stop()
	_, err = stream.Recv()
	if err == nil || errors.Is(err, io.EOF) {
		t.Fatalf("stream after stop: %v, want an error", err)
	}
	wantCode(t, err, codes.Unavailable, "")
	if _, err := os.Stat(f.sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket still there after stop: %v", err)
	}
}

func TestMessageSizeLimits(t *testing.T) {
	t.Run("request too large", func(t *testing.T) {
		f := newFixture(t, fixtureOpts{opts: []workloadapi.Option{workloadapi.WithMaxMessageSize(512, 0)}})
		cl, _ := f.raw(t)
		_, err := cl.ValidateJWTSVID(withHeader(testCtx(t)), &workload.ValidateJWTSVIDRequest{Audience: "a", Svid: strings.Repeat("x", 1024)})
		wantCode(t, err, codes.ResourceExhausted, "")
	})
	t.Run("response too large", func(t *testing.T) {
		f := newFixture(t, fixtureOpts{opts: []workloadapi.Option{workloadapi.WithMaxMessageSize(0, 1024)}})
		_, err := f.client(t).FetchX509SVID(testCtx(t))
		wantCode(t, err, codes.ResourceExhausted, "")
	})
}
