package verifier

// Tests against real software TPMs (swtpm), through the agent side of package
// tpm: the evidence is exactly what a TPM produces. They never skip: without
// swtpm, TestMain fails the binary.

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ironroot/ironroot/simulator"
	"github.com/ironroot/ironroot/simulator/simtest"
	"github.com/ironroot/ironroot/tpm"
)

var (
	// suite is the trusted manufacturer and its TPM; other is a TPM made by
	// another private CA, which the test verifiers do not trust.
	suite, other *simtest.Suite
)

func TestMain(m *testing.M) {
	suite = simtest.MustSuite()
	other = simtest.MustSuite()
	code := m.Run()
	suite.Close()
	other.Close()
	os.Exit(code)
}

var transports = []struct {
	name string
	opts []simulator.StartOption
}{
	{"unix", nil},
	{"tcp", []simulator.StartOption{simulator.WithTCP()}},
}

// node is an agent with its TPM.
type node struct {
	sw  *simulator.SWTPM
	tpm *tpm.TPM
	eks map[string]tpm.EK
}

func startNode(t testing.TB, s *simtest.Suite, opts ...simulator.StartOption) *node {
	t.Helper()
	sw := s.Start(t, opts...)
	return openNode(t, sw)
}

func openNode(t testing.TB, sw *simulator.SWTPM, opts ...tpm.Option) *node {
	t.Helper()
	tp, err := tpm.Open(context.Background(), sw.Address(), opts...)
	if err != nil {
		t.Fatalf("opening %s: %v", sw.Address(), err)
	}
	t.Cleanup(func() { tp.Close() })
	eks, err := tp.EndorsementKeys(context.Background())
	if err != nil {
		t.Fatalf("EndorsementKeys: %v", err)
	}
	n := &node{sw: sw, tpm: tp, eks: map[string]tpm.EK{}}
	for _, ek := range eks {
		n.eks[ek.Algorithm] = ek
	}
	if _, ok := n.eks[tpm.AlgRSA2048]; !ok {
		t.Fatal("swtpm has no RSA EK")
	}
	return n
}

func suiteVerifier(t testing.TB, mod func(*Config), opts ...Option) *Verifier {
	t.Helper()
	cfg := Config{EKRoots: []*x509.Certificate{suite.CA.Root()}, EKIntermediates: []*x509.Certificate{suite.CA.Intermediate()}}
	if mod != nil {
		mod(&cfg)
	}
	v, err := New(cfg, opts...)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return v
}

// run is one attestation of n with its EK alg, the way the agent runs it.
type run struct {
	ak      *tpm.AK
	session *Session
	nonce   []byte
	ev      tpm.PlatformEvidence
	key     *tpm.Key
}

// begin runs the protocol up to Activate and collects the evidence for the
// nonce, quoting the verifier's PCRs.
func begin(t testing.TB, v *Verifier, n *node, alg string) *run {
	t.Helper()
	ak, err := n.tpm.NewAK(context.Background())
	if err != nil {
		t.Fatalf("NewAK: %v", err)
	}
	return beginWithAK(t, v, n, alg, ak)
}

// beginWithAK is begin with an existing AK (agents may keep theirs).
func beginWithAK(t testing.TB, v *Verifier, n *node, alg string, ak *tpm.AK) *run {
	t.Helper()
	ctx := context.Background()
	ek := n.eks[alg]
	s, ch, err := v.Begin(ctx, ak.Identity(ek))
	if err != nil {
		t.Fatalf("Begin: %v", err)
	}
	proof, err := ak.ActivateCredential(ctx, ek, ch)
	if err != nil {
		t.Fatalf("ActivateCredential: %v", err)
	}
	nonce, err := s.Activate(ctx, proof)
	if err != nil {
		t.Fatalf("Activate: %v", err)
	}
	r := &run{ak: ak, session: s, nonce: nonce}
	r.ev, r.key = evidence(t, n, ak, nonce, v.PCRs())
	return r
}

