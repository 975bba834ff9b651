package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// These tests exercise the templates with software keys; the HSM-backed path
// is the same crypto.Signer interface and is covered by the server's
// SoftHSM integration tests.

func mustECKey(t *testing.T, c elliptic.Curve) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestCAAndSVID(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	now := time.Now()
	caKey := mustECKey(t, elliptic.P256())
	caCert, err := NewCACertificate(CAParams{TrustDomain: td, Signer: caKey, NotBefore: now, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if !caCert.IsCA || caCert.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign {
		t.Errorf("CA flags: IsCA=%v KeyUsage=%v", caCert.IsCA, caCert.KeyUsage)
	}
	if len(caCert.URIs) != 1 || caCert.URIs[0].String() != "spiffe://example.org" {
		t.Errorf("CA URI SAN: %v", caCert.URIs)
	}
	if caCert.SerialNumber.BitLen() > 128 || len(caCert.SubjectKeyId) != 20 {
		t.Errorf("serial/SKI: %v %x", caCert.SerialNumber, caCert.SubjectKeyId)
	}

	workloadKey := mustECKey(t, elliptic.P256())
	id := spiffeid.RequireFromString("spiffe://example.org/web")
	svid, err := SignX509SVID(caCert, caKey, SVIDParams{
		ID: id, PublicKey: workloadKey.Public(), DNSNames: []string{"web.example.org", "web"},
		NotBefore: now, TTL: 2 * time.Hour, // longer than the CA: must be capped
	})
	if err != nil {
		t.Fatal(err)
	}
	if !svid.NotAfter.Equal(caCert.NotAfter) {
		t.Errorf("NotAfter %v not capped at CA's %v", svid.NotAfter, caCert.NotAfter)
	}
	if svid.IsCA || svid.KeyUsage&x509.KeyUsageDigitalSignature == 0 || svid.KeyUsage&x509.KeyUsageCertSign != 0 {
		t.Errorf("leaf flags: IsCA=%v KeyUsage=%v", svid.IsCA, svid.KeyUsage)
	}
	if len(svid.ExtKeyUsage) != 2 || svid.Subject.CommonName != "web.example.org" || len(svid.DNSNames) != 2 {
		t.Errorf("EKU/CN/DNS: %v %q %v", svid.ExtKeyUsage, svid.Subject.CommonName, svid.DNSNames)
	}
	if svid.SerialNumber.BitLen() > 128 || svid.SerialNumber.Sign() <= 0 {
		t.Errorf("serial %v", svid.SerialNumber)
	}
	// go-spiffe's verifier applies the standard's leaf checks.
	gotID, _, err := x509svid.Verify([]*x509.Certificate{svid}, x509bundle.FromX509Authorities(td, []*x509.Certificate{caCert}))
	if err != nil || gotID != id {
		t.Fatalf("x509svid.Verify: %v %v", gotID, err)
	}
	for _, ext := range svid.Extensions {
		if ext.Id.String() == "2.5.29.15" && !ext.Critical {
			t.Error("key usage extension is not critical")
		}
	}
}

func TestIntermediateCA(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	now := time.Now()
	upKey := mustECKey(t, elliptic.P384())
	up, err := NewCACertificate(CAParams{TrustDomain: td, Signer: upKey, NotBefore: now, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	key := mustECKey(t, elliptic.P256())
	inter, err := NewCACertificate(CAParams{TrustDomain: td, Signer: key, NotBefore: now, TTL: 10 * time.Hour, Parent: up, ParentSigner: upKey})
	if err != nil {
		t.Fatal(err)
	}
	if !inter.NotAfter.Equal(up.NotAfter) || string(inter.AuthorityKeyId) != string(up.SubjectKeyId) {
		t.Errorf("intermediate not capped/linked: %v %v", inter.NotAfter, up.NotAfter)
	}
	if err := inter.CheckSignatureFrom(up); err != nil {
		t.Fatal(err)
	}
	other := mustECKey(t, elliptic.P256())
	if _, err := NewCACertificate(CAParams{TrustDomain: td, Signer: key, NotBefore: now, TTL: time.Hour, Parent: up, ParentSigner: other}); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Fatalf("mismatched upstream key accepted: %v", err)
	}
}

func TestSignX509SVIDRefuses(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	now := time.Now()
	caKey := mustECKey(t, elliptic.P256())
	caCert, err := NewCACertificate(CAParams{TrustDomain: td, Signer: caKey, NotBefore: now, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	small, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	good := mustECKey(t, elliptic.P256()).Public()
	cases := []struct {
		name string
		p    SVIDParams
		want string
	}{
		{"no path", SVIDParams{ID: td.ID(), PublicKey: good, NotBefore: now, TTL: time.Minute}, "empty path"},
		{"other trust domain", SVIDParams{ID: spiffeid.RequireFromString("spiffe://other.org/x"), PublicKey: good, NotBefore: now, TTL: time.Minute}, "not in trust domain"},
		{"small RSA key", SVIDParams{ID: spiffeid.RequireFromString("spiffe://example.org/x"), PublicKey: small.Public(), NotBefore: now, TTL: time.Minute}, "too small"},
		{"no key", SVIDParams{ID: spiffeid.RequireFromString("spiffe://example.org/x"), NotBefore: now, TTL: time.Minute}, "no subject key"},
		{"expired CA", SVIDParams{ID: spiffeid.RequireFromString("spiffe://example.org/x"), PublicKey: good, NotBefore: now.Add(2 * time.Hour), TTL: time.Minute}, "expired"},
		{"zero TTL", SVIDParams{ID: spiffeid.RequireFromString("spiffe://example.org/x"), PublicKey: good, NotBefore: now}, "TTL"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := SignX509SVID(caCert, caKey, tc.p)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want error containing %q", err, tc.want)
			}
		})
	}
}

func TestJWTSVID(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	id := spiffeid.RequireFromString("spiffe://example.org/web")
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		key  crypto.Signer
		alg  string
	}{
		{"P-256", mustECKey(t, elliptic.P256()), "ES256"},
		{"P-384", mustECKey(t, elliptic.P384()), "ES384"},
		{"RSA", rsaKey, "RS256"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			now := time.Now()
			token, exp, err := SignJWTSVID(tc.key, "kid-1", JWTParams{ID: id, Audience: []string{"db"}, IssuedAt: now, TTL: 5 * time.Minute, KeyNotAfter: now.Add(time.Minute)})
			if err != nil {
				t.Fatal(err)
			}
			if exp.After(now.Add(time.Minute)) {
				t.Errorf("exp %v beyond the key's not-after", exp)
			}
			b := jwtbundle.New(td)
			if err := b.AddJWTAuthority("kid-1", tc.key.Public()); err != nil {
				t.Fatal(err)
			}
			svid, err := jwtsvid.ParseAndValidate(token, b, []string{"db"})
			if err != nil {
				t.Fatal(err)
			}
			if svid.ID != id || svid.Claims["iat"] == nil {
				t.Errorf("claims: %v", svid.Claims)
			}
			if _, err := jwtsvid.ParseAndValidate(token, b, []string{"other"}); err == nil {
				t.Error("wrong audience accepted")
			}
			header := strings.Split(token, ".")[0]
			if !strings.Contains(decodeSegment(t, header), `"alg":"`+tc.alg+`"`) || !strings.Contains(decodeSegment(t, header), `"typ":"JWT"`) {
				t.Errorf("header %s", decodeSegment(t, header))
			}
		})
	}
	key := mustECKey(t, elliptic.P256())
	for _, p := range []JWTParams{
		{ID: id, IssuedAt: time.Now(), TTL: time.Minute},
		{ID: id, Audience: []string{""}, IssuedAt: time.Now(), TTL: time.Minute},
		{ID: td.ID(), Audience: []string{"a"}, IssuedAt: time.Now(), TTL: time.Minute},
		{ID: id, Audience: []string{"a"}, IssuedAt: time.Now(), TTL: time.Minute, KeyNotAfter: time.Now().Add(-time.Second)},
	} {
		if _, _, err := SignJWTSVID(key, "k", p); err == nil {
			t.Errorf("accepted %+v", p)
		}
	}
}

func decodeSegment(t *testing.T, s string) string {
	t.Helper()
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
