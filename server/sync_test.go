package server_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/server/config"
	"github.com/ironroot/ironroot/server/store"
)

const manufacturer = "manufacturer:id:53574D20"

// authorizedSet creates, through the CLI, entries the agent is authorized
// for (directly, through a matching node alias, and a child of that alias)
// and entries it is not (another agent's, a non-matching alias and its
// child). It returns the IDs of both sets.
func authorizedSet(t *testing.T, e *env, a, other *agent) (allowed, denied map[string]bool) {
	t.Helper()
	allowed, denied = map[string]bool{}, map[string]bool{}
	allowed[e.createEntry("-spiffeID", "spiffe://example.org/web", "-parentID", a.id.String(), "-selector", "unix:uid:1000", "-dns", "web.example.org").Id] = true
	allowed[e.createEntry("-node", "-spiffeID", "spiffe://example.org/fleet/swtpm", "-selector", "tpm:"+manufacturer).Id] = true
	allowed[e.createEntry("-spiffeID", "spiffe://example.org/fleet/db", "-parentID", "spiffe://example.org/fleet/swtpm", "-selector", "unix:uid:999").Id] = true
	denied[e.createEntry("-spiffeID", "spiffe://example.org/other", "-parentID", other.id.String(), "-selector", "unix:uid:1000").Id] = true
	denied[e.createEntry("-node", "-spiffeID", "spiffe://example.org/fleet/other", "-selector", "tpm:manufacturer:id:00000000").Id] = true
	denied[e.createEntry("-spiffeID", "spiffe://example.org/fleet/secret", "-parentID", "spiffe://example.org/fleet/other", "-selector", "unix:uid:0").Id] = true
	return allowed, denied
}

func TestSyncStream(t *testing.T) {
	e := newEnv(t)
	a := e.newAgent(store.Selector{Type: "tpm", Value: manufacturer})
	other := e.newAgent()
	allowed, denied := authorizedSet(t, e, a, other)

	st := e.openSync(e.dial(a.svid))
	seen := map[string]bool{}
	record := func(m *agentv1.SyncResponse) {
		for _, en := range m.Upserted {
			seen[en.Id] = true
		}
	}

	first := st.next(t)
	record(first)
	if !first.Full {
		t.Fatal("first Sync message is not the full set")
	}
	got := entryIDs(first.Upserted)
	if len(got) != len(allowed) {
		t.Errorf("full set has %d entries, want %d", len(got), len(allowed))
	}
	for id := range allowed {
		if got[id] == nil {
			t.Errorf("authorized entry %s missing from the full set", id)
		}
	}
	if first.Bundle == nil || first.Bundle.TrustDomain != td.String() || len(first.Bundle.X509Authorities) == 0 || len(first.Bundle.JwtAuthorities) == 0 {
		t.Fatalf("first message bundle = %v, want the trust domain's X.509 and JWT authorities", first.Bundle)
	}
	if ca, err := x509.ParseCertificate(first.Bundle.X509Authorities[0]); err != nil || !ca.Equal(e.srv.CA().ActiveCA()) {
		t.Errorf("bundle CA is not the active CA (%v)", err)
	}

	// An entry outside the agent's authorization, then one inside: the
	// stream carries changes in commit order, so once the second arrived the
	// first would have been sent before it.
	denied[e.createEntry("-spiffeID", "spiffe://example.org/not-mine", "-parentID", other.id.String(), "-selector", "unix:uid:5").Id] = true
	created := e.createEntry("-spiffeID", "spiffe://example.org/new", "-parentID", a.id.String(), "-selector", "unix:uid:2000")
	var arrived *agentv1.Entry
	for arrived == nil {
		m := st.next(t)
		record(m)
		if m.Full {
			t.Fatal("a later message claims to be the full set")
		}
		arrived = entryIDs(m.Upserted)[created.Id]
	}
	if arrived.SpiffeId != "spiffe://example.org/new" || arrived.ParentId != a.id.String() {
		t.Errorf("pushed entry = %v", arrived)
	}

	// Update: the new revision is pushed.
	e.mustCLI("entry", "update", "-entryID", created.Id, "-spiffeID", "spiffe://example.org/new", "-parentID", a.id.String(), "-selector", "unix:uid:2001")
	for {
		m := st.next(t)
		record(m)
		if up := entryIDs(m.Upserted)[created.Id]; up != nil {
			if up.RevisionNumber != 1 || len(up.Selectors) != 1 || up.Selectors[0].Value != "uid:2001" {
				t.Errorf("updated entry = %v, want revision 1 with unix:uid:2001", up)
			}
			break
		}
	}

	// Delete: the ID is pushed in deleted_ids.
	e.mustCLI("entry", "delete", "-entryID", created.Id)
	for {
		m := st.next(t)
		record(m)
		if slices.Contains(m.DeletedIds, created.Id) {
			break
		}
	}

	// Re-parenting an entry away from the agent removes it.
	var web string
	for id := range allowed {
		if got[id].SpiffeId == "spiffe://example.org/web" {
			web = id
		}
	}
	e.mustCLI("entry", "update", "-entryID", web, "-spiffeID", "spiffe://example.org/web", "-parentID", other.id.String(), "-selector", "unix:uid:1000")
	for {
		m := st.next(t)
		record(m)
		if slices.Contains(m.DeletedIds, web) {
			break
		}
	}

	for id := range denied {
		if seen[id] {
			t.Errorf("entry %s outside the agent's authorization was sent", id)
		}
	}
}

