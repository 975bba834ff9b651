package verifier

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/ironroot/ironroot/tpm"
)

// fakeClock is a settable clock for expiry tests.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func forgeVerifier(t testing.TB, f *forge, mod func(*Config), opts ...Option) *Verifier {
	t.Helper()
	cfg := Config{EKRoots: []*x509.Certificate{f.ca}}
	if mod != nil {
		mod(&cfg)
	}
	v, err := New(cfg, opts...)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return v
}

func TestForgedGoodNode(t *testing.T) {
	f := newForge(t)
	v := forgeVerifier(t, f, nil)
	ctx := t.Context()
	s, ch, err := v.Begin(ctx, f.identity())
	if err != nil {
		t.Fatalf("Begin: %v", err)
	}
	if len(ch.Credential) == 0 || len(ch.Secret) != 256 {
		t.Fatalf("challenge sizes: credential %d, secret %d", len(ch.Credential), len(ch.Secret))
	}
	nonce := activate(t, s)
	if len(nonce) != 32 {
		t.Fatalf("nonce of %d bytes", len(nonce))
	}
	f.pcrs[7] = bytes.Repeat([]byte{7}, 32)
	res, err := s.Finish(ctx, f.evidence(nonce), nil)
	if err != nil {
		t.Fatalf("Finish: %v", err)
	}
	wantHash, _ := EKHash(&f.ekKey.PublicKey)
	if res.EKHash != wantHash || res.Manufacturer != "IBM" || len(res.EKChain) != 2 {
		t.Fatalf("result: hash %s (want %s), manufacturer %q, chain %d", res.EKHash, wantHash, res.Manufacturer, len(res.EKChain))
	}
	if res.SecureBoot != nil {
		t.Fatalf("SecureBoot = %v without a log", *res.SecureBoot)
	}
	if res.Clock != (ClockInfo{Clock: 1000, ResetCount: 3, Safe: true}) {
		t.Fatalf("clock %+v", res.Clock)
	}
	if !f.keyKey.PublicKey.Equal(res.AgentKey) || !f.akKey.PublicKey.Equal(res.AKPublic) {
		t.Fatal("agent key or AK public key not returned")
	}
	sel := res.Selectors()
	if !slices.IsSorted(sel) || len(sel) != 10 {
		t.Fatalf("selectors not sorted or wrong count: %v", sel)
	}
	for _, want := range []string{
		"tpm:ek_hash:" + wantHash,
		"tpm:manufacturer:IBM",
		"tpm:pcr:sha256:7:" + strings.Repeat("07", 32),
		"tpm:pcr:sha256:0:" + strings.Repeat("00", 32),
	} {
		if !slices.Contains(sel, want) {
			t.Errorf("selector %q missing from %v", want, sel)
		}
	}
}

