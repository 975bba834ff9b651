//go:build cgo

package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"

	"github.com/miekg/pkcs11"
)

// idLen is the length of a generated CKA_ID.
const idLen = 16

// maxLabelLen bounds labels; PKCS#11 has no limit but tokens do.
const maxLabelLen = 128

// DER encodings of the named-curve OIDs used as CKA_EC_PARAMS.
const (
	oidP256 = "\x06\x08\x2a\x86\x48\xce\x3d\x03\x01\x07"
	oidP384 = "\x06\x05\x2b\x81\x04\x00\x22"
)

// GenerateKey generates a key pair of type t on the token, labelled label,
// with a random 16-byte CKA_ID. The private key is a token object that is
// private, sensitive, not extractable and can only sign. It refuses to
// overwrite: an existing object with the label (or the ID) is ErrKeyExists.
// The new key's attributes are read back and a signature is made and
// verified; on any failure both objects are destroyed again.
func (h *HSM) GenerateKey(ctx context.Context, t KeyType, label string) (*Key, error) {
	if label == "" || len(label) > maxLabelLen {
		return nil, fmt.Errorf("generating %s key: label must be 1 to %d bytes", t, maxLabelLen)
	}
	mech, pubT, privT, err := keyTemplates(t)
	if err != nil {
		return nil, err
	}
	id := make([]byte, idLen)
	if _, err := rand.Read(id); err != nil {
		return nil, fmt.Errorf("generating %s key %q: random CKA_ID: %w", t, label, err)
	}
	common := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}
	pubT = append(pubT, common...)
	privT = append(privT, common...)

	h.objMu.Lock()
	defer h.objMu.Unlock()
	var pub, priv pkcs11.ObjectHandle
	err = h.do(ctx, func(s *session) error {
		for _, tmpl := range [][]*pkcs11.Attribute{
			{pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)},
			{pkcs11.NewAttribute(pkcs11.CKA_ID, id)},
		} {
			objs, err := h.findObjects(s, tmpl, 1)
			if err != nil {
				return err
			}
			if len(objs) > 0 {
				return fmt.Errorf("label %q: %w", label, ErrKeyExists)
			}
		}
		var err error
		pub, priv, err = h.mod.ctx.GenerateKeyPair(s.h, mech, pubT, privT)
		return p11err("C_GenerateKeyPair", err)
	})
	if err != nil {
		return nil, fmt.Errorf("generating %s key %q: %w", t, label, err)
	}
	k, err := h.newKey(ctx, KeyRef{ID: id, Label: label}, false)
	if err == nil {
		err = k.checkGenerated(ctx)
	}
	if err != nil {
		// No half-made keys: remove both objects again.
		derr := h.do(ctx, func(s *session) error {
			return errors.Join(p11err("C_DestroyObject", h.mod.ctx.DestroyObject(s.h, priv)),
				p11err("C_DestroyObject", h.mod.ctx.DestroyObject(s.h, pub)))
		})
		if derr != nil {
			err = errors.Join(err, fmt.Errorf("destroying the rejected key: %w", derr))
		}
		return nil, fmt.Errorf("generating %s key %q: %w", t, label, err)
	}
	h.log.Info("generated PKCS#11 key", "type", t.String(), "label", label, "id", fmt.Sprintf("%x", id))
	return k, nil
}

// checkGenerated verifies the attributes of a freshly generated key: made on
// the token, never extractable, sign only.
func (k *Key) checkGenerated(ctx context.Context) error {
	a, err := k.Attributes(ctx)
	if err != nil {
		return err
	}
	if err := a.HardwareBound(); err != nil {
		return err
	}
	if !a.Sign || a.Decrypt || a.Unwrap || a.Derive {
		return fmt.Errorf("key usage is not sign-only (sign=%t decrypt=%t unwrap=%t derive=%t)",
			a.Sign, a.Decrypt, a.Unwrap, a.Derive)
	}
	return nil
}

// keyTemplates returns the mechanism and the type-specific public and
// private templates for t.
func keyTemplates(t KeyType) ([]*pkcs11.Mechanism, []*pkcs11.Attribute, []*pkcs11.Attribute, error) {
	pub := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
	}
	priv := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
	}
	switch t {
	case ECP256, ECP384:
		oid := oidP256
		if t == ECP384 {
			oid = oidP384
		}
		pub = append(pub,
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC),
			pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, []byte(oid)))
		priv = append(priv, pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC))
		return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_EC_KEY_PAIR_GEN, nil)}, pub, priv, nil
	case RSA2048, RSA3072, RSA4096:
		bits := map[KeyType]int{RSA2048: 2048, RSA3072: 3072, RSA4096: 4096}[t]
		pub = append(pub,
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, bits),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}))
		priv = append(priv, pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA))
		return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)}, pub, priv, nil
	}
	return nil, nil, nil, fmt.Errorf("generating key: unsupported key type %s", t)
}

