package tpm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/big"

	"github.com/google/go-tpm/tpm2"
)

// keyTemplate is an unrestricted ECDSA P-256 signing key: it signs any
// digest (TLS handshakes, CSRs) but never leaves the TPM. The scheme is left
// to each TPM2_Sign so SHA-256 and SHA-384 digests both work.
func keyTemplate() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:            true,
			FixedParent:         true,
			SensitiveDataOrigin: true,
			UserWithAuth:        true,
			NoDA:                true,
			SignEncrypt:         true,
		},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID:   tpm2.TPMECCNistP256,
			KDF:       tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
	}
}

// Key is an ECDSA P-256 key created inside the TPM. It implements
// crypto.Signer; the private key never leaves the TPM. Safe for concurrent
// use (signatures are serialized by the TPM's mutex).
type Key struct {
	tpm    *TPM
	obj    object
	pub    *ecdsa.PublicKey
	closed bool // guarded by tpm.mu
}

// NewKey creates a signing key under the owner-hierarchy SRK and has ak certify it
// (TPM2_Certify) with qualifyingData (the server's nonce, 1–64 bytes) in the
// attestation, so the server knows the key is this TPM's and fresh.
func (t *TPM) NewKey(ctx context.Context, ak *AK, qualifyingData []byte) (*Key, CertifiedKey, error) {
	if len(qualifyingData) == 0 || len(qualifyingData) > maxNonceSize {
		return nil, CertifiedKey{}, fmt.Errorf("creating key: qualifying data must be 1–%d bytes, got %d", maxNonceSize, len(qualifyingData))
	}
	if ak == nil || ak.tpm != t {
		return nil, CertifiedKey{}, errors.New("creating key: the AK belongs to another TPM")
	}
	k := &Key{tpm: t}
	var ck CertifiedKey
	err := t.do(ctx, func() error {
		if ak.closed {
			return errAKClosed
		}
		srk, err := t.loadPrimary(&t.srk)
		if err != nil {
			return fmt.Errorf("creating key: %w", err)
		}
		created, err := tpm2.Create{
			ParentHandle: tpm2.AuthHandle{Handle: srk.Handle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)},
			InPublic:     tpm2.New2B(keyTemplate()),
		}.Execute(t.conn)
		if err != nil {
			t.flush(srk.Handle)
			return fmt.Errorf("creating key: %w", err)
		}
		// Free the SRK's slot before loading the AK: three slots in all.
		k.obj = object{parent: &t.srk, public: created.OutPublic, private: created.OutPrivate}
		t.flush(srk.Handle)
		kh, err := t.load(&k.obj)
		if err != nil {
			return fmt.Errorf("creating key: %w", err)
		}
		defer t.flush(kh.Handle)
		akh, err := t.load(&ak.obj)
		if err != nil {
			return fmt.Errorf("creating key: %w", err)
		}
		defer t.flush(akh.Handle)
		rsp, err := tpm2.Certify{
			ObjectHandle:   tpm2.AuthHandle{Handle: kh.Handle, Name: kh.Name, Auth: tpm2.PasswordAuth(nil)},
			SignHandle:     tpm2.AuthHandle{Handle: akh.Handle, Name: akh.Name, Auth: tpm2.PasswordAuth(nil)},
			QualifyingData: tpm2.TPM2BData{Buffer: qualifyingData},
			InScheme:       ecdsaSHA256(),
		}.Execute(t.conn)
		if err != nil {
			return fmt.Errorf("certifying key: %w", err)
		}
		ck = CertifiedKey{
			Public:      created.OutPublic.Bytes(),
			CertifyInfo: rsp.CertifyInfo.Bytes(),
			Signature:   tpm2.Marshal(rsp.Signature),
		}
		return nil
	})
	if err != nil {
		return nil, CertifiedKey{}, err
	}
	if k.pub, err = ecdsaPublic(&k.obj.public); err != nil {
		return nil, CertifiedKey{}, err
	}
	return k, ck, nil
}

func ecdsaPublic(p *tpm2.TPM2BPublic) (*ecdsa.PublicKey, error) {
	area, err := p.Contents()
	if err != nil {
		return nil, fmt.Errorf("decoding key public area: %w", err)
	}
	pub, err := tpm2.Pub(*area)
	if err != nil {
		return nil, fmt.Errorf("decoding key public key: %w", err)
	}
	ec, ok := pub.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("key is %T, want ECDSA", pub)
	}
	return ec, nil
}

// Public implements crypto.Signer.
func (k *Key) Public() crypto.PublicKey { return k.pub }

// Sign implements crypto.Signer: digest is a SHA-256 or SHA-384 hash
// (opts.HashFunc()), the result an ASN.1 DER ECDSA signature. The TPM draws
// the nonce; rand is not used.
func (k *Key) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return k.SignContext(context.Background(), digest, opts)
}