func TestForgedBeginRefusals(t *testing.T) {
	other := newForge(t)
	tests := []struct {
		name string
		cfg  func(*Config)
		mod  func(t *testing.T, f *forge, id *tpm.Identity)
		want error
	}{
		{"EK certificate from another CA", nil, func(t *testing.T, f *forge, id *tpm.Identity) {
			f.ekCert = f.issueEKCert(other.caKey, other.ca, &f.ekKey.PublicKey)
			id.EKCertificate = f.ekCert
		}, ErrEKUntrusted},
		{"certificate required but missing", func(c *Config) { c.RequireEKCertificate = true }, func(t *testing.T, f *forge, id *tpm.Identity) {
			id.EKCertificate = nil
		}, ErrEKUntrusted},
		{"no certificate and no allow-list", nil, func(t *testing.T, f *forge, id *tpm.Identity) {
			id.EKCertificate = nil
		}, ErrEKUntrusted},
		{"no certificate, not allow-listed", func(c *Config) {
			c.AllowList, _ = StaticAllowList(strings.Repeat("ab", 32))
		}, func(t *testing.T, f *forge, id *tpm.Identity) {
			id.EKCertificate = nil
		}, ErrEKNotAllowed},
		{"chained but not on required allow-list", func(c *Config) {
			c.RequireEKCertificate = true
			c.AllowList, _ = StaticAllowList(strings.Repeat("ab", 32))
		}, nil, ErrEKNotAllowed},
		{"certificate of another EK", nil, func(t *testing.T, f *forge, id *tpm.Identity) {
			for _, k := range ekKeyPool() {
				if !k.PublicKey.Equal(&f.ekKey.PublicKey) {
					id.EKCertificate = f.issueEKCert(f.caKey, f.ca, &k.PublicKey)
				}
			}
		}, ErrEKMismatch},
		{"EK is a signing key", nil, func(t *testing.T, f *forge, id *tpm.Identity) {
			id.EKPublic = f.akPub
		}, ErrEKTemplate},
		{"EK without symmetric algorithm", nil, func(t *testing.T, f *forge, id *tpm.Identity) {
			ek := tpm2.RSASRKTemplate
			ek.ObjectAttributes = tpm2.RSAEKTemplate.ObjectAttributes
			p, _ := ek.Parameters.RSADetail()
			p.Symmetric = tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull}
			ek.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, p)
			ek.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: f.ekKey.N.Bytes()})
			id.EKPublic = tpm2.Marshal(ek)
		}, ErrEKTemplate},
		{"AK not restricted", nil, func(t *testing.T, f *forge, id *tpm.Identity) {
			f.akPub = eccPublic(f.akKey, tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, SignEncrypt: true})
			*id = f.identity()
		}, ErrAKInvalid},
		{"AK without sign", nil, func(t *testing.T, f *forge, id *tpm.Identity) {
			f.akPub = eccPublic(f.akKey, tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, Restricted: true, Decrypt: true})
			*id = f.identity()
		}, ErrAKInvalid},
		{"AK exportable", nil, func(t *testing.T, f *forge, id *tpm.Identity) {
			f.akPub = eccPublic(f.akKey, tpm2.TPMAObject{FixedParent: true, SensitiveDataOrigin: true, Restricted: true, SignEncrypt: true})
			*id = f.identity()
		}, ErrAKInvalid},
		{"AK creation signed by another key", nil, func(t *testing.T, f *forge, id *tpm.Identity) {
			id.AK.CreateSignature = sign(t, other.akKey, id.AK.CreateAttestation)
		}, ErrAKInvalid},
		{"AK creation data swapped", nil, func(t *testing.T, f *forge, id *tpm.Identity) {
			id.AK.CreateData = append([]byte(nil), id.AK.CreateData...)
			id.AK.CreateData[len(id.AK.CreateData)-3] ^= 1
		}, ErrAKInvalid},
		{"AK creation attestation of another key", nil, func(t *testing.T, f *forge, id *tpm.Identity) {
			o := other.identity()
			id.AK.CreateAttestation, id.AK.CreateSignature = o.AK.CreateAttestation, sign(t, f.akKey, o.AK.CreateAttestation)
		}, ErrAKInvalid},
		{"garbage EK public", nil, func(t *testing.T, f *forge, id *tpm.Identity) {
			id.EKPublic = []byte{1, 2, 3}
		}, ErrMalformed},
		{"EK public with trailing bytes", nil, func(t *testing.T, f *forge, id *tpm.Identity) {
			id.EKPublic = append(append([]byte(nil), f.ekPub...), 0)
		}, ErrMalformed},
		{"garbage EK certificate", nil, func(t *testing.T, f *forge, id *tpm.Identity) {
			id.EKCertificate = []byte("not a certificate")
		}, ErrMalformed},
		{"garbage intermediate", nil, func(t *testing.T, f *forge, id *tpm.Identity) {
			id.EKIntermediates = [][]byte{{0x30, 0x01}}
		}, ErrMalformed},
		{"garbage AK public", nil, func(t *testing.T, f *forge, id *tpm.Identity) {
			id.AK.Public = []byte{0, 0x23}
		}, ErrMalformed},
		{"AK creation data missing", nil, func(t *testing.T, f *forge, id *tpm.Identity) {
			id.AK.CreateData = nil
		}, ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newForge(t)
			v := forgeVerifier(t, f, tt.cfg)
			id := f.identity()
			if tt.mod != nil {
				tt.mod(t, f, &id)
			}
			s, _, err := v.Begin(t.Context(), id)
			t.Logf("refused: %v", err)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Begin error = %v, want %v", err, tt.want)
			}
			if s != nil {
				t.Fatal("session returned with an error")
			}
		})
	}
}

