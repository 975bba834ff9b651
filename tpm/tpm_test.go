package tpm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/tpm2"

	"github.com/ironroot/ironroot/simulator"
	"github.com/ironroot/ironroot/simulator/simtest"
)

var suite *simtest.Suite

func TestMain(m *testing.M) {
	suite = simtest.MustSuite()
	code := m.Run()
	suite.Close()
	os.Exit(code)
}

// transports are the two ways tests reach swtpm.
var transports = []struct {
	name string
	opts []simulator.StartOption
}{
	{"unix", nil},
	{"tcp", []simulator.StartOption{simulator.WithTCP()}},
}

func openTPM(t testing.TB, s *simulator.SWTPM, opts ...Option) *TPM {
	t.Helper()
	tp, err := Open(context.Background(), s.Address(), opts...)
	if err != nil {
		t.Fatalf("Open(%s): %v", s.Address(), err)
	}
	t.Cleanup(func() { tp.Close() })
	return tp
}

func startAndOpen(t testing.TB, opts ...simulator.StartOption) (*simulator.SWTPM, *TPM) {
	t.Helper()
	s := suite.Start(t, opts...)
	return s, openTPM(t, s)
}

func eksByAlg(t testing.TB, tp *TPM) map[string]EK {
	t.Helper()
	eks, err := tp.EndorsementKeys(context.Background())
	if err != nil {
		t.Fatalf("EndorsementKeys: %v", err)
	}
	m := map[string]EK{}
	for _, ek := range eks {
		m[ek.Algorithm] = ek
	}
	return m
}

func newAK(t testing.TB, tp *TPM) *AK {
	t.Helper()
	ak, err := tp.NewAK(context.Background())
	if err != nil {
		t.Fatalf("NewAK: %v", err)
	}
	return ak
}

func nonce(t testing.TB) []byte {
	t.Helper()
	n := make([]byte, 32)
	if _, err := rand.Read(n); err != nil {
		t.Fatal(err)
	}
	return n
}

// challenge makes a credential for the AK's evidence the way the server
// does: name from the AK public area, secret encapsulated to the EK.
func challenge(t testing.TB, ek EK, akPublic []byte, secret []byte) CredentialChallenge {
	t.Helper()
	ekPub, err := tpm2.Unmarshal[tpm2.TPMTPublic](ek.PublicArea)
	if err != nil {
		t.Fatal(err)
	}
	kem, err := tpm2.ImportEncapsulationKey(ekPub)
	if err != nil {
		t.Fatalf("ImportEncapsulationKey: %v", err)
	}
	akPub, err := tpm2.Unmarshal[tpm2.TPMTPublic](akPublic)
	if err != nil {
		t.Fatal(err)
	}
	name, err := tpm2.ObjectName(akPub)
	if err != nil {
		t.Fatal(err)
	}
	cred, sec, err := tpm2.CreateCredential(rand.Reader, kem, name.Buffer, secret)
	if err != nil {
		t.Fatalf("CreateCredential: %v", err)
	}
	return CredentialChallenge{Credential: cred, Secret: sec}
}

func TestParseAddress(t *testing.T) {
	tests := []struct {
		in, network, addr, err string
	}{
		{in: "/dev/tpmrm0", network: "device", addr: "/dev/tpmrm0"},
		{in: "unix:///run/swtpm.sock", network: "unix", addr: "/run/swtpm.sock"},
		{in: "tcp://127.0.0.1:2321", network: "tcp", addr: "127.0.0.1:2321"},
		{in: "", err: "empty TPM address"},
		{in: "tpmrm0", err: "unsupported scheme"},
		{in: "unix://", err: "want unix:///absolute/path"},
		{in: "unix://relative/path", err: "want unix:///absolute/path"},
		{in: "tcp://127.0.0.1", err: "want tcp://host:port"},
		{in: "tcp://:2321", err: "want tcp://host:port"},
		{in: "http://x:1", err: "unsupported scheme"},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			n, a, err := parseAddress(tc.in)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("parseAddress(%q) error = %v, want %q", tc.in, err, tc.err)
				}
				return
			}
			if err != nil || n != tc.network || a != tc.addr {
				t.Fatalf("parseAddress(%q) = %q, %q, %v; want %q, %q", tc.in, n, a, err, tc.network, tc.addr)
			}
		})
	}
}

