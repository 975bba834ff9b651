package verifier

// Tests against real software TPMs (swtpm), through the agent side of package
// tpm: the evidence is exactly what a TPM produces. They never skip: without
// swtpm, TestMain fails the binary.

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"os"
	"slices"
	"strings"
	"testing"


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
	ctx := context.Background()
	ek := n.eks[alg]
	ak, err := n.tpm.NewAK(ctx)
	if err != nil {
		t.Fatalf("NewAK: %v", err)
	}
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
