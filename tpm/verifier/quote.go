package verifier

import (
	"crypto"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"sort"

	"github.com/google/go-tpm/tpm2"

	"github.com/ironroot/ironroot/tpm"
)

// quoteInfo is the signed content of a verified quote.
type quoteInfo struct {
	clock     tpm2.TPMSClockInfo
	selection []int
	digest    []byte
}

// maxEvidenceBytes bounds a single TPM structure; real ones are < 1 KiB.
const maxEvidenceBytes = 8 << 10

// verifyQuote checks, in this order: the signature by this AK over the raw
// bytes (so nothing unsigned is interpreted), the TPM_GENERATED magic and
// ATTEST_QUOTE type (CVE-2024-29038), the nonce (constant time) and the PCR
// selection (exactly the configured one, CVE-2024-29039).
func (v *Verifier) verifyQuote(q tpm.Quote, ak *signer, nonce []byte) (*quoteInfo, error) {
	if len(q.Attest) == 0 || len(q.Signature) == 0 {
		return nil, fmt.Errorf("%w: quote or quote signature missing", ErrMalformed)
	}
	if len(q.Attest) > maxEvidenceBytes || len(q.Signature) > maxEvidenceBytes {
		return nil, fmt.Errorf("%w: quote too large", ErrMalformed)
	}
	if err := ak.verify(q.Attest, q.Signature); err != nil {
		if errors.Is(err, ErrMalformed) {
			return nil, fmt.Errorf("quote signature: %w", err)
		}
		return nil, fmt.Errorf("%w: quote signature by the AK: %v", ErrQuote, err)
	}
	if err := attestHeader(q.Attest, tpm2.TPMSTAttestQuote); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrQuote, err)
	}
	att, err := decode[tpm2.TPMSAttest](q.Attest)
	if err != nil {
		return nil, fmt.Errorf("%w: decoding quote: %v", ErrMalformed, err)
	}
	if subtle.ConstantTimeCompare(att.ExtraData.Buffer, nonce) != 1 {
		return nil, fmt.Errorf("%w: quote is not over this session's nonce", ErrNonce)
	}
	info, err := att.Attested.Quote()
	if err != nil {
		return nil, fmt.Errorf("%w: quote body: %v", ErrMalformed, err)
	}
	sels := info.PCRSelect.PCRSelections
	if len(sels) != 1 {
		return nil, fmt.Errorf("%w: quote selects %d PCR banks, want exactly SHA-256", ErrPCRSelection, len(sels))
	}
	if sels[0].Hash != tpm2.TPMAlgSHA256 {
		return nil, fmt.Errorf("%w: quoted bank 0x%x, want SHA-256", ErrPCRSelection, uint16(sels[0].Hash))
	}
	var quoted []int
	for byteIdx, b := range sels[0].PCRSelect {
		for bit := 0; bit < 8; bit++ {
			if b&(1<<bit) != 0 {
				quoted = append(quoted, byteIdx*8+bit)
			}
		}
	}
	if !equalInts(quoted, v.pcrs) {
		return nil, fmt.Errorf("%w: quote covers PCRs %v, want %v", ErrPCRSelection, quoted, v.pcrs)
	}
	return &quoteInfo{clock: att.ClockInfo, selection: quoted, digest: info.PCRDigest.Buffer}, nil
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

// checkPCRValues checks the supplied PCR values are exactly the quoted ones
// and hash (with the AK's scheme hash, as TPM2_Quote does) to the quoted
// digest. It returns them by index.
func (v *Verifier) checkPCRValues(q *quoteInfo, supplied []tpm.PCR, h crypto.Hash) (map[int][]byte, error) {
	if len(supplied) > 24*4 {
		return nil, fmt.Errorf("%w: %d PCR values", ErrMalformed, len(supplied))
	}
	quoted := make(map[int]bool, len(q.selection))
	for _, i := range q.selection {
		quoted[i] = true
	}
	pcrs := make(map[int][]byte, len(supplied))
	for _, p := range supplied {
		if p.Alg != "" && p.Alg != "sha256" {
			return nil, fmt.Errorf("%w: PCR %d of bank %q supplied, only the quoted sha256 bank is accepted", ErrPCRValues, p.Index, p.Alg)
		}
		if !quoted[p.Index] {
			return nil, fmt.Errorf("%w: PCR %d supplied but not quoted", ErrPCRValues, p.Index)
		}
		if _, dup := pcrs[p.Index]; dup {
			return nil, fmt.Errorf("%w: PCR %d supplied twice", ErrPCRValues, p.Index)
		}
		if len(p.Digest) != sha256.Size {
			return nil, fmt.Errorf("%w: PCR %d value has %d bytes, want %d", ErrPCRValues, p.Index, len(p.Digest), sha256.Size)
		}
		pcrs[p.Index] = append([]byte(nil), p.Digest...)
	}
	idx := make([]int, 0, len(q.selection))
	for _, i := range q.selection {
		if _, ok := pcrs[i]; !ok {
			return nil, fmt.Errorf("%w: quoted PCR %d not supplied", ErrPCRValues, i)
		}
		idx = append(idx, i)
	}
	sort.Ints(idx)
	d := h.New()
	for _, i := range idx {
		d.Write(pcrs[i])
	}
	if subtle.ConstantTimeCompare(d.Sum(nil), q.digest) != 1 {
		return nil, fmt.Errorf("%w: PCR values do not hash to the quoted digest", ErrPCRValues)
	}
	return pcrs, nil
}