func TestOpenErrors(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name, addr, want string
	}{
		{"missing device", "/dev/does-not-exist-tpm", "opening TPM device"},
		{"not a device", "/etc/hostname", "not a device"},
		{"no listener", "unix://" + filepath.Join(t.TempDir(), "none.sock"), "connecting to TPM"},
		{"bad scheme", "ftp://x", "unsupported scheme"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tp, err := Open(ctx, tc.addr)
			if err == nil {
				tp.Close()
				t.Fatal("Open succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error = %v, want %q", err, tc.want)
			}
		})
	}
}

func TestInfo(t *testing.T) {
	_, tp := startAndOpen(t)
	info, err := tp.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.Manufacturer != "IBM" || info.ManufacturerID != 0x49424d00 {
		t.Errorf("manufacturer = %q (0x%x), want IBM", info.Manufacturer, info.ManufacturerID)
	}
	if !strings.Contains(info.VendorInfo, "SW") {
		t.Errorf("vendor info = %q", info.VendorInfo)
	}
}

func verifyEKCert(cert *x509.Certificate, root, inter *x509.Certificate) error {
	var unhandled []asn1.ObjectIdentifier
	for _, oid := range cert.UnhandledCriticalExtensions {
		if !oid.Equal(asn1.ObjectIdentifier{2, 5, 29, 17}) {
			unhandled = append(unhandled, oid)
		}
	}
	cert.UnhandledCriticalExtensions = unhandled
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(root)
	inters.AddCert(inter)
	_, err := cert.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err
}

func TestEndorsementKeys(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			_, tp := startAndOpen(t, tr.opts...)
			eks := eksByAlg(t, tp)
			want := map[string]uint32{AlgRSA2048: ekHandleRSA2048, AlgP384: ekHandleP384}
			if len(eks) != len(want) {
				t.Errorf("got EKs %v, want %v", keys(eks), want)
			}
			for alg, handle := range want {
				ek, ok := eks[alg]
				if !ok {
					t.Errorf("no %s EK", alg)
					continue
				}
				if ek.Handle != handle {
					t.Errorf("%s handle = 0x%x, want 0x%x", alg, ek.Handle, handle)
				}
				cert, err := x509.ParseCertificate(ek.Certificate)
				if err != nil {
					t.Fatalf("%s certificate: %v", alg, err)
				}
				if !cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(ek.Public) {
					t.Errorf("%s certificate key differs from the EK", alg)
				}
				if err := verifyEKCert(cert, suite.CA.Root(), suite.CA.Intermediate()); err != nil {
					t.Errorf("%s certificate does not chain to the manufacturer: %v", alg, err)
				}
				if len(ek.Intermediates) != 0 {
					t.Errorf("%s: swtpm stores no intermediates, got %d", alg, len(ek.Intermediates))
				}
				h, err := ek.Hash()
				if err != nil || len(h) != 64 {
					t.Errorf("%s Hash() = %q, %v", alg, h, err)
				}
				pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](ek.PublicArea)
				if err != nil {
					t.Fatalf("%s public area: %v", alg, err)
				}
				if k, _ := tpm2.Pub(*pub); !ek.Public.(interface{ Equal(crypto.PublicKey) bool }).Equal(k) {
					t.Errorf("%s public area and public key differ", alg)
				}
			}
		})
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestAKParameters(t *testing.T) {
	_, tp := startAndOpen(t)
	ak := newAK(t, tp)
	params := ak.AttestationParameters()
	ap := attest.ActivationParameters{
		EK: eksByAlg(t, tp)[AlgRSA2048].Public,
		AK: attest.AttestationParameters{
			Public:            params.Public,
			CreateData:        params.CreateData,
			CreateAttestation: params.CreateAttestation,
			CreateSignature:   params.CreateSignature,
		},
	}
	if err := ap.CheckAKParameters(); err != nil {
		t.Fatalf("CheckAKParameters: %v", err)
	}
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](params.Public)
	if err != nil {
		t.Fatal(err)
	}
	if a := pub.ObjectAttributes; !a.SignEncrypt || !a.Restricted || !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin || a.Decrypt {
		t.Errorf("AK attributes = %+v", a)
	}
	name, _ := tpm2.ObjectName(pub)
	if !bytes.Equal(name.Buffer, ak.Name()) {
		t.Error("AK Name() differs from the name of its public area")
	}
	// Tampered evidence must fail the same check.
	bad := ap
	bad.AK.CreateData = append([]byte(nil), params.CreateData...)
	bad.AK.CreateData[len(bad.AK.CreateData)-1] ^= 1
	if err := bad.CheckAKParameters(); err == nil {
		t.Error("CheckAKParameters accepted tampered creation data")
	}
	id := ak.Identity(eksByAlg(t, tp)[AlgP384])
	if !bytes.Equal(id.AK.Public, params.Public) || len(id.EKCertificate) == 0 || len(id.EKPublic) == 0 {
		t.Errorf("Identity incomplete: %+v", id)
	}
}

