package workloadapi_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ironroot/ironroot/workloadapi"
)

// testPKI is a trust domain's CA and JWT signing key, made in the test.
type testPKI struct {
	td     spiffeid.TrustDomain
	caCert *x509.Certificate
	caKey  *ecdsa.PrivateKey
	jwtKey *ecdsa.PrivateKey
	kid    string
	serial atomic.Int64
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func newPKI(t testing.TB, td string) *testPKI {
	t.Helper()
	p := &testPKI{td: spiffeid.RequireTrustDomainFromString(td), caKey: newKey(t), jwtKey: newKey(t), kid: "jwt-" + td}
	p.serial.Store(1)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Country: []string{"US"}, Organization: []string{"SPIFFE"}},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{p.td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, p.caKey.Public(), p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	if p.caCert, err = x509.ParseCertificate(der); err != nil {
		t.Fatal(err)
	}
	return p
}

func (p *testPKI) bundle() *spiffebundle.Bundle {
	b := spiffebundle.FromX509Authorities(p.td, []*x509.Certificate{p.caCert})
	b.SetJWTAuthorities(map[string]crypto.PublicKey{p.kid: p.jwtKey.Public()})
	return b
}

func (p *testPKI) svid(t testing.TB, path, hint string) workloadapi.X509SVID {
	t.Helper()
	id := spiffeid.RequireFromPath(p.td, path)
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(p.serial.Add(1)),
		Subject:               pkix.Name{Country: []string{"US"}, Organization: []string{"SPIRE"}},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(time.Hour),
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageKeyAgreement,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:                  []*url.URL{id.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.caCert, key.Public(), p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return workloadapi.X509SVID{ID: id, Certificates: []*x509.Certificate{cert}, PrivateKey: key, Hint: hint}
}

func (p *testPKI) jwt(id spiffeid.ID, audience []string, ttl time.Duration) (string, time.Time, error) {
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: p.jwtKey},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", p.kid))
	if err != nil {
		return "", time.Time{}, err
	}
	now := time.Now()
	exp := now.Add(ttl)
	tok, err := jwt.Signed(signer).Claims(jwt.Claims{
		Subject:  id.String(),
		Audience: jwt.Audience(audience),
		Expiry:   jwt.NewNumericDate(exp),
		IssuedAt: jwt.NewNumericDate(now),
	}).Serialize()
	return tok, exp, err
}

// testSource is an in-memory workloadapi.Source: callers with any of the
// entitled selectors get every SVID; others get only the bundles.
type testSource struct {
	pki      *testPKI
	entitled map[string]bool

	mu         sync.Mutex
	snap       *workloadapi.Snapshot
	subs       map[*workloadapi.Feed]bool // value: subscriber is entitled
	subscribes atomic.Int32
}

func newTestSource(pki *testPKI, snap *workloadapi.Snapshot, entitled ...string) *testSource {
	s := &testSource{pki: pki, entitled: make(map[string]bool), snap: snap, subs: make(map[*workloadapi.Feed]bool)}
	for _, e := range entitled {
		s.entitled[e] = true
	}
	return s
}

func (s *testSource) isEntitled(sels []workloadapi.Selector) bool {
	for _, sel := range sels {
		if s.entitled[sel.String()] {
			return true
		}
	}
	return false
}

func (s *testSource) view(entitled bool) *workloadapi.Snapshot {
	if entitled {
		return s.snap
	}
	return &workloadapi.Snapshot{Bundle: s.snap.Bundle, FederatedBundles: s.snap.FederatedBundles}
}

func (s *testSource) Subscribe(_ context.Context, sels []workloadapi.Selector) (workloadapi.Subscription, error) {
	s.subscribes.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	entitled := s.isEntitled(sels)
	var feed *workloadapi.Feed
	feed = workloadapi.NewFeed(s.view(entitled), func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		delete(s.subs, feed)
	})
	s.subs[feed] = entitled
	return feed, nil
}

// set publishes a new state to every subscriber.
func (s *testSource) set(snap *workloadapi.Snapshot) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.snap = snap
	for feed, entitled := range s.subs {
		feed.Push(s.view(entitled))
	}
}

func (s *testSource) FetchJWTSVIDs(_ context.Context, sels []workloadapi.Selector, audience []string, id spiffeid.ID) ([]workloadapi.JWTSVID, error) {
	if !s.isEntitled(sels) {
		return nil, workloadapi.ErrNoIdentity
	}
	s.mu.Lock()
	snap := s.snap
	s.mu.Unlock()
	var out []workloadapi.JWTSVID
	for _, x := range snap.SVIDs {
		if !id.IsZero() && x.ID != id {
			continue
		}
		tok, exp, err := s.pki.jwt(x.ID, audience, 5*time.Minute)
		if err != nil {
			return nil, err
		}
		out = append(out, workloadapi.JWTSVID{ID: x.ID, Token: tok, ExpiresAt: exp, Hint: x.Hint})
	}
	return out, nil
}
