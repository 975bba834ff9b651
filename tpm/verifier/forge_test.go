package verifier

// A software stand-in for the TPM's signing side, used by the pure unit tests
// to produce evidence a real TPM never would (a correctly signed structure
// with the wrong magic or type, a weak AK, a key with bad attributes) and to
// test every check without swtpm. The swtpm-backed tests exercise the real
// TPM paths.

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/binary"
	"math/big"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/ironroot/ironroot/tpm"
)

// forge is a fake TPM: an RSA EK with a certificate from its own CA, an ECC AK
// and an ECC agent key, all software keys.
type forge struct {
	t      testing.TB
	ca     *x509.Certificate
	caKey  *ecdsa.PrivateKey
	ekKey  *rsa.PrivateKey
	ekPub  []byte
	ekCert []byte
	akKey  *ecdsa.PrivateKey
	akPub  []byte
	keyKey *ecdsa.PrivateKey
	keyPub []byte
	clock  tpm2.TPMSClockInfo
	pcrs   map[int][]byte
	vendor string
}

var forgeEpoch = time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)

// RSA-2048 generation dominates the tests' run time; forges take turns on a
// few keys instead, so consecutive forges (a test and its "other") differ.
var (
	ekKeyPool = sync.OnceValue(func() []*rsa.PrivateKey {
		keys := make([]*rsa.PrivateKey, 3)
		for i := range keys {
			k, err := rsa.GenerateKey(rand.Reader, 2048)
			if err != nil {
				panic(err)
			}
			keys[i] = k
		}
		return keys
	})
	ekKeyNext atomic.Uint32
)

func newForge(t testing.TB) *forge {
	t.Helper()
	f := &forge{t: t, vendor: "id:49424D00"}
	var err error
	if f.caKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "forge EK root"},
		NotBefore:             forgeEpoch,
		NotAfter:              forgeEpoch.AddDate(50, 0, 0),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &f.caKey.PublicKey, f.caKey)
	if err != nil {
		t.Fatal(err)
	}
	if f.ca, err = x509.ParseCertificate(der); err != nil {
		t.Fatal(err)
	}
	f.ekKey = ekKeyPool()[ekKeyNext.Add(1)%uint32(len(ekKeyPool()))]
	ek := tpm2.RSAEKTemplate
	ek.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: f.ekKey.N.Bytes()})
	f.ekPub = tpm2.Marshal(ek)
	f.ekCert = f.issueEKCert(f.caKey, f.ca, &f.ekKey.PublicKey)
	if f.akKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		t.Fatal(err)
	}
	f.akPub = eccPublic(f.akKey, tpm2.TPMAObject{
		FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true,
		Restricted: true, SignEncrypt: true,
	})
	if f.keyKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		t.Fatal(err)
	}
	f.keyPub = eccPublic(f.keyKey, tpm2.TPMAObject{
		FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true, SignEncrypt: true,
	})
	f.clock = tpm2.TPMSClockInfo{Clock: 1000, ResetCount: 3, RestartCount: 0, Safe: true}
	f.pcrs = map[int][]byte{}
	for i := 0; i < 24; i++ {
		f.pcrs[i] = make([]byte, 32)
	}
	return f
}