// checkCertifiedKey verifies the TPM2_Certify of the agent key: signed by this
// AK, TPM_GENERATED ATTEST_CERTIFY over this nonce, naming exactly the key
// whose public area was sent, and the key is a non-exportable, TPM-generated,
// unrestricted signing key of adequate strength.
func checkCertifiedKey(k tpm.CertifiedKey, ak *signer, nonce []byte) (crypto.PublicKey, error) {
	if len(k.Public) == 0 && len(k.CertifyInfo) == 0 && len(k.Signature) == 0 {
		return nil, fmt.Errorf("%w: %v", ErrKeyCertification, errNoKey)
	}
	if len(k.Public) == 0 || len(k.CertifyInfo) == 0 || len(k.Signature) == 0 {
		return nil, fmt.Errorf("%w: certified key incomplete", ErrMalformed)
	}
	if len(k.Public) > maxEvidenceBytes || len(k.CertifyInfo) > maxEvidenceBytes || len(k.Signature) > maxEvidenceBytes {
		return nil, fmt.Errorf("%w: certified key too large", ErrMalformed)
	}
	// The certified name is computed over these exact bytes, so an
	// encoding other than the TPM's fails the name check below.
	pub, err := decode[tpm2.TPMTPublic](k.Public)
	if err != nil {
		return nil, fmt.Errorf("%w: decoding certified key public area: %v", ErrMalformed, err)
	}
	if err := ak.verify(k.CertifyInfo, k.Signature); err != nil {
		if errors.Is(err, ErrMalformed) {
			return nil, fmt.Errorf("key certification signature: %w", err)
		}
		return nil, fmt.Errorf("%w: certification not signed by this AK: %v", ErrKeyCertification, err)
	}
	if err := attestHeader(k.CertifyInfo, tpm2.TPMSTAttestCertify); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKeyCertification, err)
	}
	att, err := decode[tpm2.TPMSAttest](k.CertifyInfo)
	if err != nil {
		return nil, fmt.Errorf("%w: decoding key certification: %v", ErrMalformed, err)
	}
	if subtle.ConstantTimeCompare(att.ExtraData.Buffer, nonce) != 1 {
		return nil, fmt.Errorf("%w: certification is not over this session's nonce", ErrKeyCertification)
	}
	ci, err := att.Attested.Certify()
	if err != nil {
		return nil, fmt.Errorf("%w: certification body: %v", ErrMalformed, err)
	}
	name, err := objectName(pub, k.Public)
	if err != nil {
		return nil, fmt.Errorf("%w: key name: %v", ErrKeyCertification, err)
	}
	if subtle.ConstantTimeCompare(ci.Name.Buffer, name) != 1 {
		return nil, fmt.Errorf("%w: certification names another key", ErrKeyCertification)
	}
	a := pub.ObjectAttributes
	switch {
	case !a.FixedTPM || !a.FixedParent:
		return nil, fmt.Errorf("%w: key can leave the TPM (fixedTPM/fixedParent clear)", ErrKeyCertification)
	case !a.SensitiveDataOrigin:
		return nil, fmt.Errorf("%w: key was imported, not generated by the TPM", ErrKeyCertification)
	case !a.SignEncrypt || a.Decrypt:
		return nil, fmt.Errorf("%w: key is not a signing-only key", ErrKeyCertification)
	case a.Restricted:
		return nil, fmt.Errorf("%w: key is restricted (an AK, not a general signing key)", ErrKeyCertification)
	}
	key, err := publicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("%w: key: %v", ErrKeyCertification, err)
	}
	if pub.Type == tpm2.TPMAlgECC {
		p, _ := pub.Parameters.ECCDetail()
		if p == nil || p.CurveID != tpm2.TPMECCNistP256 {
			return nil, fmt.Errorf("%w: ECC agent key must be P-256", ErrKeyCertification)
		}
	}
	return key, nil
}
