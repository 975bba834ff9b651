package ca

import (
	"context"
	"crypto/elliptic"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/ironroot/ironroot/hsm"
	"github.com/ironroot/ironroot/server/store"
	"github.com/ironroot/ironroot/simulator"
	"github.com/ironroot/ironroot/simulator/simtest"
)

var softHSM *simulator.SoftHSM

func TestMain(m *testing.M) { os.Exit(simtest.RunWithSoftHSM(m, &softHSM, 6)) }

// fakeClock is a settable clock for rotation tests.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Set(t time.Time) {
	c.mu.Lock()
	c.now = t
	c.mu.Unlock()
}

type fixture struct {
	hsm   *hsm.HSM
	token *simulator.SoftHSMToken
	store store.Store
	dir   string
	clock *fakeClock
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	tok := simtest.SoftHSMToken(t, softHSM)
	h, err := hsm.Open(context.Background(), tok.URI)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	dir := t.TempDir()
	st := openStore(t, dir)
	return &fixture{hsm: h, token: tok, store: st, dir: dir, clock: &fakeClock{now: time.Now()}}
}

func openStore(t *testing.T, dir string) store.Store {
	t.Helper()
	st, err := store.OpenSQLite(context.Background(), filepath.Join(dir, "ds.sqlite3"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func (f *fixture) config(ttl time.Duration) Config {
	return Config{
		TrustDomain: spiffeid.RequireTrustDomainFromString("example.org"),
		Store:       f.store,
		Keys:        HSMKeyStore(f.hsm, f.token.Label),
		TTL:         ttl,
		Clock:       f.clock.Now,
	}
}

func states(m *Manager) (x, j map[store.AuthorityState]int) {
	x, j = map[store.AuthorityState]int{}, map[store.AuthorityState]int{}
	for _, a := range m.X509Authorities() {
		x[a.Record.State]++
	}
	for _, a := range m.JWTAuthorities() {
		j[a.Record.State]++
	}
	return x, j
}

func TestManagerRotation(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	t0 := f.clock.Now()
	const ttl = time.Hour
	m, err := NewManager(ctx, f.config(ttl))
	if err != nil {
		t.Fatal(err)
	}
	x, j := states(m)
	if x[store.StateActive] != 1 || j[store.StateActive] != 1 || len(m.X509Authorities()) != 1 || len(m.JWTAuthorities()) != 1 {
		t.Fatalf("after start: x509 %v jwt %v", x, j)
	}
	first := m.X509Authorities()[0]
	firstJWT := m.JWTAuthorities()[0]
	// The keys were generated on the token and cannot leave it.
	for _, k := range []Key{first.Key, firstJWT.Key} {
		attrs, err := k.(hsmKey).Attributes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !attrs.Sensitive || attrs.Extractable || !attrs.NeverExtractable || !attrs.Local {
			t.Errorf("key %s attributes %+v", k.URI(), attrs)
		}
	}
	b := m.Bundle()
	if len(b.X509Authorities) != 1 || len(b.JWTAuthorities) != 1 || b.Sequence == 0 {
		t.Fatalf("bundle after start: %d certs, %d jwt, seq %d", len(b.X509Authorities), len(b.JWTAuthorities), b.Sequence)
	}
	seq0 := b.Sequence
	bundleCh, cancel := m.SubscribeBundle()
	defer cancel()

	// Before half-life nothing changes.
	f.clock.Set(t0.Add(20 * time.Minute))
	if err := m.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	if x, _ := states(m); x[store.StatePrepared] != 0 {
		t.Fatalf("prepared before half-life: %v", x)
	}

	// At 1/2: a new key is prepared and published, the old one still signs.
	f.clock.Set(t0.Add(31 * time.Minute))
	if err := m.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	x, j = states(m)
	if x[store.StatePrepared] != 1 || x[store.StateActive] != 1 || j[store.StatePrepared] != 1 {
		t.Fatalf("at 1/2: x509 %v jwt %v", x, j)
	}
	select {
	case <-bundleCh:
	default:
		t.Fatal("bundle subscribers not woken by the prepared key")
	}
	b = m.Bundle()
	if len(b.X509Authorities) != 2 || len(b.JWTAuthorities) != 2 || b.Sequence <= seq0 {
		t.Fatalf("bundle at 1/2: %d certs, %d jwt keys, seq %d", len(b.X509Authorities), len(b.JWTAuthorities), b.Sequence)
	}
	if !m.ActiveCA().Equal(first.Cert) {
		t.Fatal("the prepared CA was activated early")
	}

	// At 5/6: the prepared key becomes active, the old one stays in the
	// bundle (overlap) and on the token.
	f.clock.Set(t0.Add(51 * time.Minute))
	if err := m.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	x, j = states(m)
	if x[store.StateOld] != 1 || x[store.StateActive] != 1 || j[store.StateOld] != 1 || j[store.StateActive] != 1 {
		t.Fatalf("at 5/6: x509 %v jwt %v", x, j)
	}
	if m.ActiveCA().Equal(first.Cert) {
		t.Fatal("rotation did not activate the prepared CA")
	}
	if b := m.Bundle(); len(b.X509Authorities) != 2 {
		t.Fatalf("bundle lost the old CA before it expired: %d", len(b.X509Authorities))
	}
	// New SVIDs are signed by the new CA.
	chain, err := m.SignX509SVID(SVIDParams{ID: spiffeid.RequireFromString("spiffe://example.org/w"), PublicKey: mustECKey(t, elliptic.P256()).Public(), NotBefore: f.clock.Now(), TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if err := chain[0].CheckSignatureFrom(m.ActiveCA()); err != nil {
		t.Fatalf("SVID not signed by the active CA: %v", err)
	}
	if !chain[0].NotAfter.Equal(m.ActiveCA().NotAfter) && chain[0].NotAfter.After(m.ActiveCA().NotAfter) {
		t.Fatal("SVID outlives its CA")
	}

	// After the old CA expires its key is destroyed and it leaves the bundle.
	f.clock.Set(t0.Add(61 * time.Minute))
	if err := m.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := f.hsm.FindKey(ctx, hsm.KeyRef{ID: first.Key.Ref().ID}); err == nil {
		t.Fatal("the expired CA key is still on the token")
	}
	if _, err := f.hsm.FindKey(ctx, hsm.KeyRef{ID: firstJWT.Key.Ref().ID}); err == nil {
		t.Fatal("the expired JWT key is still on the token")
	}
	for _, c := range m.Bundle().X509Authorities {
		if c.Equal(first.Cert) {
			t.Fatal("the expired CA is still in the bundle")
		}
	}
	recs, err := f.store.ListAuthorities(ctx, store.AuthorityX509)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		if r.ID == first.Record.ID {
			t.Fatal("the expired CA is still in the journal")
		}
	}
}

func TestManagerRestartKeepsBundle(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	m1, err := NewManager(ctx, f.config(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	before := m1.Bundle()
	m2, err := NewManager(ctx, f.config(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	after := m2.Bundle()
	if len(after.X509Authorities) != 1 || !after.X509Authorities[0].Equal(before.X509Authorities[0]) {
		t.Fatal("restart changed the X.509 bundle")
	}
	if len(after.JWTAuthorities) != 1 || after.JWTAuthorities[0].KeyID != before.JWTAuthorities[0].KeyID {
		t.Fatal("restart changed the JWT bundle")
	}
	keys, err := f.hsm.Keys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 {
		t.Fatalf("restart generated keys: %d on the token, want 2", len(keys))
	}
}

func TestManagerRefusesMissingOrWrongKey(t *testing.T) {
	ctx := context.Background()
	cases := []struct {
		name   string
		break_ func(t *testing.T, f *fixture, m *Manager)
		want   string
	}{
		{
			name: "deleted key",
			break_: func(t *testing.T, f *fixture, m *Manager) {
				if err := f.hsm.DestroyKey(ctx, hsm.KeyRef{ID: m.X509Authorities()[0].Key.Ref().ID}); err != nil {
					t.Fatal(err)
				}
			},
			want: "could not be found on the HSM",
		},
		{
			name: "journal points at another key",
			break_: func(t *testing.T, f *fixture, m *Manager) {
				rec := *m.X509Authorities()[0].Record
				rec.KeyID = m.JWTAuthorities()[0].Key.Ref().ID
				rec.KeyLabel = m.JWTAuthorities()[0].Key.Ref().Label
				if err := f.store.PutAuthority(ctx, &rec); err != nil {
					t.Fatal(err)
				}
			},
			want: "does not match",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			m, err := NewManager(ctx, f.config(time.Hour))
			if err != nil {
				t.Fatal(err)
			}
			tc.break_(t, f, m)
			_, err = NewManager(ctx, f.config(time.Hour))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want error containing %q", err, tc.want)
			}
		})
	}
}

func TestManagerUnderUpstreamCA(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	td := spiffeid.RequireTrustDomainFromString("example.org")
	// The operator's CA key lives on a PKCS#11 token too.
	upKey, err := f.hsm.GenerateKey(ctx, hsm.ECP384, "operator-root")
	if err != nil {
		t.Fatal(err)
	}
	upCert, err := NewCACertificate(CAParams{TrustDomain: td, Signer: upKey, NotBefore: f.clock.Now(), TTL: 48 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	cfg := f.config(time.Hour)
	cfg.Upstream = &Upstream{Chain: []*x509.Certificate{upCert}, Signer: upKey}
	m, err := NewManager(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	caCert := m.ActiveCA()
	if err := caCert.CheckSignatureFrom(upCert); err != nil {
		t.Fatalf("the CA is not an intermediate under the upstream CA: %v", err)
	}
	b := m.Bundle()
	if len(b.X509Authorities) != 1 || !b.X509Authorities[0].Equal(upCert) {
		t.Fatal("the bundle should hold the upstream root only")
	}
	wl := mustECKey(t, elliptic.P256())
	id := spiffeid.RequireFromString("spiffe://example.org/w")
	chain, err := m.SignX509SVID(SVIDParams{ID: id, PublicKey: wl.Public(), NotBefore: f.clock.Now(), TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 2 || !chain[1].Equal(caCert) {
		t.Fatalf("SVID chain should be leaf + intermediate CA, got %d certificates", len(chain))
	}
	got, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(td, b.X509Authorities))
	if err != nil || got != id {
		t.Fatalf("x509svid.Verify through the upstream root: %v %v", got, err)
	}
	// An upstream certificate whose key is not the given signer is refused.
	other, err := f.hsm.GenerateKey(ctx, hsm.ECP256, "operator-other")
	if err != nil {
		t.Fatal(err)
	}
	cfg2 := f.config(time.Hour)
	cfg2.Store = openStore(t, t.TempDir())
	cfg2.Upstream = &Upstream{Chain: []*x509.Certificate{upCert}, Signer: other}
	if _, err := NewManager(ctx, cfg2); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Fatalf("mismatched upstream key: %v", err)
	}
}