// issueEKCert issues an EK certificate in the TCG profile: empty subject,
// critical SAN with the TPM manufacturer, the EK EKU.
func (f *forge) issueEKCert(caKey crypto.Signer, ca *x509.Certificate, pub crypto.PublicKey) []byte {
	f.t.Helper()
	type atv struct {
		Type  asn1.ObjectIdentifier
		Value string `asn1:"utf8"`
	}
	dn, err := asn1.Marshal([]asn1.RawValue{})
	if err != nil {
		f.t.Fatal(err)
	}
	rdns := []any{
		[]atv{{Type: oidTPMManufacturer, Value: f.vendor}},
		[]atv{{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 2}, Value: "forge"}},
		[]atv{{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 3}, Value: "id:00010002"}},
	}
	var rdnSeq []asn1.RawValue
	for _, r := range rdns {
		b, err := asn1.MarshalWithParams(r, "set")
		if err != nil {
			f.t.Fatal(err)
		}
		rdnSeq = append(rdnSeq, asn1.RawValue{FullBytes: b})
	}
	dn, err = asn1.Marshal(rdnSeq)
	if err != nil {
		f.t.Fatal(err)
	}
	// GeneralName directoryName [4] EXPLICIT Name
	gn, err := asn1.Marshal(asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: dn})
	if err != nil {
		f.t.Fatal(err)
	}
	san, err := asn1.Marshal([]asn1.RawValue{{FullBytes: gn}})
	if err != nil {
		f.t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		NotBefore:             forgeEpoch,
		NotAfter:              forgeEpoch.AddDate(50, 0, 0),
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageKeyEncipherment,
		UnknownExtKeyUsage:    []asn1.ObjectIdentifier{{2, 23, 133, 8, 1}},
		ExtraExtensions:       []pkix.Extension{{Id: oidSubjectAltName, Critical: true, Value: san}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, pub, caKey)
	if err != nil {
		f.t.Fatal(err)
	}
	return der
}

func eccPublic(k *ecdsa.PrivateKey, attrs tpm2.TPMAObject) []byte {
	size := (k.Curve.Params().BitSize + 7) / 8
	curve := tpm2.TPMECCNistP256
	if size == 48 {
		curve = tpm2.TPMECCNistP384
	}
	pub := tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgECC,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: attrs,
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Scheme: tpm2.TPMTECCScheme{
				Scheme:  tpm2.TPMAlgECDSA,
				Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
			},
			CurveID: curve,
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: k.X.FillBytes(make([]byte, size))},
			Y: tpm2.TPM2BECCParameter{Buffer: k.Y.FillBytes(make([]byte, size))},
		}),
	}
	return tpm2.Marshal(pub)
}

func nameOf(t testing.TB, raw []byte) []byte {
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](raw)
	if err != nil {
		t.Fatal(err)
	}
	n, err := objectName(pub, raw)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// sign makes a TPMT_SIGNATURE (ECDSA SHA-256) over msg.
func sign(t testing.TB, k *ecdsa.PrivateKey, msg []byte) []byte {
	d := sha256.Sum256(msg)
	r, s, err := ecdsa.Sign(rand.Reader, k, d[:])
	if err != nil {
		t.Fatal(err)
	}
	return tpm2.Marshal(tpm2.TPMTSignature{
		SigAlg: tpm2.TPMAlgECDSA,
		Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgECDSA, &tpm2.TPMSSignatureECC{
			Hash:       tpm2.TPMAlgSHA256,
			SignatureR: tpm2.TPM2BECCParameter{Buffer: r.Bytes()},
			SignatureS: tpm2.TPM2BECCParameter{Buffer: s.Bytes()},
		}),
	})
}

func (f *forge) attest(typ tpm2.TPMST, extra []byte, body tpm2.TPMUAttest) []byte {
	return tpm2.Marshal(tpm2.TPMSAttest{
		Magic:           tpm2.TPMGeneratedValue,
		Type:            typ,
		QualifiedSigner: tpm2.TPM2BName{Buffer: nameOf(f.t, f.akPub)},
		ExtraData:       tpm2.TPM2BData{Buffer: extra},
		ClockInfo:       f.clock,
		FirmwareVersion: 1,
		Attested:        body,
	})
}

// identity returns the Identity the agent would send, with the AK a primary
// of the endorsement hierarchy.
func (f *forge) identity() tpm.Identity {
	return tpm.Identity{
		EKPublic:      f.ekPub,
		EKCertificate: f.ekCert,
		AK:            forgeAKUnder(f.t, f, tpm2.TPMRHEndorsement),
	}
}

