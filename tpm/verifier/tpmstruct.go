package verifier

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"

	"github.com/google/go-tpm/tpm2"
)

// unmarshal decodes a TPM structure from untrusted bytes and refuses
// trailing or non-canonical bytes (by re-encoding), so that the bytes a name
// is computed over are exactly the bytes interpreted. Signed structures use
// decode instead: their signature already covers the raw bytes, and the
// re-encoding (reflection) is a fifth of the verifier's CPU time.
func unmarshal[T tpm2.Marshallable, P interface {
	*T
	tpm2.Unmarshallable
}](data []byte) (out *T, err error) {
	out, err = decode[T, P](data)
	if err != nil {
		return nil, err
	}
	if re, err := marshal(*out); err != nil || !bytes.Equal(re, data) {
		return nil, errors.New("structure has trailing or non-canonical bytes")
	}
	return out, nil
}

// decode decodes a TPM structure from untrusted bytes. go-tpm's reflection
// decoder is not guaranteed panic-free on hostile input, so a panic becomes an
// ordinary error here.
func decode[T tpm2.Marshallable, P interface {
	*T
	tpm2.Unmarshallable
}](data []byte) (out *T, err error) {
	defer func() {
		if r := recover(); r != nil {
			out, err = nil, fmt.Errorf("decoding %T: invalid structure", out)
		}
	}()
	if len(data) == 0 {
		return nil, errors.New("empty structure")
	}
	return tpm2.Unmarshal[T, P](data)
}

// marshal is tpm2.Marshal without its panic.
func marshal(v tpm2.Marshallable) (out []byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			out, err = nil, errors.New("structure cannot be encoded")
		}
	}()
	return tpm2.Marshal(v), nil
}

// objectName is the TPM Name of an object: nameAlg || H_nameAlg(TPMT_PUBLIC),
// computed over the exact bytes received.
func objectName(pub *tpm2.TPMTPublic, raw []byte) ([]byte, error) {
	h, err := pub.NameAlg.Hash()
	if err != nil || h == crypto.SHA1 {
		return nil, fmt.Errorf("unsupported name algorithm 0x%x", uint16(pub.NameAlg))
	}
	name := binary.BigEndian.AppendUint16(nil, uint16(pub.NameAlg))
	d := h.New()
	d.Write(raw)
	return d.Sum(name), nil
}

// publicKey converts a TPM public area to a Go key, enforcing the minimum
// strength: RSA of at least 2048 bits, NIST P-256 or P-384 (P-521 too).
func publicKey(pub *tpm2.TPMTPublic) (crypto.PublicKey, error) {
	switch pub.Type {
	case tpm2.TPMAlgRSA:
		parms, err := pub.Parameters.RSADetail()
		if err != nil {
			return nil, fmt.Errorf("reading RSA parameters: %w", err)
		}
		n, err := pub.Unique.RSA()
		if err != nil {
			return nil, fmt.Errorf("reading RSA modulus: %w", err)
		}
		if parms.KeyBits < 2048 || len(n.Buffer)*8 != int(parms.KeyBits) {
			return nil, fmt.Errorf("RSA key of %d bits (modulus %d bytes): at least 2048 bits required", parms.KeyBits, len(n.Buffer))
		}
		e := int(parms.Exponent)
		if e == 0 {
			e = 65537
		}
		if e < 3 || e%2 == 0 {
			return nil, fmt.Errorf("invalid RSA exponent %d", e)
		}
		return &rsa.PublicKey{N: new(big.Int).SetBytes(n.Buffer), E: e}, nil
	case tpm2.TPMAlgECC:
		parms, err := pub.Parameters.ECCDetail()
		if err != nil {
			return nil, fmt.Errorf("reading ECC parameters: %w", err)
		}
		pt, err := pub.Unique.ECC()
		if err != nil {
			return nil, fmt.Errorf("reading ECC point: %w", err)
		}
		var c elliptic.Curve
		switch parms.CurveID {
		case tpm2.TPMECCNistP256:
			c = elliptic.P256()
		case tpm2.TPMECCNistP384:
			c = elliptic.P384()
		case tpm2.TPMECCNistP521:
			c = elliptic.P521()
		default:
			return nil, fmt.Errorf("unsupported ECC curve 0x%x", uint16(parms.CurveID))
		}
		size := (c.Params().BitSize + 7) / 8
		if len(pt.X.Buffer) > size || len(pt.Y.Buffer) > size {
			return nil, errors.New("ECC point coordinates too long for the curve")
		}
		// Building the point through the uncompressed encoding makes
		// crypto/ecdh check it is on the curve.
		enc := make([]byte, 1+2*size)
		enc[0] = 4
		copy(enc[1+size-len(pt.X.Buffer):1+size], pt.X.Buffer)
		copy(enc[1+2*size-len(pt.Y.Buffer):], pt.Y.Buffer)
		k, err := ecdsa.ParseUncompressedPublicKey(c, enc)
		if err != nil {
			return nil, fmt.Errorf("ECC point is not on the curve: %w", err)
		}
		return k, nil
	default:
		return nil, fmt.Errorf("unsupported key type 0x%x", uint16(pub.Type))
	}
}