func TestActivateCredential(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			ctx := context.Background()
			_, tp := startAndOpen(t, tr.opts...)
			ak := newAK(t, tp)
			other := newAK(t, tp)
			for alg, ek := range eksByAlg(t, tp) {
				t.Run(alg, func(t *testing.T) {
					secret := nonce(t)
					proof, err := ak.ActivateCredential(ctx, ek, challenge(t, ek, ak.AttestationParameters().Public, secret))
					if err != nil {
						t.Fatalf("ActivateCredential: %v", err)
					}
					if !bytes.Equal(proof.Secret, secret) {
						t.Fatal("recovered secret differs")
					}
					// A challenge bound to another AK's name does not open.
					if _, err := ak.ActivateCredential(ctx, ek, challenge(t, ek, other.AttestationParameters().Public, secret)); err == nil {
						t.Error("activated a credential bound to another AK")
					}
				})
			}
			if _, err := ak.ActivateCredential(ctx, eksByAlg(t, tp)[AlgRSA2048], CredentialChallenge{}); err == nil {
				t.Error("empty challenge accepted")
			}
			assertNoTransients(t, tp)
		})
	}
}

func TestQuote(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			ctx := context.Background()
			_, tp := startAndOpen(t, tr.opts...)
			ak := newAK(t, tp)
			akPub, err := attest.ParseAKPublic(ak.AttestationParameters().Public)
			if err != nil {
				t.Fatalf("ParseAKPublic: %v", err)
			}
			extendPCR(t, tp, 7, []byte("secure boot policy"))
			tests := []struct {
				name string
				sel  PCRSelection
				want []int
			}{
				{"default", PCRSelection{}, []int{0, 1, 2, 3, 4, 5, 6, 7}},
				{"sha256 sparse", PCRSelection{Alg: "sha256", PCRs: []int{16, 7, 0, 7}}, []int{0, 7, 16}},
				{"all 24", PCRSelection{Alg: "sha256", PCRs: seq(24)}, seq(24)},
			}
			for _, tc := range tests {
				t.Run(tc.name, func(t *testing.T) {
					n := nonce(t)
					q, pcrs, err := ak.Quote(ctx, n, tc.sel)
					if err != nil {
						t.Fatalf("Quote: %v", err)
					}
					var got []int
					var apcrs []attest.PCR
					for _, p := range pcrs {
						got = append(got, p.Index)
						if p.Alg != "sha256" || len(p.Digest) != 32 {
							t.Errorf("PCR %d: alg %q, %d bytes", p.Index, p.Alg, len(p.Digest))
						}
						apcrs = append(apcrs, attest.PCR{Index: p.Index, Digest: p.Digest, DigestAlg: crypto.SHA256})
					}
					if !equalInts(got, tc.want) {
						t.Errorf("PCRs %v, want %v", got, tc.want)
					}
					if err := akPub.Verify(attest.Quote{Quote: q.Attest, Signature: q.Signature}, apcrs, n); err != nil {
						t.Errorf("quote does not verify: %v", err)
					}
					attestData, err := tpm2.Unmarshal[tpm2.TPMSAttest](q.Attest)
					if err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(attestData.ExtraData.Buffer, n) || attestData.Type != tpm2.TPMSTAttestQuote {
						t.Error("nonce not in extraData, or not a quote")
					}
					if err := akPub.Verify(attest.Quote{Quote: q.Attest, Signature: q.Signature}, apcrs, nonce(t)); err == nil {
						t.Error("quote verified against another nonce")
					}
				})
			}
			pcrs, err := tp.ReadPCRs(ctx, PCRSelection{PCRs: []int{7}})
			if err != nil || len(pcrs) != 1 || bytes.Equal(pcrs[0].Digest, make([]byte, 32)) {
				t.Errorf("PCR 7 after extend = %v, %v", pcrs, err)
			}
			for _, bad := range []struct {
				nonce []byte
				sel   PCRSelection
			}{
				{nil, PCRSelection{}},
				{make([]byte, 65), PCRSelection{}},
				{nonce(t), PCRSelection{Alg: "md5"}},
				{nonce(t), PCRSelection{PCRs: []int{24}}},
				{nonce(t), PCRSelection{PCRs: []int{-1}}},
				{nonce(t), PCRSelection{Alg: "sha1"}}, // bank not active on this TPM
			} {
				if _, _, err := ak.Quote(ctx, bad.nonce, bad.sel); err == nil {
					t.Errorf("Quote(%d-byte nonce, %+v) succeeded", len(bad.nonce), bad.sel)
				}
			}
			assertNoTransients(t, tp)
		})
	}
}