// FindKey finds the key pair ref names and returns it as a signer after a
// sign-and-verify self-test. A key whose attributes show it was imported or
// is extractable is refused with ErrKeyNotHardware unless the HSM was opened
// WithAllowImportedKeys.
func (h *HSM) FindKey(ctx context.Context, ref KeyRef) (*Key, error) {
	if len(ref.ID) == 0 && ref.Label == "" {
		return nil, errors.New("finding PKCS#11 key: the reference needs an ID or a label")
	}
	k, err := h.newKey(ctx, ref, !h.cfg.allowImported)
	if err != nil {
		return nil, fmt.Errorf("finding PKCS#11 key %s: %w", ref, err)
	}
	return k, nil
}

// newKey looks the key up, checks custody attributes if asked, and
// self-tests it.
func (h *HSM) newKey(ctx context.Context, ref KeyRef, requireHardware bool) (*Key, error) {
	var f *foundKey
	err := h.do(ctx, func(s *session) error {
		var err error
		f, err = h.lookup(s, ref)
		if err != nil {
			return err
		}
		f.gen = s.gen
		return nil
	})
	if err != nil {
		return nil, err
	}
	if requireHardware {
		if err := f.attrs.HardwareBound(); err != nil {
			return nil, err
		}
	}
	if !f.attrs.Sign {
		return nil, errors.New("the key does not allow signing (CKA_SIGN is false)")
	}
	k := &Key{hsm: h, id: f.id, label: f.label, pub: f.pub, requireHardware: requireHardware}
	k.handles.Store(&keyHandles{priv: f.priv, gen: f.gen})
	if err := k.selfTest(ctx); err != nil {
		return nil, err
	}
	return k, nil
}

// foundKey is what lookup finds.
type foundKey struct {
	priv  pkcs11.ObjectHandle
	id    []byte
	label string
	pub   crypto.PublicKey
	attrs KeyAttributes
	gen   uint64
}

// lookup finds the single private key matching ref, its public key (from
// the public object with the same CKA_ID, or for RSA from the private
// object) and its custody attributes.
func (h *HSM) lookup(s *session, ref KeyRef) (*foundKey, error) {
	tmpl := []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY)}
	if len(ref.ID) > 0 {
		tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_ID, ref.ID))
	}
	if ref.Label != "" {
		tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_LABEL, ref.Label))
	}
	objs, err := h.findObjects(s, tmpl, 2)
	if err != nil {
		return nil, err
	}
	switch len(objs) {
	case 0:
		return nil, ErrKeyNotFound
	case 1:
	default:
		return nil, errors.New("more than one private key matches; give both id and label")
	}
	priv := objs[0]
	attrs, err := h.mod.ctx.GetAttributeValue(s.h, priv, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_ID, nil),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil),
	})
	if err != nil {
		return nil, p11err("C_GetAttributeValue", err)
	}
	f := &foundKey{priv: priv, id: attrs[0].Value, label: string(attrs[1].Value)}
	keyType, err := attrUint(attrs[2].Value)
	if err != nil {
		return nil, fmt.Errorf("reading CKA_KEY_TYPE: %w", err)
	}
	if f.attrs, err = h.keyAttributes(s, priv); err != nil {
		return nil, err
	}
	var pubObj pkcs11.ObjectHandle
	if len(f.id) > 0 {
		pubs, err := h.findObjects(s, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_ID, f.id),
		}, 2)
		if err != nil {
			return nil, err
		}
		if len(pubs) > 1 {
			return nil, errors.New("more than one public key has this key's CKA_ID")
		}
		if len(pubs) == 1 {
			pubObj = pubs[0]
		}
	}
	switch keyType {
	case pkcs11.CKK_EC:
		if pubObj == 0 {
			return nil, errors.New("EC key has no public key object with its CKA_ID")
		}
		f.pub, err = h.ecPublicKey(s, pubObj)
	case pkcs11.CKK_RSA:
		obj := pubObj
		if obj == 0 {
			obj = priv // CKA_MODULUS and CKA_PUBLIC_EXPONENT are public on the private key too
		}
		f.pub, err = h.rsaPublicKey(s, obj)
	default:
		return nil, fmt.Errorf("unsupported key type 0x%X (want EC or RSA)", keyType)
	}
	if err != nil {
		return nil, err
	}
	return f, nil
}