func TestForgedAllowListAdmits(t *testing.T) {
	f := newForge(t)
	h, _ := EKHash(&f.ekKey.PublicKey)
	al, err := StaticAllowList(strings.ToUpper(h))
	if err != nil {
		t.Fatal(err)
	}
	v := forgeVerifier(t, f, func(c *Config) { c.EKRoots, c.AllowList = nil, al })
	id := f.identity()
	id.EKCertificate = nil
	s, _, err := v.Begin(t.Context(), id)
	if err != nil {
		t.Fatalf("Begin: %v", err)
	}
	res, err := s.Finish(t.Context(), f.evidence(activate(t, s)), nil)
	if err != nil {
		t.Fatalf("Finish: %v", err)
	}
	if res.Manufacturer != "" || res.EKChain != nil || res.EKHash != h {
		t.Fatalf("allow-listed result: %+v", res)
	}
	for _, s := range res.Selectors() {
		if strings.HasPrefix(s, "tpm:manufacturer:") {
			t.Fatalf("manufacturer selector without a verified certificate: %s", s)
		}
	}
}

func TestForgedFinishRefusals(t *testing.T) {
	other := newForge(t)
	flip := func(b []byte, i int) []byte {
		b = append([]byte(nil), b...)
		if i < 0 {
			i += len(b)
		}
		b[i] ^= 0x01
		return b
	}
	tests := []struct {
		name string
		prev *ClockInfo
		mod  func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte)
		want error
	}{
		{"flipped byte in quote attest", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.Quote.Attest = flip(ev.Quote.Attest, 20)
		}, ErrQuote},
		{"flipped byte in quote signature", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.Quote.Signature = flip(ev.Quote.Signature, -1)
		}, ErrQuote},
		{"quote signed by another AK", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.Quote.Signature = sign(t, other.akKey, ev.Quote.Attest)
		}, ErrQuote},
		{"signed structure without TPM_GENERATED", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			a := append([]byte(nil), ev.Quote.Attest...)
			a[0] = 0
			ev.Quote.Attest, ev.Quote.Signature = a, sign(t, f.akKey, a)
		}, ErrQuote},
		{"certify structure presented as quote", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.Quote.Attest, ev.Quote.Signature = ev.Key.CertifyInfo, ev.Key.Signature
		}, ErrQuote},
		{"quote over another nonce", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.Quote, ev.PCRs = f.quote(bytes.Repeat([]byte{1}, 32), defaultPCRs)
		}, ErrNonce},
		{"wrong PCR selection", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.Quote, ev.PCRs = f.quote(nonce, []int{0, 1, 2, 3, 4, 5, 6})
		}, ErrPCRSelection},
		{"wider PCR selection", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.Quote, ev.PCRs = f.quote(nonce, []int{0, 1, 2, 3, 4, 5, 6, 7, 8})
		}, ErrPCRSelection},
		{"tampered PCR value", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.PCRs[3].Digest = flip(ev.PCRs[3].Digest, 0)
		}, ErrPCRValues},
		{"unquoted PCR supplied", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.PCRs = append(ev.PCRs, tpm.PCR{Index: 10, Alg: "sha256", Digest: make([]byte, 32)})
		}, ErrPCRValues},
		{"quoted PCR missing", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.PCRs = ev.PCRs[1:]
		}, ErrPCRValues},
		{"PCR of another bank", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.PCRs[0].Alg = "sha1"
		}, ErrPCRValues},
		{"clock unsafe with no reset since", &ClockInfo{Clock: 10, ResetCount: 3, Safe: true}, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			f.clock.Safe = false
			*ev = f.evidence(nonce)
		}, ErrClock},
		{"reset count went back", &ClockInfo{Clock: 10, ResetCount: 4, Safe: true}, nil, ErrClock},
		{"restart count went back", &ClockInfo{Clock: 10, ResetCount: 3, RestartCount: 1, Safe: true}, nil, ErrClock},
		{"clock stood still", &ClockInfo{Clock: 1000, ResetCount: 3, Safe: true}, nil, ErrClock},
		{"key certified by another AK", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.Key.Signature = sign(t, other.akKey, ev.Key.CertifyInfo)
		}, ErrKeyCertification},
		{"key certified without nonce", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.Key = f.certify(nil)
		}, ErrKeyCertification},
		{"key certified with another nonce", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.Key = f.certify(bytes.Repeat([]byte{9}, 32))
		}, ErrKeyCertification},
		{"certification of another key", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.Key.Public = other.keyPub
		}, ErrKeyCertification},
		{"quote presented as certification", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.Key.CertifyInfo, ev.Key.Signature = ev.Quote.Attest, ev.Quote.Signature
		}, ErrKeyCertification},
		{"restricted agent key", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			f.keyPub = f.akPub
			ev.Key = f.certify(nonce)
		}, ErrKeyCertification},
		{"exportable agent key", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			f.keyPub = eccPublic(f.keyKey, tpm2.TPMAObject{FixedParent: true, SensitiveDataOrigin: true, SignEncrypt: true})
			ev.Key = f.certify(nonce)
		}, ErrKeyCertification},
		{"imported agent key", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			f.keyPub = eccPublic(f.keyKey, tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SignEncrypt: true})
			ev.Key = f.certify(nonce)
		}, ErrKeyCertification},
		{"P-384 agent key", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			k, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
			f.keyPub = eccPublic(k, tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, SignEncrypt: true})
			ev.Key = f.certify(nonce)
		}, ErrKeyCertification},
		{"no agent key", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.Key = tpm.CertifiedKey{}
		}, ErrKeyCertification},
		{"garbage quote", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.Quote.Signature = []byte{0xde, 0xad}
		}, ErrMalformed},
		{"garbage key public", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.Key.Public = []byte{0xff}
		}, ErrMalformed},
		{"garbage event log", nil, func(t *testing.T, f *forge, ev *tpm.PlatformEvidence, nonce []byte) {
			ev.EventLog = []byte("garbage")
		}, ErrEventLog},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newForge(t)
			v := forgeVerifier(t, f, nil)
			s, _, err := v.Begin(t.Context(), f.identity())
			if err != nil {
				t.Fatalf("Begin: %v", err)
			}
			nonce := activate(t, s)
			ev := f.evidence(nonce)
			if tt.mod != nil {
				tt.mod(t, f, &ev, nonce)
			}
			res, err := s.Finish(t.Context(), ev, tt.prev)
			t.Logf("refused: %v", err)
			if !errors.Is(err, tt.want) || res != nil {
				t.Fatalf("Finish error = %v, want %v", err, tt.want)
			}
			// The session is spent: the good evidence does not pass now.
			if _, err := s.Finish(t.Context(), f.evidence(nonce), nil); !errors.Is(err, ErrNonce) {
				t.Fatalf("retry after refusal: %v, want ErrNonce", err)
			}
		})
	}
}