func seq(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// extendPCR extends a sha256 PCR through the same connection, as firmware
// or IMA would.
func extendPCR(t testing.TB, tp *TPM, index int, data []byte) {
	t.Helper()
	sum := sha256.Sum256(data)
	err := tp.do(context.Background(), func() error {
		_, err := tpm2.PCRExtend{
			PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(index), Auth: tpm2.PasswordAuth(nil)},
			Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{
				{HashAlg: tpm2.TPMAlgSHA256, Digest: sum[:]},
			}},
		}.Execute(tp.conn)
		return err
	})
	if err != nil {
		t.Fatalf("extending PCR %d: %v", index, err)
	}
}

func assertNoTransients(t testing.TB, tp *TPM) {
	t.Helper()
	hs, err := tp.transientHandles(context.Background())
	if err != nil {
		t.Fatalf("listing transient handles: %v", err)
	}
	if len(hs) != 0 {
		t.Errorf("%d transient handles left loaded: %v", len(hs), hs)
	}
}

func verifyCertifiedKey(t testing.TB, ak *AK, ck CertifiedKey, n []byte, key crypto.PublicKey) {
	t.Helper()
	info, err := tpm2.Unmarshal[tpm2.TPMSAttest](ck.CertifyInfo)
	if err != nil {
		t.Fatalf("decoding CertifyInfo: %v", err)
	}
	if info.Magic != tpm2.TPMGeneratedValue || info.Type != tpm2.TPMSTAttestCertify {
		t.Errorf("CertifyInfo magic 0x%x type 0x%x", info.Magic, info.Type)
	}
	if !bytes.Equal(info.ExtraData.Buffer, n) {
		t.Error("CertifyInfo does not carry the nonce")
	}
	cert, err := info.Attested.Certify()
	if err != nil {
		t.Fatal(err)
	}
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](ck.Public)
	if err != nil {
		t.Fatal(err)
	}
	name, _ := tpm2.ObjectName(pub)
	if !bytes.Equal(cert.Name.Buffer, name.Buffer) {
		t.Error("certified name is not the key's")
	}
	if k, _ := tpm2.Pub(*pub); !key.(*ecdsa.PublicKey).Equal(k) {
		t.Error("certified public area is not the Key's")
	}
	sig, err := tpm2.Unmarshal[tpm2.TPMTSignature](ck.Signature)
	if err != nil {
		t.Fatal(err)
	}
	ec, err := sig.Signature.ECDSA()
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256(ck.CertifyInfo)
	r, s := new(big.Int).SetBytes(ec.SignatureR.Buffer), new(big.Int).SetBytes(ec.SignatureS.Buffer)
	if !ecdsa.Verify(ak.Public().(*ecdsa.PublicKey), digest[:], r, s) {
		t.Error("certification signature does not verify with the AK")
	}
}

func TestNewKey(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			ctx := context.Background()
			_, tp := startAndOpen(t, tr.opts...)
			ak := newAK(t, tp)
			n := nonce(t)
			key, ck, err := tp.NewKey(ctx, ak, n)
			if err != nil {
				t.Fatalf("NewKey: %v", err)
			}
			verifyCertifiedKey(t, ak, ck, n, key.Public())
			pub, _ := tpm2.Unmarshal[tpm2.TPMTPublic](ck.Public)
			if a := pub.ObjectAttributes; a.Restricted || !a.SignEncrypt || !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin {
				t.Errorf("key attributes = %+v", a)
			}
			assertSigns(t, key)
			for _, bad := range [][]byte{nil, make([]byte, 65)} {
				if _, _, err := tp.NewKey(ctx, ak, bad); err == nil {
					t.Errorf("NewKey with %d-byte nonce succeeded", len(bad))
				}
			}
			assertNoTransients(t, tp)
		})
	}
}