// keyAttributes reads the custody attributes of a private key object.
func (h *HSM) keyAttributes(s *session, obj pkcs11.ObjectHandle) (KeyAttributes, error) {
	types := []uint{
		pkcs11.CKA_SENSITIVE, pkcs11.CKA_EXTRACTABLE, pkcs11.CKA_LOCAL, pkcs11.CKA_ALWAYS_SENSITIVE,
		pkcs11.CKA_NEVER_EXTRACTABLE, pkcs11.CKA_SIGN, pkcs11.CKA_DECRYPT, pkcs11.CKA_UNWRAP, pkcs11.CKA_DERIVE,
	}
	tmpl := make([]*pkcs11.Attribute, len(types))
	for i, t := range types {
		tmpl[i] = pkcs11.NewAttribute(t, nil)
	}
	got, err := h.mod.ctx.GetAttributeValue(s.h, obj, tmpl)
	if err != nil {
		return KeyAttributes{}, p11err("C_GetAttributeValue", err)
	}
	v := map[uint]bool{}
	for _, a := range got {
		v[a.Type] = len(a.Value) > 0 && a.Value[0] != 0
	}
	return KeyAttributes{
		Sensitive:        v[pkcs11.CKA_SENSITIVE],
		Extractable:      v[pkcs11.CKA_EXTRACTABLE],
		Local:            v[pkcs11.CKA_LOCAL],
		AlwaysSensitive:  v[pkcs11.CKA_ALWAYS_SENSITIVE],
		NeverExtractable: v[pkcs11.CKA_NEVER_EXTRACTABLE],
		Sign:             v[pkcs11.CKA_SIGN],
		Decrypt:          v[pkcs11.CKA_DECRYPT],
		Unwrap:           v[pkcs11.CKA_UNWRAP],
		Derive:           v[pkcs11.CKA_DERIVE],
	}, nil
}

func (h *HSM) ecPublicKey(s *session, obj pkcs11.ObjectHandle) (*ecdsa.PublicKey, error) {
	attrs, err := h.mod.ctx.GetAttributeValue(s.h, obj, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, nil),
		pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, nil),
	})
	if err != nil {
		return nil, p11err("C_GetAttributeValue", err)
	}
	return parseECPublicKey(attrs[0].Value, attrs[1].Value)
}

// parseECPublicKey decodes CKA_EC_PARAMS (a named-curve OID) and CKA_EC_POINT,
// which tokens return either as the DER OCTET STRING PKCS#11 specifies or as
// the raw uncompressed point.
func parseECPublicKey(params, point []byte) (*ecdsa.PublicKey, error) {
	var curve elliptic.Curve
	switch {
	case string(params) == oidP256:
		curve = elliptic.P256()
	case string(params) == oidP384:
		curve = elliptic.P384()
	default:
		return nil, fmt.Errorf("unsupported EC curve (CKA_EC_PARAMS %x; want P-256 or P-384)", params)
	}
	rawLen := 1 + 2*((curve.Params().BitSize+7)/8)
	var inner []byte
	if rest, err := asn1.Unmarshal(point, &inner); err == nil && len(rest) == 0 && len(inner) == rawLen {
		point = inner
	}
	if len(point) != rawLen {
		return nil, fmt.Errorf("CKA_EC_POINT has %d bytes, want a %d-byte uncompressed point, raw or DER-wrapped",
			len(point), rawLen)
	}
	pub, err := ecdsa.ParseUncompressedPublicKey(curve, point)
	if err != nil {
		return nil, fmt.Errorf("parsing CKA_EC_POINT: %w", err)
	}
	return pub, nil
}

func (h *HSM) rsaPublicKey(s *session, obj pkcs11.ObjectHandle) (*rsa.PublicKey, error) {
	attrs, err := h.mod.ctx.GetAttributeValue(s.h, obj, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, nil),
	})
	if err != nil {
		return nil, p11err("C_GetAttributeValue", err)
	}
	return parseRSAPublicKey(attrs[0].Value, attrs[1].Value)
}

func parseRSAPublicKey(modulus, exponent []byte) (*rsa.PublicKey, error) {
	n := new(big.Int).SetBytes(modulus)
	if n.BitLen() < 2048 || n.BitLen() > 8192 {
		return nil, fmt.Errorf("RSA modulus of %d bits (want 2048 to 8192)", n.BitLen())
	}
	e := new(big.Int).SetBytes(exponent)
	if !e.IsInt64() || e.Int64() < 3 || e.Int64() > 1<<31-1 || e.Bit(0) == 0 {
		return nil, errors.New("RSA public exponent out of range")
	}
	return &rsa.PublicKey{N: n, E: int(e.Int64())}, nil
}