func evidence(t testing.TB, n *node, ak *tpm.AK, nonce []byte, pcrs []int) (tpm.PlatformEvidence, *tpm.Key) {
	t.Helper()
	ctx := context.Background()
	q, vals, err := ak.Quote(ctx, nonce, tpm.PCRSelection{Alg: "sha256", PCRs: pcrs})
	if err != nil {
		t.Fatalf("Quote: %v", err)
	}
	key, ck, err := n.tpm.NewKey(ctx, ak, nonce)
	if err != nil {
		t.Fatalf("NewKey: %v", err)
	}
	t.Cleanup(func() { key.Close() })
	log, err := n.tpm.EventLog(ctx)
	if err != nil {
		t.Fatalf("EventLog: %v", err)
	}
	return tpm.PlatformEvidence{Quote: q, PCRs: vals, EventLog: log, Key: ck}, key
}

func TestSWTPMGoodNode(t *testing.T) {
	for _, tr := range transports {
		for _, alg := range []string{tpm.AlgRSA2048, tpm.AlgP384} {
			t.Run(tr.name+"/"+alg, func(t *testing.T) {
				n := startNode(t, suite, tr.opts...)
				if _, ok := n.eks[alg]; !ok {
					t.Fatalf("swtpm has no %s EK", alg)
				}
				v := suiteVerifier(t, nil)
				r := begin(t, v, n, alg)
				res, err := r.session.Finish(t.Context(), r.ev, nil)
				if err != nil {
					t.Fatalf("Finish: %v", err)
				}
				wantHash, err := n.eks[alg].Hash()
				if err != nil {
					t.Fatal(err)
				}
				if res.EKHash != wantHash || len(res.EKChain) != 3 || res.SecureBoot != nil || !res.Clock.Safe {
					t.Fatalf("result: hash %s want %s, chain %d, secure boot %v, clock %+v", res.EKHash, wantHash, len(res.EKChain), res.SecureBoot, res.Clock)
				}
				// swtpm_localca writes the TCG SAN manufacturer "id:00001014"
				// (IBM's PCI vendor ID, not in the TCG registry): kept raw.
				if res.Manufacturer != "id:00001014" {
					t.Errorf("manufacturer %q", res.Manufacturer)
				}
				sel := res.Selectors()
				for _, want := range []string{"tpm:ek_hash:" + wantHash, "tpm:manufacturer:" + res.Manufacturer, "tpm:pcr:sha256:0:" + strings.Repeat("00", 32)} {
					if !slices.Contains(sel, want) {
						t.Errorf("selector %s missing: %v", want, sel)
					}
				}
				if len(sel) != 2+8 {
					t.Errorf("%d selectors: %v", len(sel), sel)
				}
				// The certified key is the agent's TPM-resident signer.
				digest := sha256.Sum256([]byte("hello"))
				sig, err := r.key.Sign(rand.Reader, digest[:], crypto.SHA256)
				if err != nil {
					t.Fatalf("signing with the agent key: %v", err)
				}
				if !ecdsa.VerifyASN1(res.AgentKey.(*ecdsa.PublicKey), digest[:], sig) {
					t.Fatal("agent key's signature does not verify with Result.AgentKey")
				}
			})
		}
	}
}