func assertSigns(t *testing.T, key *Key) {
	t.Helper()
	msg := []byte("hello, workload")
	s256 := sha256.Sum256(msg)
	s384 := sha512.Sum384(msg)
	tests := []struct {
		name    string
		digest  []byte
		opts    crypto.SignerOpts
		wantErr bool
	}{
		{"sha256", s256[:], crypto.SHA256, false},
		{"sha384", s384[:], crypto.SHA384, false},
		{"sha256 digest as sha384", s256[:], crypto.SHA384, true},
		{"unhashed", msg, crypto.Hash(0), true},
		{"sha1", make([]byte, 20), crypto.SHA1, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sig, err := key.Sign(rand.Reader, tc.digest, tc.opts)
			if tc.wantErr {
				if err == nil {
					t.Fatal("Sign succeeded")
				}
				return
			}
			if err != nil {
				t.Fatalf("Sign: %v", err)
			}
			if !ecdsa.VerifyASN1(key.Public().(*ecdsa.PublicKey), tc.digest, sig) {
				t.Fatal("signature does not verify")
			}
		})
	}
}

func TestKeySurvivesRestartAndReboot(t *testing.T) {
	ctx := context.Background()
	state := simtest.Clone(t, suite.State)
	s1 := simtest.StartTPM(t, state)
	tp1 := openTPM(t, s1)
	ak := newAK(t, tp1)
	key, _, err := tp1.NewKey(ctx, ak, nonce(t))
	if err != nil {
		t.Fatal(err)
	}
	blob := key.Marshal()
	if !bytes.HasPrefix(blob, []byte(keyBlobMagic)) {
		t.Fatal("blob lacks its format header")
	}

	// A clean reboot invalidates saved contexts: the key reloads itself
	// from its blob.
	if err := s1.Reboot(ctx); err != nil {
		t.Fatal(err)
	}
	assertSigns(t, key)
	if err := s1.PowerLoss(ctx); err != nil {
		t.Fatal(err)
	}
	assertSigns(t, key)

	// Stop swtpm, start it again on the same state: a new process, a new
	// TPM handle in the agent.
	if err := s1.Stop(); err != nil {
		t.Fatal(err)
	}
	s2 := simtest.StartTPM(t, state, simulator.WithTCP())
	tp2 := openTPM(t, s2)
	loaded, err := tp2.LoadKey(ctx, blob)
	if err != nil {
		t.Fatalf("LoadKey: %v", err)
	}
	if !loaded.Public().(*ecdsa.PublicKey).Equal(key.Public()) {
		t.Fatal("reloaded key has another public key")
	}
	assertSigns(t, loaded)
	assertNoTransients(t, tp2)

	// The blob does not load on another TPM (another manufacturer).
	other := simtest.StartTPM(t, simtest.Manufacture(t, simtest.NewCA(t)))
	if _, err := openTPM(t, other).LoadKey(ctx, blob); err == nil {
		t.Error("key blob loaded on another TPM")
	}
	if err := loaded.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := loaded.Sign(rand.Reader, make([]byte, 32), crypto.SHA256); err == nil {
		t.Error("closed key signed")
	}
}

func TestFullFlowLeavesNoHandles(t *testing.T) {
	ctx := context.Background()
	_, tp := startAndOpen(t)
	for i := 0; i < 3; i++ { // repeated, as re-attestation does
		eks := eksByAlg(t, tp)
		ak := newAK(t, tp)
		ek := eks[AlgP384]
		secret := nonce(t)
		if _, err := ak.ActivateCredential(ctx, ek, challenge(t, ek, ak.AttestationParameters().Public, secret)); err != nil {
			t.Fatal(err)
		}
		n := nonce(t)
		ev, key, err := ak.Attest(ctx, n, PCRSelection{})
		if err != nil {
			t.Fatalf("Attest: %v", err)
		}
		if len(ev.Quote.Attest) == 0 || len(ev.PCRs) != 8 || ev.EventLog != nil {
			t.Errorf("evidence incomplete: %d-byte quote, %d PCRs, %d-byte log", len(ev.Quote.Attest), len(ev.PCRs), len(ev.EventLog))
		}
		verifyCertifiedKey(t, ak, ev.Key, n, key.Public())
		if _, err := key.Sign(nil, make([]byte, 32), crypto.SHA256); err != nil {
			t.Fatal(err)
		}
		ak.Close()
		if _, _, err := ak.Quote(ctx, nonce(t), PCRSelection{}); err == nil {
			t.Error("closed AK quoted")
		}
		assertNoTransients(t, tp)
	}
}