// SignContext is Sign bounded by ctx.
func (k *Key) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	var alg tpm2.TPMIAlgHash
	h := crypto.SHA256
	if opts != nil {
		h = opts.HashFunc()
	}
	switch h {
	case crypto.SHA256:
		alg = tpm2.TPMAlgSHA256
	case crypto.SHA384:
		alg = tpm2.TPMAlgSHA384
	default:
		return nil, fmt.Errorf("signing: unsupported hash %v (want SHA-256 or SHA-384)", h)
	}
	if len(digest) != h.Size() {
		return nil, fmt.Errorf("signing: digest is %d bytes, %v needs %d", len(digest), h, h.Size())
	}
	t := k.tpm
	var sig []byte
	err := t.do(ctx, func() error {
		if k.closed {
			return errors.New("signing: key is closed")
		}
		kh, err := t.load(&k.obj)
		if err != nil {
			return fmt.Errorf("signing: %w", err)
		}
		defer t.flush(kh.Handle)
		rsp, err := tpm2.Sign{
			KeyHandle: tpm2.AuthHandle{Handle: kh.Handle, Name: kh.Name, Auth: tpm2.PasswordAuth(nil)},
			Digest:    tpm2.TPM2BDigest{Buffer: digest},
			InScheme: tpm2.TPMTSigScheme{
				Scheme:  tpm2.TPMAlgECDSA,
				Details: tpm2.NewTPMUSigScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSchemeHash{HashAlg: alg}),
			},
			Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
		}.Execute(t.conn)
		if err != nil {
			return fmt.Errorf("signing: %w", err)
		}
		ec, err := rsp.Signature.Signature.ECDSA()
		if err != nil {
			return fmt.Errorf("signing: decoding signature: %w", err)
		}
		sig, err = asn1.Marshal(struct{ R, S *big.Int }{
			new(big.Int).SetBytes(ec.SignatureR.Buffer), new(big.Int).SetBytes(ec.SignatureS.Buffer),
		})
		return err
	})
	if err != nil {
		return nil, err
	}
	return sig, nil
}

// Close forgets the key in this process (the blob from Marshal still loads
// it). Nothing stays loaded in the TPM between calls.
func (k *Key) Close() error {
	k.tpm.mu.Lock()
	defer k.tpm.mu.Unlock()
	k.closed = true
	return nil
}

// keyBlobMagic starts a Marshal blob: "IRK" and a format version.
const keyBlobMagic = "IRK\x01"

// Marshal returns the key as a TPM-wrapped blob: its public area and its
// private area encrypted by the SRK, which only this TPM can load. It holds
// no key material in clear and can be stored as a file.
func (k *Key) Marshal() []byte {
	var b bytes.Buffer
	b.WriteString(keyBlobMagic)
	b.Write(tpm2.Marshal(k.obj.public))
	b.Write(tpm2.Marshal(k.obj.private))
	return b.Bytes()
}

// LoadKey loads a key from a Marshal blob, e.g. after the agent or the
// machine restarted. It fails on another TPM, or after the owner hierarchy
// was cleared.
func (t *TPM) LoadKey(ctx context.Context, blob []byte) (*Key, error) {
	pub, priv, err := parseKeyBlob(blob)
	if err != nil {
		return nil, fmt.Errorf("loading key: %w", err)
	}
	k := &Key{tpm: t, obj: object{parent: &t.srk, public: pub, private: priv}}
	if k.pub, err = ecdsaPublic(&k.obj.public); err != nil {
		return nil, fmt.Errorf("loading key: %w", err)
	}
	err = t.do(ctx, func() error {
		h, err := t.load(&k.obj)
		if err != nil {
			return fmt.Errorf("loading key: %w", err)
		}
		t.flush(h.Handle)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return k, nil
}

// parseKeyBlob decodes a Marshal blob and checks it holds a non-exportable
// ECDSA P-256 signing key.
func parseKeyBlob(blob []byte) (tpm2.TPM2BPublic, tpm2.TPM2BPrivate, error) {
	var (
		pub  tpm2.TPM2BPublic
		priv tpm2.TPM2BPrivate
	)
	if !bytes.HasPrefix(blob, []byte(keyBlobMagic)) {
		return pub, priv, errors.New("not an Ironroot TPM key blob")
	}
	rest := blob[len(keyBlobMagic):]
	pubBytes, rest, err := read2B(rest)
	if err != nil {
		return pub, priv, fmt.Errorf("key blob public area: %w", err)
	}
	privBytes, rest, err := read2B(rest)
	if err != nil {
		return pub, priv, fmt.Errorf("key blob private area: %w", err)
	}
	if len(rest) != 0 {
		return pub, priv, fmt.Errorf("key blob has %d trailing bytes", len(rest))
	}
	if len(privBytes) == 0 {
		return pub, priv, errors.New("key blob has an empty private area")
	}
	area, err := tpm2.Unmarshal[tpm2.TPMTPublic](pubBytes)
	if err != nil {
		return pub, priv, fmt.Errorf("key blob public area: %w", err)
	}
	a := area.ObjectAttributes
	if area.Type != tpm2.TPMAlgECC || !a.SignEncrypt || a.Decrypt || a.Restricted || !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin {
		return pub, priv, errors.New("key blob is not a TPM-generated, non-exportable signing key")
	}
	parms, err := area.Parameters.ECCDetail()
	if err != nil || parms.CurveID != tpm2.TPMECCNistP256 {
		return pub, priv, errors.New("key blob is not an ECC P-256 key")
	}
	return tpm2.BytesAs2B[tpm2.TPMTPublic](pubBytes), tpm2.TPM2BPrivate{Buffer: privBytes}, nil
}

// read2B splits a TPM2B (16-bit big-endian size, then the bytes) off b.
func read2B(b []byte) ([]byte, []byte, error) {
	if len(b) < 2 {
		return nil, nil, errors.New("truncated size")
	}
	n := int(binary.BigEndian.Uint16(b))
	if len(b)-2 < n {
		return nil, nil, fmt.Errorf("truncated: want %d bytes, have %d", n, len(b)-2)
	}
	return b[2 : 2+n], b[2+n:], nil
}