func TestSWTPMEKTrust(t *testing.T) {
	ctx := context.Background()
	foreign := startNode(t, other)
	local := startNode(t, suite)
	localHash, _ := local.eks[tpm.AlgRSA2048].Hash()
	dir := t.TempDir()
	listed := filepath.Join(dir, "allow")
	if err := os.WriteFile(listed, []byte("# the local TPM only\n"+localHash+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	noCert := func(n *node) tpm.Identity {
		ak, err := n.tpm.NewAK(ctx)
		if err != nil {
			t.Fatal(err)
		}
		id := ak.Identity(n.eks[tpm.AlgRSA2048])
		id.EKCertificate, id.EKIntermediates = nil, nil
		return id
	}
	withCert := func(n *node) tpm.Identity {
		ak, err := n.tpm.NewAK(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return ak.Identity(n.eks[tpm.AlgRSA2048])
	}
	allowOnly := func(path string) func(*Config) {
		return func(c *Config) { c.EKRoots, c.EKIntermediates, c.AllowList = nil, nil, FileAllowList(path) }
	}
	tests := []struct {
		name string
		cfg  func(*Config)
		id   func() tpm.Identity
		want error
	}{
		{"certificate from another private CA", nil, func() tpm.Identity { return withCert(foreign) }, ErrEKUntrusted},
		{"without the intermediate", func(c *Config) { c.EKIntermediates = nil }, func() tpm.Identity {
			id := withCert(local)
			id.EKIntermediates = nil
			return id
		}, ErrEKUntrusted},
		{"required certificate missing", func(c *Config) { c.RequireEKCertificate = true }, func() tpm.Identity { return noCert(local) }, ErrEKUntrusted},
		{"not allow-listed", allowOnly(listed), func() tpm.Identity { return noCert(foreign) }, ErrEKNotAllowed},
		{"foreign certificate, not allow-listed", func(c *Config) { c.AllowList = FileAllowList(listed) }, func() tpm.Identity { return withCert(foreign) }, ErrEKNotAllowed},
		{"allow-list file missing", allowOnly(filepath.Join(dir, "missing")), func() tpm.Identity { return noCert(local) }, ErrEKNotAllowed},
		{"allow-list path under a regular file", allowOnly(filepath.Join(listed, "x")), func() tpm.Identity { return noCert(local) }, ErrEKNotAllowed},
		{"certificate of the other EK", nil, func() tpm.Identity {
			id := withCert(local)
			id.EKCertificate = local.eks[tpm.AlgP384].Certificate
			return id
		}, ErrEKMismatch},
		{"allow-listed", allowOnly(listed), func() tpm.Identity { return noCert(local) }, nil},
		{"chained, certificate required", func(c *Config) { c.RequireEKCertificate = true }, func() tpm.Identity { return withCert(local) }, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := suiteVerifier(t, tt.cfg)
			_, _, err := v.Begin(ctx, tt.id())
			t.Logf("Begin: %v", err)
			if tt.want == nil {
				if err != nil {
					t.Fatalf("Begin: %v", err)
				}
				return
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("Begin error %v, want %v", err, tt.want)
			}
		})
	}
}

// An identity with TPM A's EK and TPM B's AK passes Begin (both are
// genuine) but cannot be activated: the credential is for A's EK and B's AK
// name, and no single TPM holds both.
func TestSWTPMAKOfAnotherTPM(t *testing.T) {
	ctx := context.Background()
	a := startNode(t, suite)
	b := startNode(t, other)
	akB, err := b.tpm.NewAK(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v := suiteVerifier(t, nil)
	s, ch, err := v.Begin(ctx, akB.Identity(a.eks[tpm.AlgRSA2048]))
	if err != nil {
		t.Fatalf("Begin: %v", err)
	}
	proof, err := akB.ActivateCredential(ctx, a.eks[tpm.AlgRSA2048], ch)
	t.Logf("TPM B activating for A's EK: %v", err)
	if err == nil {
		if _, err := s.Activate(ctx, proof); !errors.Is(err, ErrActivation) {
			t.Fatalf("Activate: %v, want ErrActivation", err)
		}
		return
	}
	// Whatever the agent sends instead is refused.
	if _, err := s.Activate(ctx, tpm.ActivationProof{Secret: make([]byte, 32)}); !errors.Is(err, ErrActivation) {
		t.Fatalf("Activate: %v, want ErrActivation", err)
	}
}

func TestSWTPMNonce(t *testing.T) {
	ctx := context.Background()
	n := startNode(t, suite)
	clock := &fakeClock{now: time.Now()}
	v := suiteVerifier(t, nil, WithClock(clock.Now))

	t.Run("finish twice", func(t *testing.T) {
		r := begin(t, v, n, tpm.AlgRSA2048)
		if _, err := r.session.Finish(ctx, r.ev, nil); err != nil {
			t.Fatalf("first Finish: %v", err)
		}
		if _, err := r.session.Finish(ctx, r.ev, nil); !errors.Is(err, ErrNonce) {
			t.Fatalf("second Finish: %v, want ErrNonce", err)
		}
	})
	t.Run("evidence of another session", func(t *testing.T) {
		r1 := begin(t, v, n, tpm.AlgRSA2048)
		if _, err := r1.session.Finish(ctx, r1.ev, nil); err != nil {
			t.Fatal(err)
		}
		// Same AK, so the old quote's signature is still good: only the
		// nonce can refuse it.
		r2 := beginWithAK(t, v, n, tpm.AlgRSA2048, r1.ak)
		ev := r1.ev
		ev.Key = r2.ev.Key
		if _, err := r2.session.Finish(ctx, ev, nil); !errors.Is(err, ErrNonce) {
			t.Fatalf("replayed quote: %v, want ErrNonce", err)
		}
	})
	t.Run("expired", func(t *testing.T) {
		r := begin(t, v, n, tpm.AlgRSA2048)
		clock.Advance(DefaultNonceTTL + time.Second)
		if _, err := r.session.Finish(ctx, r.ev, nil); !errors.Is(err, ErrNonce) {
			t.Fatalf("Finish after the TTL: %v, want ErrNonce", err)
		}
	})
}

func TestSWTPMTamperedEvidence(t *testing.T) {
	n := startNode(t, suite, simulator.WithTCP())
	v := suiteVerifier(t, nil)
	flip := func(b []byte, i int) []byte {
		b = slices.Clone(b)
		if i < 0 {
			i += len(b)
		}
		b[i] ^= 0x80
		return b
	}
	tests := []struct {
		name string
		mod  func(t *testing.T, r *run)
		want error
	}{
		{"flipped byte in quote", func(t *testing.T, r *run) { r.ev.Quote.Attest = flip(r.ev.Quote.Attest, 30) }, ErrQuote},
		{"flipped last byte of quote", func(t *testing.T, r *run) { r.ev.Quote.Attest = flip(r.ev.Quote.Attest, -1) }, ErrQuote},
		{"flipped byte in signature", func(t *testing.T, r *run) { r.ev.Quote.Signature = flip(r.ev.Quote.Signature, -1) }, ErrQuote},
		{"tampered PCR value", func(t *testing.T, r *run) { r.ev.PCRs[2].Digest = flip(r.ev.PCRs[2].Digest, 0) }, ErrPCRValues},
		{"extra PCR not quoted", func(t *testing.T, r *run) {
			r.ev.PCRs = append(r.ev.PCRs, tpm.PCR{Index: 16, Alg: "sha256", Digest: make([]byte, 32)})
		}, ErrPCRValues},
		{"wrong PCR selection", func(t *testing.T, r *run) {
			q, vals, err := r.ak.Quote(context.Background(), r.nonce, tpm.PCRSelection{Alg: "sha256", PCRs: []int{0, 1, 2, 3, 4, 5, 6}})
			if err != nil {
				t.Fatal(err)
			}
			r.ev.Quote, r.ev.PCRs = q, vals
		}, ErrPCRSelection},
		{"quote over another nonce", func(t *testing.T, r *run) {
			q, vals, err := r.ak.Quote(context.Background(), bytes.Repeat([]byte{1}, 32), tpm.PCRSelection{})
			if err != nil {
				t.Fatal(err)
			}
			r.ev.Quote, r.ev.PCRs = q, vals
		}, ErrNonce},
		{"key certified by another AK", func(t *testing.T, r *run) {
			ak2, err := n.tpm.NewAK(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			k, ck, err := n.tpm.NewKey(context.Background(), ak2, r.nonce)
			if err != nil {
				t.Fatal(err)
			}
			k.Close()
			r.ev.Key = ck
		}, ErrKeyCertification},
		{"key certified with the wrong nonce", func(t *testing.T, r *run) {
			k, ck, err := n.tpm.NewKey(context.Background(), r.ak, bytes.Repeat([]byte{2}, 32))
			if err != nil {
				t.Fatal(err)
			}
			k.Close()
			r.ev.Key = ck
		}, ErrKeyCertification},
		{"certification of another key", func(t *testing.T, r *run) {
			k, ck, err := n.tpm.NewKey(context.Background(), r.ak, r.nonce)
			if err != nil {
				t.Fatal(err)
			}
			k.Close()
			r.ev.Key.Public = ck.Public
		}, ErrKeyCertification},
		{"quote signed by another AK", func(t *testing.T, r *run) {
			ak2, err := n.tpm.NewAK(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			q, vals, err := ak2.Quote(context.Background(), r.nonce, tpm.PCRSelection{})
			if err != nil {
				t.Fatal(err)
			}
			r.ev.Quote, r.ev.PCRs = q, vals
		}, ErrQuote},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := begin(t, v, n, tpm.AlgRSA2048)
			tt.mod(t, r)
			res, err := r.session.Finish(context.Background(), r.ev, nil)
			t.Logf("Finish: %v", err)
			if !errors.Is(err, tt.want) || res != nil {
				t.Fatalf("Finish error %v, want %v", err, tt.want)
			}
		})
	}
}

func TestSWTPMGarbage(t *testing.T) {
	n := startNode(t, suite)
	v := suiteVerifier(t, nil)
	ctx := context.Background()
	junk := []byte{0xff, 0x00, 0x13, 0x37}
	ak, err := n.tpm.NewAK(ctx)
	if err != nil {
		t.Fatal(err)
	}
	good := ak.Identity(n.eks[tpm.AlgRSA2048])
	idCases := map[string]func(*tpm.Identity){
		"EKPublic":          func(id *tpm.Identity) { id.EKPublic = junk },
		"EKCertificate":     func(id *tpm.Identity) { id.EKCertificate = junk },
		"EKIntermediates":   func(id *tpm.Identity) { id.EKIntermediates = [][]byte{junk} },
		"AK.Public":         func(id *tpm.Identity) { id.AK.Public = junk },
		"AK.CreateData":     func(id *tpm.Identity) { id.AK.CreateData = nil },
		"AK.CreateAttest":   func(id *tpm.Identity) { id.AK.CreateAttestation = nil },
		"AK.CreateSignatur": func(id *tpm.Identity) { id.AK.CreateSignature = nil },
	}
	for name, mod := range idCases {
		t.Run("identity/"+name, func(t *testing.T) {
			id := good
			mod(&id)
			if _, _, err := v.Begin(ctx, id); !errors.Is(err, ErrMalformed) {
				t.Fatalf("Begin: %v, want ErrMalformed", err)
			}
		})
	}
	evCases := map[string]func(*tpm.PlatformEvidence){
		"Quote.Attest":      func(ev *tpm.PlatformEvidence) { ev.Quote.Attest = nil },
		"Quote.Signature":   func(ev *tpm.PlatformEvidence) { ev.Quote.Signature = junk },
		"Key.Public":        func(ev *tpm.PlatformEvidence) { ev.Key.Public = junk },
		"Key.CertifyInfo":   func(ev *tpm.PlatformEvidence) { ev.Key.CertifyInfo = nil },
		"Key.Signature":     func(ev *tpm.PlatformEvidence) { ev.Key.Signature = junk },
		"PCRs.count":        func(ev *tpm.PlatformEvidence) { ev.PCRs = make([]tpm.PCR, 1000) },
		"Key.Public.length": func(ev *tpm.PlatformEvidence) { ev.Key.Public = make([]byte, 1<<20) },
	}
	for name, mod := range evCases {
		t.Run("evidence/"+name, func(t *testing.T) {
			r := begin(t, v, n, tpm.AlgRSA2048)
			mod(&r.ev)
			if _, err := r.session.Finish(ctx, r.ev, nil); !errors.Is(err, ErrMalformed) {
				t.Fatalf("Finish: %v, want ErrMalformed", err)
			}
		})
	}
	t.Run("evidence/EventLog", func(t *testing.T) {
		r := begin(t, v, n, tpm.AlgRSA2048)
		r.ev.EventLog = junk
		if _, err := r.session.Finish(ctx, r.ev, nil); !errors.Is(err, ErrEventLog) {
			t.Fatalf("Finish: %v, want ErrEventLog", err)
		}
	})
}