// trickleConn returns at most one byte per Read, as a congested socket may.
type trickleConn struct{ net.Conn }

func (c trickleConn) Read(p []byte) (int, error) {
	if len(p) > 1 {
		p = p[:1]
	}
	return c.Conn.Read(p)
}

func TestPartialReads(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			ctx := context.Background()
			s := suite.Start(t, tr.opts...)
			reads := 0
			var mu sync.Mutex
			dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
				var d net.Dialer
				c, err := d.DialContext(ctx, network, addr)
				if err != nil {
					return nil, err
				}
				mu.Lock()
				reads++
				mu.Unlock()
				return trickleConn{c}, nil
			}
			tp := openTPM(t, s, withDialer(dial))
			eks := eksByAlg(t, tp)
			if len(eks[AlgRSA2048].Certificate) < 500 {
				t.Fatal("RSA EK certificate not read whole")
			}
			ak := newAK(t, tp)
			q, pcrs, err := ak.Quote(ctx, nonce(t), PCRSelection{})
			if err != nil || len(q.Attest) == 0 || len(pcrs) != 8 {
				t.Fatalf("Quote over a trickling connection: %v", err)
			}
			if reads == 0 {
				t.Fatal("custom dialer not used")
			}
		})
	}
}

// flakyDialer hands out a connection that is already closed first, then
// real ones: the transport must reconnect once and re-send.
func TestReconnectOnce(t *testing.T) {
	s := suite.Start(t)
	first := true
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err == nil && first {
			first = false
			c.Close()
		}
		return c, err
	}
	tp := openTPM(t, s, withDialer(dial))
	if _, err := tp.Info(context.Background()); err != nil {
		t.Fatalf("Info after a broken connection: %v", err)
	}
	if first {
		t.Fatal("broken connection never handed out")
	}
}

