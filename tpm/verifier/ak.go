package verifier

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/tpm2"

	"github.com/ironroot/ironroot/tpm"
)

// akInfo is what Begin learned about the AK.
type akInfo struct {
	name   []byte
	signer signer
	// obfuscated: the AK is not known to live in the endorsement or
	// platform hierarchy, so the TPM obfuscates resetCount and
	// restartCount in what it signs (TPM 2.0 Part 1, "Obfuscation").
	obfuscated bool
}

// checkAK verifies the AK creation evidence: go-attestation's
// CheckAKParameters (TPM_GENERATED creation attestation over this creation
// data, self-signed, fixedTPM/fixedParent/sensitiveDataOrigin/restricted,
// key strength), plus what it leaves out: the sign attribute, no decrypt,
// and an accepted signing scheme.
func checkAK(ak tpm.AttestationKey) (*akInfo, error) {
	// Not re-encoded for strictness: the name the credential is bound to
	// is computed over these exact bytes, so any encoding other than the
	// TPM's own makes activation fail.
	pub, err := decode[tpm2.TPMTPublic](ak.Public)
	if err != nil {
		return nil, fmt.Errorf("%w: decoding AK public area: %v", ErrMalformed, err)
	}
	for _, f := range []struct {
		name string
		b    []byte
	}{{"creation data", ak.CreateData}, {"creation attestation", ak.CreateAttestation}, {"creation signature", ak.CreateSignature}} {
		if len(f.b) == 0 {
			return nil, fmt.Errorf("%w: AK %s missing", ErrMalformed, f.name)
		}
	}
	if err := checkAKParameters(ak); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrAKInvalid, err)
	}
	a := pub.ObjectAttributes
	switch {
	case !a.SignEncrypt:
		return nil, fmt.Errorf("%w: AK lacks the sign attribute", ErrAKInvalid)
	case a.Decrypt:
		return nil, fmt.Errorf("%w: AK is also a decryption key", ErrAKInvalid)
	case !a.Restricted || !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin:
		return nil, fmt.Errorf("%w: AK must be restricted, fixedTPM, fixedParent and sensitiveDataOrigin", ErrAKInvalid)
	}
	scheme, hash, err := signingScheme(pub)
	if err != nil {
		return nil, fmt.Errorf("%w: AK signing scheme: %v", ErrAKInvalid, err)
	}
	key, err := publicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("%w: AK key: %v", ErrAKInvalid, err)
	}
	name, err := objectName(pub, ak.Public)
	if err != nil {
		return nil, fmt.Errorf("%w: AK name: %v", ErrAKInvalid, err)
	}
	h, known := akHierarchy(ak.CreateData)
	obfuscated := !known || (h != tpm2.TPMRHEndorsement && h != tpm2.TPMRHPlatform)
	return &akInfo{name: name, signer: signer{key: key, scheme: scheme, hash: hash}, obfuscated: obfuscated}, nil
}

// hierarchies whose handle can be the root of a key's qualified name.
var hierarchies = []tpm2.TPMHandle{tpm2.TPMRHOwner, tpm2.TPMRHEndorsement, tpm2.TPMRHPlatform, tpm2.TPMRHNull}

// akHierarchy finds the hierarchy of the AK from its creation data, when
// the AK is a primary key or the child of one: the parent's qualified name
// is then nameAlg || H(hierarchy handle || parent name).
func akHierarchy(createData []byte) (tpm2.TPMHandle, bool) {
	cd, err := unmarshal[tpm2.TPMSCreationData](createData)
	if err != nil {
		return 0, false
	}
	pn, pqn := cd.ParentName.Buffer, cd.ParentQualifiedName.Buffer
	if len(pn) == 4 {
		h := tpm2.TPMHandle(binary.BigEndian.Uint32(pn))
		return h, slices.Contains(hierarchies, h)
	}
	if len(pn) < 2 || len(pqn) != len(pn) {
		return 0, false
	}
	alg := tpm2.TPMIAlgHash(binary.BigEndian.Uint16(pn))
	hash, err := alg.Hash()
	if err != nil {
		return 0, false
	}
	for _, h := range hierarchies {
		d := hash.New()
		d.Write(binary.BigEndian.AppendUint32(nil, uint32(h)))
		d.Write(pn)
		if bytes.Equal(pqn, d.Sum(binary.BigEndian.AppendUint16(nil, uint16(alg)))) {
			return h, true
		}
	}
	return 0, false
}

func checkAKParameters(ak tpm.AttestationKey) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = errors.New("AK creation evidence cannot be parsed")
		}
	}()
	p := attest.ActivationParameters{AK: attest.AttestationParameters{
		Public:            ak.Public,
		CreateData:        ak.CreateData,
		CreateAttestation: ak.CreateAttestation,
		CreateSignature:   ak.CreateSignature,
	}}
	return p.CheckAKParameters()
}
