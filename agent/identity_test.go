package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ironroot/ironroot/simulator"
	"github.com/ironroot/ironroot/simulator/simtest"
	"github.com/ironroot/ironroot/tpm"
)

var (
	// suite manufactures the TPMs the tests' servers trust.
	suite *simtest.Suite
	// softHSM holds the tokens of the in-process servers (agent_test.go).
	softHSM *simulator.SoftHSM
)

// TestMain sets up both simulators: an swtpm suite and one SoftHSM with a
// token per server the tests start. A PKCS#11 module is initialised once
// per process, so servers run one at a time (no t.Parallel).
func TestMain(m *testing.M) {
	suite = simtest.MustSuite()
	code := simtest.RunWithSoftHSM(m, &softHSM, 14)
	suite.Close()
	os.Exit(code)
}

// certFor makes an agent SVID-shaped certificate for pub, signed by a
// throwaway CA: the resume logic checks names, validity and key match.
func certFor(t *testing.T, pub any, id string, notBefore, notAfter time.Time) *x509.Certificate {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(id)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), URIs: []*url.URL{u}, NotBefore: notBefore, NotAfter: notAfter}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, caKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestSaveAndResume(t *testing.T) {
	ctx := context.Background()
	sw := suite.Start(t)
	tp, err := tpm.Open(ctx, sw.Address())
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	ak, err := tp.NewAK(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer ak.Close()
	key, _, err := tp.NewKey(ctx, ak, []byte("nonce-nonce-nonce-nonce-nonce-00"))
	if err != nil {
		t.Fatal(err)
	}
	defer key.Close()
	other, _, err := tp.NewKey(ctx, ak, []byte("nonce-nonce-nonce-nonce-nonce-01"))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()

	td := spiffeid.RequireTrustDomainFromString("example.org")
	const id = "spiffe://example.org/ironroot/agent/tpm/abcd"
	now := time.Now()
	valid := certFor(t, key.Public(), id, now.Add(-time.Minute), now.Add(time.Hour))

	cases := []struct {
		name    string
		chain   []*x509.Certificate
		blob    []byte
		td      spiffeid.TrustDomain
		resumes bool
		wantErr bool
	}{
		{name: "valid", chain: []*x509.Certificate{valid}, blob: key.Marshal(), td: td, resumes: true},
		{name: "expired", chain: []*x509.Certificate{certFor(t, key.Public(), id, now.Add(-2*time.Hour), now.Add(-time.Hour))}, blob: key.Marshal(), td: td},
		{name: "other trust domain", chain: []*x509.Certificate{valid}, blob: key.Marshal(), td: spiffeid.RequireTrustDomainFromString("other.org")},
		{name: "blob of another key", chain: []*x509.Certificate{valid}, blob: other.Marshal(), td: td, wantErr: true},
		{name: "garbage blob", chain: []*x509.Certificate{valid}, blob: []byte("not a blob"), td: td, wantErr: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := save(dir, tc.chain, tc.blob, []*x509.Certificate{valid}); err != nil {
				t.Fatal(err)
			}
			for _, f := range []string{svidFile, keyBlobFile, bundleFile} {
				if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
					t.Fatalf("%s not saved: %v", f, err)
				}
			}
			chain, k, err := resume(ctx, tp, dir, tc.td, now)
			if tc.wantErr {
				if err == nil {
					t.Fatal("resumed with a bad key blob")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if (chain != nil) != tc.resumes {
				t.Fatalf("resumed = %v, want %v", chain != nil, tc.resumes)
			}
			if k == nil {
				return
			}
			defer k.Close()
			// The reloaded TPM key signs for the saved certificate.
			digest := make([]byte, 32)
			sig, err := k.Sign(rand.Reader, digest, nil)
			if err != nil {
				t.Fatal(err)
			}
			if !ecdsa.VerifyASN1(chain[0].PublicKey.(*ecdsa.PublicKey), digest, sig) {
				t.Fatal("the resumed key does not sign for the saved SVID")
			}
		})
	}

	// Nothing saved: no resume, no error.
	chain, k, err := resume(ctx, tp, t.TempDir(), td, now)
	if chain != nil || k != nil || err != nil {
		t.Fatalf("empty data dir: %v %v %v", chain, k, err)
	}
}

func TestRenewAt(t *testing.T) {
	// Certificates as the server's CA makes them: NotBefore backdated 10 s
	// before issue.
	issued := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	cert := func(ttl time.Duration) *x509.Certificate {
		return &x509.Certificate{NotBefore: issued.Add(-10 * time.Second), NotAfter: issued.Add(ttl)}
	}
	cases := []struct {
		name     string
		ttl      time.Duration
		received time.Time
		want     time.Time
	}{
		{"long-lived, fresh", time.Hour, issued, issued.Add(30 * time.Minute)},
		{"long-lived, resumed", time.Hour, time.Time{}, issued.Add(30*time.Minute - 5*time.Second)},
		// The midpoint of the backdated validity is 2 s before issue.
		{"short-lived, fresh", 6 * time.Second, issued, issued.Add(3 * time.Second)},
		{"short-lived, received late", 6 * time.Second, issued.Add(2 * time.Second), issued.Add(4 * time.Second)},
		{"short-lived, resumed", 6 * time.Second, time.Time{}, issued.Add(-2 * time.Second)},
		{"TTL twice the backdate, fresh", 20 * time.Second, issued, issued.Add(10 * time.Second)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := renewAt(cert(tc.ttl), tc.received); !got.Equal(tc.want) {
				t.Fatalf("renewAt = %v, want %v", got, tc.want)
			}
		})
	}
}