func TestConcurrentSign(t *testing.T) {
	ctx := context.Background()
	_, tp := startAndOpen(t)
	ak := newAK(t, tp)
	key, _, err := tp.NewKey(ctx, ak, nonce(t))
	if err != nil {
		t.Fatal(err)
	}
	const workers, each = 16, 4
	var wg sync.WaitGroup
	errs := make(chan error, workers*each)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < each; i++ {
				d := sha256.Sum256([]byte{byte(w), byte(i)})
				sig, err := key.Sign(rand.Reader, d[:], crypto.SHA256)
				if err != nil {
					errs <- err
					continue
				}
				if !ecdsa.VerifyASN1(key.Public().(*ecdsa.PublicKey), d[:], sig) {
					errs <- errors.New("signature does not verify")
				}
			}
		}(w)
	}
	// Quotes interleave with signatures on the same TPM.
	for i := 0; i < 4; i++ {
		if _, _, err := ak.Quote(ctx, nonce(t), PCRSelection{}); err != nil {
			t.Errorf("concurrent Quote: %v", err)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	assertNoTransients(t, tp)
}

func TestEventLog(t *testing.T) {
	ctx := context.Background()
	s := suite.Start(t)
	logFile := filepath.Join(t.TempDir(), "binary_bios_measurements")
	if err := os.WriteFile(logFile, []byte{1, 2, 3}, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		opts []Option
		want []byte
	}{
		{"socket default: none", nil, nil},
		{"configured", []Option{WithEventLogPath(logFile)}, []byte{1, 2, 3}},
		{"configured but absent", []Option{WithEventLogPath(filepath.Join(t.TempDir(), "none"))}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tp := openTPM(t, s, tc.opts...)
			got, err := tp.EventLog(ctx)
			if err != nil || !bytes.Equal(got, tc.want) {
				t.Errorf("EventLog() = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
	if _, err := openTPM(t, s, WithEventLogPath(t.TempDir())).EventLog(ctx); err == nil {
		t.Error("reading a directory as the event log succeeded")
	}
}

func TestClosedTPM(t *testing.T) {
	_, tp := startAndOpen(t)
	ak := newAK(t, tp)
	if err := tp.Close(); err != nil {
		t.Fatal(err)
	}
	if err := tp.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := tp.Info(context.Background()); !errors.Is(err, errClosed) {
		t.Errorf("Info on closed TPM: %v", err)
	}
	if _, _, err := ak.Quote(context.Background(), []byte{1}, PCRSelection{}); !errors.Is(err, errClosed) {
		t.Errorf("Quote on closed TPM: %v", err)
	}
}

func TestCanceledContext(t *testing.T) {
	_, tp := startAndOpen(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := tp.NewAK(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("NewAK with canceled context: %v", err)
	}
	assertNoTransients(t, tp)
}

// TestTemplateEK removes the persisted RSA EK, as on TPMs whose firmware
// does not persist one: the EK is re-created from the TCG template, matches
// its certificate, and activates credentials.
func TestTemplateEK(t *testing.T) {
	ctx := context.Background()
	_, tp := startAndOpen(t)
	persisted := eksByAlg(t, tp)[AlgRSA2048]
	err := tp.do(ctx, func() error {
		rp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(ekHandleRSA2048)}.Execute(tp.conn)
		if err != nil {
			return err
		}
		_, err = tpm2.EvictControl{
			Auth:             tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			ObjectHandle:     tpm2.NamedHandle{Handle: tpm2.TPMHandle(ekHandleRSA2048), Name: rp.Name},
			PersistentHandle: tpm2.TPMHandle(ekHandleRSA2048),
		}.Execute(tp.conn)
		return err
	})
	if err != nil {
		t.Fatalf("evicting the RSA EK: %v", err)
	}
	ek := eksByAlg(t, tp)[AlgRSA2048]
	if ek.Handle != 0 {
		t.Fatalf("EK handle 0x%x after eviction, want 0 (template)", ek.Handle)
	}
	if !bytes.Equal(ek.PublicArea, persisted.PublicArea) || !bytes.Equal(ek.Certificate, persisted.Certificate) {
		t.Error("template EK differs from the persisted one")
	}
	ak := newAK(t, tp)
	secret := nonce(t)
	proof, err := ak.ActivateCredential(ctx, ek, challenge(t, ek, ak.AttestationParameters().Public, secret))
	if err != nil || !bytes.Equal(proof.Secret, secret) {
		t.Fatalf("ActivateCredential with a template EK: %v", err)
	}
	assertNoTransients(t, tp)
}

// TestP256EK persists a TCG-template ECC P-256 EK at 0x81010002, as
// platforms with ECC EKs do (swtpm 0.7 makes RSA and P-384 only): it is
// listed without a certificate and activates credentials through the
// PolicySecret path in SHA-256.
func TestP256EK(t *testing.T) {
	ctx := context.Background()
	_, tp := startAndOpen(t)
	err := tp.do(ctx, func() error {
		h, _, err := tp.createEK(ekTemplate(AlgP256))
		if err != nil {
			return err
		}
		defer tp.flush(h.Handle)
		_, err = tpm2.EvictControl{
			Auth:             tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			ObjectHandle:     h,
			PersistentHandle: tpm2.TPMHandle(ekHandleP256),
		}.Execute(tp.conn)
		return err
	})
	if err != nil {
		t.Fatalf("persisting a P-256 EK: %v", err)
	}
	ek, ok := eksByAlg(t, tp)[AlgP256]
	if !ok {
		t.Fatal("persisted P-256 EK not listed")
	}
	if ek.Handle != ekHandleP256 || len(ek.Certificate) != 0 {
		t.Errorf("P-256 EK handle 0x%x, certificate %d bytes", ek.Handle, len(ek.Certificate))
	}
	if _, isECDSA := ek.Public.(*ecdsa.PublicKey); !isECDSA {
		t.Errorf("P-256 EK public key is %T", ek.Public)
	}
	ak := newAK(t, tp)
	secret := nonce(t)
	proof, err := ak.ActivateCredential(ctx, ek, challenge(t, ek, ak.AttestationParameters().Public, secret))
	if err != nil || !bytes.Equal(proof.Secret, secret) {
		t.Fatalf("ActivateCredential with a P-256 EK: %v", err)
	}
	assertNoTransients(t, tp)
}

// foreignRSAEK is the public area of an RSA EK of no TPM here: the TCG
// template with another modulus.
func foreignRSAEK(t testing.TB) []byte {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	area := tpm2.RSAEKTemplate
	area.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.Bytes()})
	return tpm2.Marshal(area)
}

// An EK that is not this TPM's is refused before any TPM command uses it,
// and the TPM keeps working (swtpm entered failure mode when asked to
// activate for a foreign EK).
func TestActivateCredentialForeignEK(t *testing.T) {
	ctx := context.Background()
	_, tp := startAndOpen(t)
	eks := eksByAlg(t, tp)
	rsaEK, p384 := eks[AlgRSA2048], eks[AlgP384]
	foreign := foreignRSAEK(t)
	tests := []struct {
		name string
		ek   EK
	}{
		{"foreign EK at the RSA EK handle", EK{Algorithm: AlgRSA2048, PublicArea: foreign, Handle: ekHandleRSA2048}},
		{"foreign EK from the template", EK{Algorithm: AlgRSA2048, PublicArea: foreign}},
		{"P-384 EK at the RSA EK handle", EK{Algorithm: AlgRSA2048, PublicArea: p384.PublicArea, Handle: ekHandleRSA2048}},
		{"not an EK handle", EK{Algorithm: AlgRSA2048, PublicArea: rsaEK.PublicArea, Handle: 0x81000001}},
		{"empty EK handle", EK{Algorithm: AlgP256, PublicArea: rsaEK.PublicArea, Handle: ekHandleP256}},
	}
	ak := newAK(t, tp)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// The challenge is real, made for the EK given.
			ch := challenge(t, tt.ek, ak.AttestationParameters().Public, nonce(t))
			if _, err := ak.ActivateCredential(ctx, tt.ek, ch); !errors.Is(err, ErrForeignEK) {
				t.Fatalf("ActivateCredential: %v, want ErrForeignEK", err)
			}
		})
	}
	// The TPM still answers and activates for its own EKs.
	for _, ek := range []EK{rsaEK, p384} {
		secret := nonce(t)
		proof, err := ak.ActivateCredential(ctx, ek, challenge(t, ek, ak.AttestationParameters().Public, secret))
		if err != nil || !bytes.Equal(proof.Secret, secret) {
			t.Fatalf("ActivateCredential with the TPM's own %s EK after refusals: %v", ek.Algorithm, err)
		}
	}
	assertNoTransients(t, tp)
}