// An AK outside the endorsement hierarchy gets obfuscated counters, so only
// Clock can be compared with the previous attestation.
func TestForgedObfuscatedCounters(t *testing.T) {
	tests := []struct {
		name string
		prev ClockInfo
		want error
	}{
		{"counters differ, clock advanced", ClockInfo{Clock: 999, ResetCount: 9, RestartCount: 9, Safe: true}, nil},
		{"clock went back", ClockInfo{Clock: 1001, ResetCount: 1, Safe: true}, ErrClock},
		{"clock stood still", ClockInfo{Clock: 1000, ResetCount: 3, Safe: true}, ErrClock},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newForge(t)
			v := forgeVerifier(t, f, nil)
			id := f.identity()
			// Re-create the AK evidence with an owner-hierarchy parent.
			id.AK = forgeAKUnder(t, f, tpm2.TPMRHOwner)
			s, _, err := v.Begin(t.Context(), id)
			if err != nil {
				t.Fatal(err)
			}
			res, err := s.Finish(t.Context(), f.evidence(activate(t, s)), &tt.prev)
			if !errors.Is(err, tt.want) && !(tt.want == nil && err == nil) {
				t.Fatalf("Finish: %v, want %v", err, tt.want)
			}
			if err == nil && !res.Clock.Obfuscated {
				t.Fatal("owner-hierarchy AK not reported as obfuscated")
			}
		})
	}
}