func TestSyncRefusesWithoutClientCertificate(t *testing.T) {
	e := newEnv(t)
	client := e.dial(nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := client.Sync(ctx, &agentv1.SyncRequest{})
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.Unauthenticated {
		t.Errorf("Sync without a client certificate: %v, want Unauthenticated", err)
	}
	_, err = client.BatchNewX509SVID(ctx, &agentv1.BatchNewX509SVIDRequest{Params: []*agentv1.X509SVIDParams{{EntryId: "x", Csr: []byte{1}}}})
	if status.Code(err) != codes.Unauthenticated {
		t.Errorf("BatchNewX509SVID without a client certificate: %v, want Unauthenticated", err)
	}
}

func newCSR(t testing.TB) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	return csr
}

func TestSigningAuthorization(t *testing.T) {
	e := newEnv(t)
	a := e.newAgent(store.Selector{Type: "tpm", Value: manufacturer})
	other := e.newAgent()
	allowed, denied := authorizedSet(t, e, a, other)
	client := e.dial(a.svid)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	var params []*agentv1.X509SVIDParams
	for id := range allowed {
		params = append(params, &agentv1.X509SVIDParams{EntryId: id, Csr: newCSR(t)})
	}
	for id := range denied {
		params = append(params, &agentv1.X509SVIDParams{EntryId: id, Csr: newCSR(t)})
	}
	params = append(params,
		&agentv1.X509SVIDParams{EntryId: "no-such-entry", Csr: newCSR(t)},
		&agentv1.X509SVIDParams{EntryId: firstKey(allowed), Csr: []byte("garbage")},
		&agentv1.X509SVIDParams{EntryId: "", Csr: newCSR(t)},
	)
	resp, err := client.BatchNewX509SVID(ctx, &agentv1.BatchNewX509SVIDRequest{Params: params})
	if err != nil {
		t.Fatalf("BatchNewX509SVID: %v", err)
	}
	if len(resp.Results) != len(params) {
		t.Fatalf("%d results for %d CSRs", len(resp.Results), len(params))
	}
	caCert := e.srv.CA().ActiveCA()
	for i, p := range params {
		r := resp.Results[i]
		code := codes.Code(r.GetStatus().GetCode())
		switch {
		case i >= len(allowed)+len(denied):
			want := codes.PermissionDenied
			if p.EntryId == "" || string(p.Csr) == "garbage" {
				want = codes.InvalidArgument
			}
			if code != want || r.Svid != nil || r.Status.Message == "" {
				t.Errorf("CSR %d (%q): %v %q, want %v with a message and no SVID", i, p.EntryId, code, r.Status.GetMessage(), want)
			}
		case denied[p.EntryId]:
			if code != codes.PermissionDenied || r.Svid != nil {
				t.Errorf("unauthorized entry %s: %v, want PermissionDenied", p.EntryId, code)
			}
		default:
			if code != codes.OK {
				t.Fatalf("authorized entry %s: %v %s", p.EntryId, code, r.Status.Message)
			}
			checkX509SVID(t, e, r.Svid, caCert)
		}
	}

	// Request-level refusals.
	refusals := []struct {
		name string
		call func() error
		want codes.Code
	}{
		{"empty batch", func() error {
			_, err := client.BatchNewX509SVID(ctx, &agentv1.BatchNewX509SVIDRequest{})
			return err
		}, codes.InvalidArgument},
		{"oversize batch", func() error {
			big := make([]*agentv1.X509SVIDParams, 1001)
			for i := range big {
				big[i] = &agentv1.X509SVIDParams{EntryId: "x", Csr: []byte{0x30}}
			}
			_, err := client.BatchNewX509SVID(ctx, &agentv1.BatchNewX509SVIDRequest{Params: big})
			return err
		}, codes.InvalidArgument},
		{"JWT for an unauthorized entry", func() error {
			_, err := client.NewJWTSVID(ctx, &agentv1.NewJWTSVIDRequest{EntryId: firstKey(denied), Audience: []string{"db"}})
			return err
		}, codes.PermissionDenied},
		{"JWT without audience", func() error {
			_, err := client.NewJWTSVID(ctx, &agentv1.NewJWTSVIDRequest{EntryId: firstKey(allowed)})
			return err
		}, codes.InvalidArgument},
		{"JWT with an empty audience", func() error {
			_, err := client.NewJWTSVID(ctx, &agentv1.NewJWTSVIDRequest{EntryId: firstKey(allowed), Audience: []string{""}})
			return err
		}, codes.InvalidArgument},
		{"JWT with too many audiences", func() error {
			_, err := client.NewJWTSVID(ctx, &agentv1.NewJWTSVIDRequest{EntryId: firstKey(allowed), Audience: make([]string, 33)})
			return err
		}, codes.InvalidArgument},
		{"JWT without entry", func() error {
			_, err := client.NewJWTSVID(ctx, &agentv1.NewJWTSVIDRequest{Audience: []string{"db"}})
			return err
		}, codes.InvalidArgument},
	}
	for _, r := range refusals {
		err := r.call()
		if status.Code(err) != r.want || status.Convert(err).Message() == "" {
			t.Errorf("%s: %v, want %v with a message", r.name, err, r.want)
		}
	}

	// An authorized JWT-SVID validates against the JWT bundle.
	jwtBundle := jwtbundle.New(td)
	for _, k := range e.srv.CA().Bundle().JWTAuthorities {
		if err := jwtBundle.AddJWTAuthority(k.KeyID, k.PublicKey); err != nil {
			t.Fatal(err)
		}
	}
	for id := range allowed {
		jr, err := client.NewJWTSVID(ctx, &agentv1.NewJWTSVIDRequest{EntryId: id, Audience: []string{"db", "cache"}})
		if err != nil {
			t.Fatalf("NewJWTSVID %s: %v", id, err)
		}
		svid, err := jwtsvid.ParseAndValidate(jr.Svid.Token, jwtBundle, []string{"db"})
		if err != nil {
			t.Fatalf("JWT-SVID does not validate: %v", err)
		}
		if svid.ID.String() != jr.Svid.SpiffeId || !slices.Equal(svid.Audience, []string{"db", "cache"}) || svid.Expiry.Unix() != jr.Svid.ExpiresAt {
			t.Errorf("JWT-SVID claims: id %s aud %v exp %v; response %v", svid.ID, svid.Audience, svid.Expiry, jr.Svid)
		}
	}
}