// The AK's parent is an endorsement-hierarchy primary, so quotes carry the
// TPM's real resetCount and restartCount (not obfuscated per key): two AKs
// see the same counters, and a reboot moves resetCount by one.
func TestAKCountersNotObfuscated(t *testing.T) {
	ctx := context.Background()
	sw, tp := startAndOpen(t)
	clock := func(ak *AK) tpm2.TPMSClockInfo {
		t.Helper()
		q, _, err := ak.Quote(ctx, nonce(t), PCRSelection{})
		if err != nil {
			t.Fatalf("Quote: %v", err)
		}
		a, err := tpm2.Unmarshal[tpm2.TPMSAttest](q.Attest)
		if err != nil {
			t.Fatal(err)
		}
		return a.ClockInfo
	}
	ak1, ak2 := newAK(t, tp), newAK(t, tp)

	// Creation data: the parent's qualified name is H(TPM_RH_ENDORSEMENT ||
	// parent name), i.e. a primary of the endorsement hierarchy.
	cd, err := tpm2.Unmarshal[tpm2.TPMSCreationData](ak1.AttestationParameters().CreateData)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	h.Write([]byte{0x40, 0x00, 0x00, 0x0b}) // TPM_RH_ENDORSEMENT
	h.Write(cd.ParentName.Buffer)
	if want := append([]byte{0x00, 0x0b}, h.Sum(nil)...); !bytes.Equal(cd.ParentQualifiedName.Buffer, want) {
		t.Fatalf("AK parent qualified name %x, want %x (endorsement hierarchy)", cd.ParentQualifiedName.Buffer, want)
	}

	c1, c2 := clock(ak1), clock(ak2)
	if c1.ResetCount != c2.ResetCount || c1.RestartCount != c2.RestartCount {
		t.Fatalf("two AKs in one boot see counters %+v and %+v: obfuscated", c1, c2)
	}
	if err := sw.Reboot(ctx); err != nil {
		t.Fatal(err)
	}
	c3 := clock(ak1) // the AK reloads from its blob after the reset
	if c3.ResetCount != c1.ResetCount+1 || c3.RestartCount != 0 {
		t.Fatalf("after one reboot counters are %+v, before %+v: want resetCount+1, restartCount 0", c3, c1)
	}
	if c4 := clock(ak2); c4.ResetCount != c3.ResetCount {
		t.Fatalf("after reboot the AKs disagree: %+v and %+v", c3, c4)
	}
	assertNoTransients(t, tp)
}