func TestForgedClockProgress(t *testing.T) {
	tests := []struct {
		name string
		prev ClockInfo
	}{
		{"clock advanced", ClockInfo{Clock: 999, ResetCount: 3, Safe: true}},
		{"reboot since", ClockInfo{Clock: 5000, ResetCount: 2, RestartCount: 7, Safe: true}},
		{"restart since", ClockInfo{Clock: 5000, ResetCount: 3, RestartCount: 0, Safe: true}},
		// A power cut: the clock is unsafe, but resetCount moved.
		{"power loss since", ClockInfo{Clock: 5000, ResetCount: 2, Safe: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newForge(t)
			switch tt.name {
			case "restart since":
				f.clock.RestartCount = 1
			case "power loss since":
				f.clock.Safe = false
			}
			v := forgeVerifier(t, f, nil)
			s, _, err := v.Begin(t.Context(), f.identity())
			if err != nil {
				t.Fatal(err)
			}
			if _, err := s.Finish(t.Context(), f.evidence(activate(t, s)), &tt.prev); err != nil {
				t.Fatalf("Finish with previous %+v: %v", tt.prev, err)
			}
		})
	}
}

func TestForgedSessionRules(t *testing.T) {
	f := newForge(t)
	clock := &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	v := forgeVerifier(t, f, func(c *Config) { c.NonceTTL = 30 * time.Second }, WithClock(clock.Now))
	ctx := t.Context()
	begin := func() *Session {
		s, _, err := v.Begin(ctx, f.identity())
		if err != nil {
			t.Fatal(err)
		}
		return s
	}

	t.Run("wrong secret", func(t *testing.T) {
		s := begin()
		if _, err := s.Activate(ctx, tpm.ActivationProof{Secret: make([]byte, 32)}); !errors.Is(err, ErrActivation) {
			t.Fatalf("got %v", err)
		}
		// No second chance, even with the right secret.
		if _, err := s.Activate(ctx, tpm.ActivationProof{Secret: s.secret}); !errors.Is(err, ErrActivation) {
			t.Fatalf("second Activate: %v", err)
		}
	})
	t.Run("activate twice", func(t *testing.T) {
		s := begin()
		secret := append([]byte(nil), s.secret...)
		if _, err := s.Activate(ctx, tpm.ActivationProof{Secret: secret}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Activate(ctx, tpm.ActivationProof{Secret: secret}); !errors.Is(err, ErrActivation) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("finish before activate", func(t *testing.T) {
		s := begin()
		if _, err := s.Finish(ctx, f.evidence(make([]byte, 32)), nil); !errors.Is(err, ErrActivation) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("challenge expired", func(t *testing.T) {
		s := begin()
		clock.Advance(31 * time.Second)
		if _, err := s.Activate(ctx, tpm.ActivationProof{Secret: s.secret}); !errors.Is(err, ErrActivation) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("nonce expired", func(t *testing.T) {
		s := begin()
		nonce := activate(t, s)
		clock.Advance(31 * time.Second)
		if _, err := s.Finish(ctx, f.evidence(nonce), nil); !errors.Is(err, ErrNonce) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("replayed evidence", func(t *testing.T) {
		s := begin()
		nonce := activate(t, s)
		ev := f.evidence(nonce)
		if _, err := s.Finish(ctx, ev, nil); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Finish(ctx, ev, nil); !errors.Is(err, ErrNonce) {
			t.Fatalf("second Finish: %v", err)
		}
		// Another session cannot use the evidence either.
		s2 := begin()
		activate(t, s2)
		if _, err := s2.Finish(ctx, ev, nil); !errors.Is(err, ErrNonce) {
			t.Fatalf("evidence replayed into another session: %v", err)
		}
	})
	t.Run("canceled context", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if _, _, err := v.Begin(cctx, f.identity()); !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v", err)
		}
	})
}

func TestForgedPCRPolicy(t *testing.T) {
	f := newForge(t)
	want := bytes.Repeat([]byte{0xaa}, 32)
	v := forgeVerifier(t, f, func(c *Config) { c.RequiredPCRs = map[int][]byte{4: want} })
	for _, tt := range []struct {
		name string
		pcr4 []byte
		want error
	}{
		{"matches", want, nil},
		{"differs", make([]byte, 32), ErrPCRPolicy},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f.pcrs[4] = tt.pcr4
			s, _, err := v.Begin(t.Context(), f.identity())
			if err != nil {
				t.Fatal(err)
			}
			_, err = s.Finish(t.Context(), f.evidence(activate(t, s)), nil)
			if !errors.Is(err, tt.want) && !(tt.want == nil && err == nil) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
		})
	}
}

func TestNewConfig(t *testing.T) {
	f := newForge(t)
	roots := []*x509.Certificate{f.ca}
	al, _ := StaticAllowList()
	tests := []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"roots", Config{EKRoots: roots}, true},
		{"allow-list only", Config{AllowList: al}, true},
		{"nothing trusted", Config{}, false},
		{"required certs without roots", Config{AllowList: al, RequireEKCertificate: true}, false},
		{"PCR out of range", Config{EKRoots: roots, PCRs: []int{24}}, false},
		{"negative PCR", Config{EKRoots: roots, PCRs: []int{-1}}, false},
		{"duplicate PCR", Config{EKRoots: roots, PCRs: []int{1, 1}}, false},
		{"required PCR not quoted", Config{EKRoots: roots, RequiredPCRs: map[int][]byte{9: make([]byte, 32)}}, false},
		{"required PCR wrong size", Config{EKRoots: roots, RequiredPCRs: map[int][]byte{1: make([]byte, 20)}}, false},
		{"negative TTL", Config{EKRoots: roots, NonceTTL: -time.Second}, false},
		{"nil root", Config{EKRoots: []*x509.Certificate{nil}}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, err := New(tt.cfg)
			if (err == nil) != tt.ok {
				t.Fatalf("New error = %v, want ok=%v", err, tt.ok)
			}
			if err == nil && !slices.Equal(v.PCRs(), []int{0, 1, 2, 3, 4, 5, 6, 7}) && len(tt.cfg.PCRs) == 0 {
				t.Fatalf("default PCRs = %v", v.PCRs())
			}
		})
	}
}

func TestEKChainCacheHonoursValidity(t *testing.T) {
	f := newForge(t)
	for _, size := range []int{0, 4096} {
		clock := &fakeClock{now: forgeEpoch.AddDate(1, 0, 0)}
		v := forgeVerifier(t, f, nil, WithClock(clock.Now), WithEKChainCache(size))
		for i := 0; i < 2; i++ { // the second Begin is a cache hit
			if _, _, err := v.Begin(t.Context(), f.identity()); err != nil {
				t.Fatalf("cache %d, Begin %d: %v", size, i, err)
			}
		}
		clock.Advance(51 * 365 * 24 * time.Hour) // past the certificates' NotAfter
		if _, _, err := v.Begin(t.Context(), f.identity()); !errors.Is(err, ErrEKUntrusted) {
			t.Fatalf("cache %d: expired EK certificate: %v, want ErrEKUntrusted", size, err)
		}
	}
}

// The verifier is shared by all of the server's RPC handlers.
func TestForgedConcurrentSessions(t *testing.T) {
	f := newForge(t)
	v := forgeVerifier(t, f, nil)
	id := f.identity()
	const n = 16
	evs := make(chan error, n)
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, _, err := v.Begin(t.Context(), id)
			if err != nil {
				evs <- err
				return
			}
			s.mu.Lock()
			secret := append([]byte(nil), s.secret...)
			s.mu.Unlock()
			nonce, err := s.Activate(t.Context(), tpm.ActivationProof{Secret: secret})
			if err != nil {
				evs <- err
				return
			}
			_, err = s.Finish(t.Context(), f.evidence(nonce), nil)
			evs <- err
		}()
	}
	wg.Wait()
	close(evs)
	for err := range evs {
		if err != nil {
			t.Fatalf("concurrent attestation: %v", err)
		}
	}
	v.mu.Lock()
	left := len(v.nonces)
	v.mu.Unlock()
	if left != 0 {
		t.Fatalf("%d nonces left outstanding after every session finished", left)
	}
}