// signingScheme returns the signature algorithm and hash of a signing key's
// public area. Restricted keys always carry a concrete scheme.
func signingScheme(pub *tpm2.TPMTPublic) (tpm2.TPMAlgID, crypto.Hash, error) {
	var (
		scheme  tpm2.TPMAlgID
		hashAlg tpm2.TPMIAlgHash
	)
	switch pub.Type {
	case tpm2.TPMAlgRSA:
		parms, err := pub.Parameters.RSADetail()
		if err != nil {
			return 0, 0, err
		}
		scheme = parms.Scheme.Scheme
		switch scheme {
		case tpm2.TPMAlgRSASSA:
			d, err := parms.Scheme.Details.RSASSA()
			if err != nil {
				return 0, 0, err
			}
			hashAlg = d.HashAlg
		case tpm2.TPMAlgRSAPSS:
			d, err := parms.Scheme.Details.RSAPSS()
			if err != nil {
				return 0, 0, err
			}
			hashAlg = d.HashAlg
		default:
			return 0, 0, fmt.Errorf("RSA signing scheme 0x%x not accepted (RSASSA or RSAPSS)", uint16(scheme))
		}
	case tpm2.TPMAlgECC:
		parms, err := pub.Parameters.ECCDetail()
		if err != nil {
			return 0, 0, err
		}
		scheme = parms.Scheme.Scheme
		if scheme != tpm2.TPMAlgECDSA {
			return 0, 0, fmt.Errorf("ECC signing scheme 0x%x not accepted (ECDSA)", uint16(scheme))
		}
		d, err := parms.Scheme.Details.ECDSA()
		if err != nil {
			return 0, 0, err
		}
		hashAlg = d.HashAlg
	default:
		return 0, 0, fmt.Errorf("unsupported key type 0x%x", uint16(pub.Type))
	}
	h, err := strongHash(hashAlg)
	if err != nil {
		return 0, 0, err
	}
	return scheme, h, nil
}

// strongHash maps a TPM hash algorithm to SHA-256/384/512; SHA-1 is refused.
func strongHash(alg tpm2.TPMIAlgHash) (crypto.Hash, error) {
	switch alg {
	case tpm2.TPMAlgSHA256:
		return crypto.SHA256, nil
	case tpm2.TPMAlgSHA384:
		return crypto.SHA384, nil
	case tpm2.TPMAlgSHA512:
		return crypto.SHA512, nil
	}
	return 0, fmt.Errorf("hash algorithm 0x%x not accepted (SHA-256, SHA-384 or SHA-512)", uint16(alg))
}

// signer is a TPM signing key as the verifier uses it.
type signer struct {
	key    crypto.PublicKey
	scheme tpm2.TPMAlgID
	hash   crypto.Hash
}

