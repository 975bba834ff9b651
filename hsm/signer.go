//go:build cgo

package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"sync/atomic"

	"github.com/miekg/pkcs11"
)

// Key is a private key on the token. It implements crypto.Signer and is safe
// for concurrent use: every signature runs on a session of its own.
type Key struct {
	hsm             *HSM
	id              []byte
	label           string
	pub             crypto.PublicKey
	requireHardware bool
	handles         atomic.Pointer[keyHandles]
}

// keyHandles is the private key's object handle, valid for sessions of
// generation gen.
type keyHandles struct {
	priv pkcs11.ObjectHandle
	gen  uint64
}

var _ crypto.Signer = (*Key)(nil)

// Public returns the public key (*ecdsa.PublicKey or *rsa.PublicKey).
func (k *Key) Public() crypto.PublicKey { return k.pub }

// Ref returns the key's CKA_ID and CKA_LABEL.
func (k *Key) Ref() KeyRef {
	return KeyRef{ID: append([]byte(nil), k.id...), Label: k.label}
}

// URI returns the key's pkcs11: URI: the token attributes, id, object and
// type=private, module-path and pin-source, never a pin-value.
func (k *Key) URI() string {
	u := k.hsm.uri
	u.ID, u.Object, u.Type = k.id, k.label, "private"
	return u.String()
}

// Attributes reads the key's custody attributes from the token.
func (k *Key) Attributes(ctx context.Context) (KeyAttributes, error) {
	var a KeyAttributes
	err := k.hsm.do(ctx, func(s *session) error {
		h, err := k.handle(s)
		if err != nil {
			return err
		}
		a, err = k.hsm.keyAttributes(s, h)
		return err
	})
	if err != nil {
		return KeyAttributes{}, fmt.Errorf("reading attributes of PKCS#11 key %s: %w", k.Ref(), err)
	}
	return a, nil
}

// handle returns the private key's object handle for s, finding the key
// again after a recovery. The refound key must have the same public key.
func (k *Key) handle(s *session) (pkcs11.ObjectHandle, error) {
	kh := k.handles.Load()
	if kh.gen == s.gen {
		return kh.priv, nil
	}
	f, err := k.hsm.lookup(s, KeyRef{ID: k.id, Label: k.label})
	if err != nil {
		return 0, fmt.Errorf("finding the key again after recovery: %w", err)
	}
	if eq, ok := f.pub.(interface{ Equal(crypto.PublicKey) bool }); !ok || !eq.Equal(k.pub) {
		return 0, errors.New("finding the key again after recovery: the token now holds a different key under this ID and label")
	}
	if k.requireHardware {
		if err := f.attrs.HardwareBound(); err != nil {
			return 0, fmt.Errorf("finding the key again after recovery: %w", err)
		}
	}
	k.handles.Store(&keyHandles{priv: f.priv, gen: s.gen})
	return f.priv, nil
}

// Sign signs digest, a hash computed by the caller with opts.HashFunc():
// ECDSA keys return an ASN.1 DER signature, RSA keys PKCS#1 v1.5, or PSS
// when opts is *rsa.PSSOptions. The PSS salt length is the hash length for
// PSSSaltLengthEqualsHash and for PSSSaltLengthAuto (tokens need a fixed
// length; verifiers accept it under Auto), else the length given. rand is
// ignored: the token has its own. Sign waits at most the sign timeout (see
// WithSignTimeout) for a session; SignContext takes a context instead.
func (k *Key) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), k.hsm.cfg.signTimeout)
	defer cancel()
	return k.SignContext(ctx, digest, opts)
}

// SignContext is Sign with a context bounding the wait for a session and
// any recovery.
func (k *Key) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	mech, data, err := k.mechanism(digest, opts)
	if err != nil {
		return nil, fmt.Errorf("signing with PKCS#11 key %s: %w", k.Ref(), err)
	}
	var sig []byte
	err = k.hsm.do(ctx, func(s *session) error {
		h, err := k.handle(s)
		if err != nil {
			return err
		}
		if err := k.hsm.mod.ctx.SignInit(s.h, mech, h); err != nil {
			return p11err("C_SignInit", err)
		}
		sig, err = k.hsm.mod.ctx.Sign(s.h, data)
		return p11err("C_Sign", err)
	})
	if err != nil {
		return nil, fmt.Errorf("signing with PKCS#11 key %s: %w", k.Ref(), err)
	}
	if _, ok := k.pub.(*ecdsa.PublicKey); ok {
		if sig, err = ecdsaDER(sig); err != nil {
			return nil, fmt.Errorf("signing with PKCS#11 key %s: %w", k.Ref(), err)
		}
	}
	return sig, nil
}