// attrUint decodes a CK_ULONG attribute (native byte order and size).
func attrUint(b []byte) (uint, error) {
	switch len(b) {
	case 8:
		return uint(binary.NativeEndian.Uint64(b)), nil
	case 4:
		return uint(binary.NativeEndian.Uint32(b)), nil
	}
	return 0, fmt.Errorf("CK_ULONG of %d bytes", len(b))
}

// findObjects returns up to max objects matching tmpl.
func (h *HSM) findObjects(s *session, tmpl []*pkcs11.Attribute, max int) ([]pkcs11.ObjectHandle, error) {
	if err := h.mod.ctx.FindObjectsInit(s.h, tmpl); err != nil {
		return nil, p11err("C_FindObjectsInit", err)
	}
	objs, _, err := h.mod.ctx.FindObjects(s.h, max)
	ferr := h.mod.ctx.FindObjectsFinal(s.h)
	if err != nil {
		return nil, p11err("C_FindObjects", err)
	}
	if ferr != nil {
		return nil, p11err("C_FindObjectsFinal", ferr)
	}
	return objs, nil
}

// Keys lists the private keys on the token.
func (h *HSM) Keys(ctx context.Context) ([]KeyRef, error) {
	var refs []KeyRef
	err := h.do(ctx, func(s *session) error {
		refs = refs[:0]
		tmpl := []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY)}
		if err := h.mod.ctx.FindObjectsInit(s.h, tmpl); err != nil {
			return p11err("C_FindObjectsInit", err)
		}
		var objs []pkcs11.ObjectHandle
		for {
			batch, _, err := h.mod.ctx.FindObjects(s.h, 64)
			if err != nil {
				_ = h.mod.ctx.FindObjectsFinal(s.h)
				return p11err("C_FindObjects", err)
			}
			if len(batch) == 0 {
				break
			}
			objs = append(objs, batch...)
		}
		if err := h.mod.ctx.FindObjectsFinal(s.h); err != nil {
			return p11err("C_FindObjectsFinal", err)
		}
		for _, o := range objs {
			attrs, err := h.mod.ctx.GetAttributeValue(s.h, o, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_ID, nil),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil),
			})
			if err != nil {
				return p11err("C_GetAttributeValue", err)
			}
			refs = append(refs, KeyRef{ID: attrs[0].Value, Label: string(attrs[1].Value)})
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("listing PKCS#11 keys: %w", err)
	}
	return refs, nil
}

// DestroyKey destroys the private key ref names and the public key objects
// with its CKA_ID. It is irreversible: rotate to a new key first and keep a
// retired key until everything it signed has expired.
func (h *HSM) DestroyKey(ctx context.Context, ref KeyRef) error {
	if len(ref.ID) == 0 && ref.Label == "" {
		return errors.New("destroying PKCS#11 key: the reference needs an ID or a label")
	}
	h.objMu.Lock()
	defer h.objMu.Unlock()
	err := h.do(ctx, func(s *session) error {
		tmpl := []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY)}
		if len(ref.ID) > 0 {
			tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_ID, ref.ID))
		}
		if ref.Label != "" {
			tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_LABEL, ref.Label))
		}
		privs, err := h.findObjects(s, tmpl, 2)
		if err != nil {
			return err
		}
		switch len(privs) {
		case 0:
			return ErrKeyNotFound
		case 1:
		default:
			return errors.New("more than one private key matches; give both id and label")
		}
		attrs, err := h.mod.ctx.GetAttributeValue(s.h, privs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ID, nil)})
		if err != nil {
			return p11err("C_GetAttributeValue", err)
		}
		var pubs []pkcs11.ObjectHandle
		if id := attrs[0].Value; len(id) > 0 {
			if pubs, err = h.findObjects(s, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
				pkcs11.NewAttribute(pkcs11.CKA_ID, id),
			}, 16); err != nil {
				return err
			}
		}
		if err := h.mod.ctx.DestroyObject(s.h, privs[0]); err != nil {
			return p11err("C_DestroyObject", err)
		}
		for _, p := range pubs {
			if err := h.mod.ctx.DestroyObject(s.h, p); err != nil {
				return p11err("C_DestroyObject", err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("destroying PKCS#11 key %s: %w", ref, err)
	}
	h.log.Info("destroyed PKCS#11 key", "key", ref.String())
	return nil
}
