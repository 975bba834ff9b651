package verifier

import (
	"errors"
	"fmt"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/tpm2"

	"github.com/ironroot/ironroot/tpm"
)

// akInfo is what Begin learned about the AK.
type akInfo struct {
	name   []byte
	signer signer
}

// checkAK verifies the AK creation evidence: go-attestation's
// CheckAKParameters (TPM_GENERATED creation attestation over this creation
// data, self-signed, fixedTPM/fixedParent/sensitiveDataOrigin/restricted,
// key strength), plus what it leaves out: the sign attribute, no decrypt,
// and an accepted signing scheme.
func checkAK(ak tpm.AttestationKey) (*akInfo, error) {
	pub, err := unmarshal[tpm2.TPMTPublic](ak.Public)
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
	return &akInfo{name: name, signer: signer{key: key, scheme: scheme, hash: hash}}, nil
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