func firstKey(m map[string]bool) string {
	for k := range m {
		return k
	}
	return ""
}

// checkX509SVID verifies the SVID against the bundle and the SPIFFE
// X509-SVID standard's properties.
func checkX509SVID(t *testing.T, e *env, svid *agentv1.X509SVID, caCert *x509.Certificate) {
	t.Helper()
	var chain []*x509.Certificate
	for _, der := range svid.CertChain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatalf("parsing SVID chain: %v", err)
		}
		chain = append(chain, c)
	}
	id, _, err := x509svid.Verify(chain, e.bundle())
	if err != nil {
		t.Fatalf("X509-SVID does not verify against the bundle: %v", err)
	}
	if id.String() != svid.SpiffeId {
		t.Errorf("SVID ID %s, response says %s", id, svid.SpiffeId)
	}
	leaf := chain[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
		t.Errorf("URI SANs %v, want exactly %s", leaf.URIs, id)
	}
	if leaf.IsCA || leaf.KeyUsage&x509.KeyUsageDigitalSignature == 0 || leaf.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign) != 0 {
		t.Errorf("IsCA=%t KeyUsage=%v, want a non-CA digitalSignature leaf", leaf.IsCA, leaf.KeyUsage)
	}
	if !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageServerAuth) || !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		t.Errorf("ExtKeyUsage %v, want serverAuth and clientAuth", leaf.ExtKeyUsage)
	}
	if leaf.NotAfter.After(caCert.NotAfter) || leaf.NotAfter.Unix() != svid.ExpiresAt {
		t.Errorf("NotAfter %v: beyond the CA's %v or not expires_at %d", leaf.NotAfter, caCert.NotAfter, svid.ExpiresAt)
	}
	if leaf.SerialNumber.Sign() <= 0 || leaf.SerialNumber.BitLen() > 160 {
		t.Errorf("serial %v is not a positive number of at most 20 bytes", leaf.SerialNumber)
	}
	if id.Path() == "/web" && !slices.Equal(leaf.DNSNames, []string{"web.example.org"}) {
		t.Errorf("DNS SANs %v, want the entry's web.example.org", leaf.DNSNames)
	}
	if u, _ := url.Parse(id.String()); u == nil || u.Scheme != "spiffe" {
		t.Errorf("SVID URI %s is not spiffe://", id)
	}
}