// errBadSignature marks a well-formed signature that does not verify, as
// opposed to an undecodable one.
var errBadSignature = errors.New("signature does not verify")

// verify checks a TPMT_SIGNATURE over msg. A signature that cannot be decoded
// returns an error wrapping ErrMalformed; one that decodes but does not verify,
// or uses another scheme than the key's, returns errBadSignature.
func (s *signer) verify(msg, rawSig []byte) error {
	sig, err := decode[tpm2.TPMTSignature](rawSig)
	if err != nil {
		return fmt.Errorf("%w: decoding signature: %v", ErrMalformed, err)
	}
	if sig.SigAlg != s.scheme {
		return fmt.Errorf("%w: signature algorithm 0x%x, key's scheme is 0x%x", errBadSignature, uint16(sig.SigAlg), uint16(s.scheme))
	}
	var sigHash tpm2.TPMIAlgHash
	switch sig.SigAlg {
	case tpm2.TPMAlgRSASSA, tpm2.TPMAlgRSAPSS:
		var rs *tpm2.TPMSSignatureRSA
		if sig.SigAlg == tpm2.TPMAlgRSASSA {
			rs, err = sig.Signature.RSASSA()
		} else {
			rs, err = sig.Signature.RSAPSS()
		}
		if err != nil {
			return fmt.Errorf("%w: decoding RSA signature: %v", ErrMalformed, err)
		}
		sigHash = rs.Hash
		if h, err := strongHash(sigHash); err != nil || h != s.hash {
			return fmt.Errorf("%w: signature hash 0x%x differs from the key's scheme", errBadSignature, uint16(sigHash))
		}
		pk, ok := s.key.(*rsa.PublicKey)
		if !ok {
			return fmt.Errorf("%w: RSA signature from a non-RSA key", errBadSignature)
		}
		d := s.hash.New()
		d.Write(msg)
		if sig.SigAlg == tpm2.TPMAlgRSASSA {
			err = rsa.VerifyPKCS1v15(pk, s.hash, d.Sum(nil), rs.Sig.Buffer)
		} else {
			err = rsa.VerifyPSS(pk, s.hash, d.Sum(nil), rs.Sig.Buffer, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto})
		}
		if err != nil {
			return errBadSignature
		}
		return nil
	case tpm2.TPMAlgECDSA:
		es, err := sig.Signature.ECDSA()
		if err != nil {
			return fmt.Errorf("%w: decoding ECDSA signature: %v", ErrMalformed, err)
		}
		if h, err := strongHash(es.Hash); err != nil || h != s.hash {
			return fmt.Errorf("%w: signature hash 0x%x differs from the key's scheme", errBadSignature, uint16(es.Hash))
		}
		pk, ok := s.key.(*ecdsa.PublicKey)
		if !ok {
			return fmt.Errorf("%w: ECDSA signature from a non-ECC key", errBadSignature)
		}
		d := s.hash.New()
		d.Write(msg)
		r := new(big.Int).SetBytes(es.SignatureR.Buffer)
		ss := new(big.Int).SetBytes(es.SignatureS.Buffer)
		if !ecdsa.Verify(pk, d.Sum(nil), r, ss) {
			return errBadSignature
		}
		return nil
	}
	return fmt.Errorf("%w: unsupported signature algorithm 0x%x", errBadSignature, uint16(sig.SigAlg))
}

// attestHeader checks the fixed prefix of a TPMS_ATTEST before it is decoded:
// magic TPM_GENERATED_VALUE and the expected structure tag.
func attestHeader(raw []byte, want tpm2.TPMST) error {
	if len(raw) < 6 {
		return errors.New("attestation structure too short")
	}
	if m := binary.BigEndian.Uint32(raw); m != uint32(tpm2.TPMGeneratedValue) {
		return fmt.Errorf("magic 0x%08x is not TPM_GENERATED", m)
	}
	if t := binary.BigEndian.Uint16(raw[4:]); t != uint16(want) {
		return fmt.Errorf("attestation type 0x%04x, want 0x%04x", t, uint16(want))
	}
	return nil
}