// mechanism picks the PKCS#11 mechanism and the data to hand to C_Sign.
func (k *Key) mechanism(digest []byte, opts crypto.SignerOpts) ([]*pkcs11.Mechanism, []byte, error) {
	if opts == nil {
		return nil, nil, errors.New("no signer options (hash) given")
	}
	hash := opts.HashFunc()
	if hash == 0 {
		return nil, nil, errors.New("signing needs a hash: the token signs digests only")
	}
	if !hash.Available() || len(digest) != hash.Size() {
		return nil, nil, fmt.Errorf("digest is %d bytes, want %d for %v", len(digest), hash.Size(), hash)
	}
	switch pub := k.pub.(type) {
	case *ecdsa.PublicKey:
		return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}, digest, nil
	case *rsa.PublicKey:
		hashMech, mgf, prefix, err := rsaHashParams(hash)
		if err != nil {
			return nil, nil, err
		}
		if pss, ok := opts.(*rsa.PSSOptions); ok {
			salt := pss.SaltLength
			switch {
			case salt == rsa.PSSSaltLengthEqualsHash || salt == rsa.PSSSaltLengthAuto:
				salt = hash.Size()
			case salt < 0:
				return nil, nil, fmt.Errorf("unsupported PSS salt length %d", salt)
			case salt > pub.Size()-hash.Size()-2:
				return nil, nil, fmt.Errorf("PSS salt length %d too long for the key", salt)
			}
			params := pkcs11.NewPSSParams(hashMech, mgf, uint(salt))
			return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_PSS, params)}, digest, nil
		}
		data := make([]byte, 0, len(prefix)+len(digest))
		data = append(append(data, prefix...), digest...)
		return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil)}, data, nil
	}
	return nil, nil, fmt.Errorf("unsupported public key type %T", k.pub)
}

// rsaHashParams returns the hash mechanism, MGF1 and DigestInfo prefix
// (RFC 8017 §9.2 note 1) for hash.
func rsaHashParams(hash crypto.Hash) (uint, uint, []byte, error) {
	switch hash {
	case crypto.SHA256:
		return pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256,
			[]byte{0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}, nil
	case crypto.SHA384:
		return pkcs11.CKM_SHA384, pkcs11.CKG_MGF1_SHA384,
			[]byte{0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30}, nil
	case crypto.SHA512:
		return pkcs11.CKM_SHA512, pkcs11.CKG_MGF1_SHA512,
			[]byte{0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40}, nil
	}
	return 0, 0, nil, fmt.Errorf("unsupported hash %v for RSA (want SHA-256, SHA-384 or SHA-512)", hash)
}

// ecdsaDER converts the token's raw r‖s into ASN.1 DER
// SEQUENCE { INTEGER r, INTEGER s }, without reflection (it is on the hot path).
func ecdsaDER(raw []byte) ([]byte, error) {
	if len(raw) == 0 || len(raw)%2 != 0 || len(raw) > 132 {
		return nil, fmt.Errorf("token returned a %d-byte ECDSA signature, want r‖s", len(raw))
	}
	half := len(raw) / 2
	r, s := derInt(raw[:half]), derInt(raw[half:])
	if r == nil || s == nil {
		return nil, errors.New("token returned an ECDSA signature with r or s zero")
	}
	body := len(r) + len(s) + 4
	out := make([]byte, 0, body+3)
	out = append(out, 0x30)
	if body >= 0x80 {
		out = append(out, 0x81)
	}
	out = append(out, byte(body), 0x02, byte(len(r)))
	out = append(out, r...)
	out = append(out, 0x02, byte(len(s)))
	return append(out, s...), nil
}

// derInt returns the DER INTEGER contents of the unsigned big-endian b:
// leading zeros removed, one zero added if the top bit is set; nil for zero.
func derInt(b []byte) []byte {
	for len(b) > 0 && b[0] == 0 {
		b = b[1:]
	}
	if len(b) == 0 {
		return nil
	}
	if b[0]&0x80 != 0 {
		return append([]byte{0}, b...)
	}
	return b
}

// selfTest signs random data and verifies the signature in software, so a
// key that cannot sign, or signs with another key than its public key says,
// is never handed out.
func (k *Key) selfTest(ctx context.Context) error {
	msg := make([]byte, 32)
	if _, err := rand.Read(msg); err != nil {
		return fmt.Errorf("self-test: %w", err)
	}
	digest := sha256.Sum256(msg)
	sig, err := k.SignContext(ctx, digest[:], crypto.SHA256)
	if err != nil {
		return fmt.Errorf("self-test: %w", err)
	}
	ok := false
	switch pub := k.pub.(type) {
	case *ecdsa.PublicKey:
		ok = ecdsa.VerifyASN1(pub, digest[:], sig)
	case *rsa.PublicKey:
		ok = rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig) == nil
	}
	if !ok {
		return errors.New("self-test: the token's signature does not verify with the key's public key")
	}
	return nil
}