// forgeAKUnder makes the AK's creation evidence for a parent that is a
// primary key of hierarchy h.
func forgeAKUnder(t testing.TB, f *forge, h tpm2.TPMHandle) tpm.AttestationKey {
	parent := append([]byte{0, 0x0b}, bytes.Repeat([]byte{0x5a}, 32)...)
	qn := sha256.New()
	qn.Write(binary.BigEndian.AppendUint32(nil, uint32(h)))
	qn.Write(parent)
	createData := tpm2.Marshal(tpm2.TPMSCreationData{
		PCRSelect:           tpm2.TPMLPCRSelection{},
		Locality:            tpm2.TPMALocality{TPMLocZero: true},
		ParentNameAlg:       tpm2.TPMAlgSHA256,
		ParentName:          tpm2.TPM2BName{Buffer: parent},
		ParentQualifiedName: tpm2.TPM2BName{Buffer: qn.Sum([]byte{0, 0x0b})},
	})
	ch := sha256.Sum256(createData)
	att := f.attest(tpm2.TPMSTAttestCreation, nil, tpm2.NewTPMUAttest(tpm2.TPMSTAttestCreation, &tpm2.TPMSCreationInfo{
		ObjectName:   tpm2.TPM2BName{Buffer: nameOf(f.t, f.akPub)},
		CreationHash: tpm2.TPM2BDigest{Buffer: ch[:]},
	}))
	return tpm.AttestationKey{
		Public:            f.akPub,
		CreateData:        createData,
		CreateAttestation: att,
		CreateSignature:   sign(t, f.akKey, att),
	}
}

func pcrBitmap(pcrs []int) []byte {
	b := make([]byte, 3)
	for _, p := range pcrs {
		b[p/8] |= 1 << (p % 8)
	}
	return b
}

// quote returns a quote over the given PCRs and the PCR values to send.
func (f *forge) quote(nonce []byte, pcrs []int) (tpm.Quote, []tpm.PCR) {
	d := sha256.New()
	var vals []tpm.PCR
	for _, i := range pcrs {
		d.Write(f.pcrs[i])
		vals = append(vals, tpm.PCR{Index: i, Alg: "sha256", Digest: append([]byte(nil), f.pcrs[i]...)})
	}
	att := f.attest(tpm2.TPMSTAttestQuote, nonce, tpm2.NewTPMUAttest(tpm2.TPMSTAttestQuote, &tpm2.TPMSQuoteInfo{
		PCRSelect: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{Hash: tpm2.TPMAlgSHA256, PCRSelect: pcrBitmap(pcrs)}}},
		PCRDigest: tpm2.TPM2BDigest{Buffer: d.Sum(nil)},
	}))
	return tpm.Quote{Attest: att, Signature: sign(f.t, f.akKey, att)}, vals
}

// certify returns the agent key certified over nonce.
func (f *forge) certify(nonce []byte) tpm.CertifiedKey {
	n := nameOf(f.t, f.keyPub)
	att := f.attest(tpm2.TPMSTAttestCertify, nonce, tpm2.NewTPMUAttest(tpm2.TPMSTAttestCertify, &tpm2.TPMSCertifyInfo{
		Name:          tpm2.TPM2BName{Buffer: n},
		QualifiedName: tpm2.TPM2BName{Buffer: n},
	}))
	return tpm.CertifiedKey{Public: f.keyPub, CertifyInfo: att, Signature: sign(f.t, f.akKey, att)}
}

// evidence is the full PlatformEvidence for a nonce over PCRs 0–7.
func (f *forge) evidence(nonce []byte) tpm.PlatformEvidence {
	q, vals := f.quote(nonce, defaultPCRs)
	return tpm.PlatformEvidence{Quote: q, PCRs: vals, Key: f.certify(nonce)}
}

// activate completes Activate the way only the TPM could: with the secret.
func activate(t testing.TB, s *Session) []byte {
	t.Helper()
	s.mu.Lock()
	secret := append([]byte(nil), s.secret...)
	s.mu.Unlock()
	nonce, err := s.Activate(t.Context(), tpm.ActivationProof{Secret: secret})
	if err != nil {
		t.Fatalf("Activate: %v", err)
	}
	return nonce
}