// TestAgentRefused covers ban, evict and a re-attestation that replaced
// the SVID: an open stream ends with PermissionDenied naming why, and new
// RPCs are refused.
func TestAgentRefused(t *testing.T) {
	e := newEnv(t)
	tests := []struct {
		name     string
		act      func(a *agent)
		wantText string
	}{
		{"ban", func(a *agent) { e.mustCLI("agent", "ban", "-spiffeID", a.id.String()) }, "banned"},
		{"evict", func(a *agent) { e.mustCLI("agent", "evict", "-spiffeID", a.id.String()) }, "evicted"},
		{"stale serial", func(a *agent) {
			// As a re-attestation does: a new SVID, the record names its serial.
			fresh := e.signAgentSVID(a.id)
			n := *a.node
			n.CertSerial = fresh.Certificates[0].SerialNumber.String()
			if _, err := e.srv.Store().UpsertNode(context.Background(), &n); err != nil {
				t.Fatal(err)
			}
		}, "re-attest"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := e.newAgent()
			en := e.createEntry("-spiffeID", "spiffe://example.org/"+strings.ReplaceAll(tc.name, " ", "-"), "-parentID", a.id.String(), "-selector", "unix:uid:1")
			client := e.dial(a.svid)
			st := e.openSync(client)
			if m := st.next(t); !m.Full || len(m.Upserted) != 1 {
				t.Fatalf("first message: full=%t with %d entries, want the full set of 1", m.Full, len(m.Upserted))
			}
			tc.act(a)
			err := st.end(t)
			if status.Code(err) != codes.PermissionDenied || !strings.Contains(status.Convert(err).Message(), tc.wantText) {
				t.Errorf("stream ended with %v, want PermissionDenied naming %q", err, tc.wantText)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err = client.BatchNewX509SVID(ctx, &agentv1.BatchNewX509SVIDRequest{Params: []*agentv1.X509SVIDParams{{EntryId: en.Id, Csr: newCSR(t)}}})
			if status.Code(err) != codes.PermissionDenied {
				t.Errorf("BatchNewX509SVID after %s: %v, want PermissionDenied", tc.name, err)
			}
			_, err = client.NewJWTSVID(ctx, &agentv1.NewJWTSVIDRequest{EntryId: en.Id, Audience: []string{"x"}})
			if status.Code(err) != codes.PermissionDenied {
				t.Errorf("NewJWTSVID after %s: %v, want PermissionDenied", tc.name, err)
			}
			stream, err := client.Sync(ctx, &agentv1.SyncRequest{})
			if err == nil {
				_, err = stream.Recv()
			}
			if status.Code(err) != codes.PermissionDenied {
				t.Errorf("new Sync after %s: %v, want PermissionDenied", tc.name, err)
			}
		})
	}
}

// TestSyncForeignSVID: an SVID of another trust domain's CA, or a workload
// SVID of this one, is not an agent.
func TestSyncForeignSVID(t *testing.T) {
	e := newEnv(t)
	workload := e.signAgentSVID(spiffeid.RequireFromPath(td, "/web"))
	st, err := e.dial(workload).Sync(context.Background(), &agentv1.SyncRequest{})
	if err == nil {
		_, err = st.Recv()
	}
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "not an agent ID") {
		t.Errorf("Sync with a workload SVID: %v, want PermissionDenied (not an agent ID)", err)
	}
}

// TestSyncBundleRotationAndExpiry runs the CA with a 3 s lifetime: the
// prepared CA (published at half-life) is pushed down the open stream as a
// bundle update, and when the agent SVID (clamped to the CA's lifetime)
// expires the stream ends, Unauthenticated.
func TestSyncBundleRotationAndExpiry(t *testing.T) {
	e := newEnv(t, func(c *config.Config) { c.CATTL = 3 * time.Second })
	a := e.newAgent()
	st := e.openSync(e.dial(a.svid))
	first := st.next(t)
	if first.Bundle == nil || len(first.Bundle.X509Authorities) != 1 {
		t.Fatalf("first bundle = %v, want one CA", first.Bundle)
	}
	var update *agentv1.SyncResponse
	for update == nil {
		m, ok := <-st.msgs
		if !ok {
			t.Fatalf("stream ended before a bundle update: %v", <-st.err)
		}
		if m.Bundle != nil {
			update = m
		}
	}
	if update.Full || update.Bundle.SequenceNumber <= first.Bundle.SequenceNumber || len(update.Bundle.X509Authorities) < 2 {
		t.Errorf("bundle update: full=%t sequence %d (was %d), %d CAs; want a newer bundle holding the prepared CA too",
			update.Full, update.Bundle.SequenceNumber, first.Bundle.SequenceNumber, len(update.Bundle.X509Authorities))
	}
	err := st.end(t)
	if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "expired") {
		t.Errorf("stream ended with %v, want Unauthenticated at SVID expiry", err)
	}
}

// TestShutdownEndsSyncStreams: stopping the server ends open streams with
// Unavailable (agents reconnect) instead of leaving GracefulStop to wait.
func TestShutdownEndsSyncStreams(t *testing.T) {
	e := newEnv(t)
	a := e.newAgent()
	st := e.openSync(e.dial(a.svid))
	if m := st.next(t); !m.Full {
		t.Fatal("first message is not the full set")
	}
	e.shutdown()
	err := st.end(t)
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "shutting down") {
		t.Errorf("stream ended with %v, want Unavailable: the server is shutting down", err)
	}
}
