package tpm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// TCG EK Credential Profile NV indices and persistent handles.
const (
	nvEKCertRSA2048 = 0x01c00002
	nvEKCertP256    = 0x01c0000a
	nvEKCertP384    = 0x01c00016
	nvEKChainFirst  = 0x01c00100
	nvEKChainLast   = 0x01c001ff

	ekHandleRSA2048 = 0x81010001
	ekHandleP256    = 0x81010002
	ekHandleP384    = 0x81010016 // where swtpm_setup persists its P-384 EK
)

// EK algorithm names, as EK.Algorithm reports them.
const (
	AlgRSA2048 = "rsa2048"
	AlgP256    = "ecc-p256"
	AlgP384    = "ecc-p384"
)

// EK is an endorsement key of the TPM.
type EK struct {
	// Algorithm is AlgRSA2048, AlgP256 or AlgP384.
	Algorithm string
	// Public is the EK's public key (*rsa.PublicKey or *ecdsa.PublicKey).
	Public crypto.PublicKey
	// PublicArea is the EK's TPMT_PUBLIC as TPM2_ReadPublic returns it.
	PublicArea []byte
	// Certificate is the DER EK certificate from NV (TCG header and
	// padding removed), empty when the TPM has none for this EK.
	Certificate []byte
	// Intermediates are DER CA certificates stored on the TPM beside the EK
	// certificates (NV 0x01c00100–0x01c001ff).
	Intermediates [][]byte
	// Handle is the EK's persistent handle, 0 when the TPM has none and the
	// EK is re-created from the TCG default template when needed.
	Handle uint32
}

// Hash returns the lowercase hex SHA-256 of the EK public key's PKIX DER,
// the node's identity in Ironroot (agent ID and tpm:ek_hash selector).
func (ek EK) Hash() (string, error) {
	der, err := x509.MarshalPKIXPublicKey(ek.Public)
	if err != nil {
		return "", fmt.Errorf("encoding EK public key: %w", err)
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:]), nil
}

type ekSlot struct {
	alg    string
	nv     uint32
	handle uint32
}

// ekSlots lists the EKs looked for, in the order EndorsementKeys returns them.
func ekSlots() []ekSlot {
	return []ekSlot{
		{AlgRSA2048, nvEKCertRSA2048, ekHandleRSA2048},
		{AlgP256, nvEKCertP256, ekHandleP256},
		{AlgP384, nvEKCertP384, ekHandleP384},
	}
}

// ekTemplate returns the TCG default (low range) EK template for alg, nil
// when there is none in go-tpm (P-384: only a persisted EK is used).
func ekTemplate(alg string) *tpm2.TPMTPublic {
	var t tpm2.TPMTPublic
	switch alg {
	case AlgRSA2048:
		t = tpm2.RSAEKTemplate
	case AlgP256:
		t = tpm2.ECCEKTemplate
	default:
		return nil
	}
	return &t
}

// EndorsementKeys returns the TPM's EKs: RSA-2048 (always; created from the
// TCG template when not persisted), and ECC P-256 and P-384 where the TPM
// has a persisted key or a certificate for them.
func (t *TPM) EndorsementKeys(ctx context.Context) ([]EK, error) {
	var eks []EK
	err := t.do(ctx, func() error {
		chain := t.readEKChain()
		for _, slot := range ekSlots() {
			cert, err := t.readNVCert(slot.nv)
			if err != nil {
				t.log.Warn("reading EK certificate", "nv", fmt.Sprintf("0x%08x", slot.nv), "error", err)
			}
			ek, ok, err := t.readEK(slot, cert != nil)
			if err != nil {
				return err
			}
			if !ok {
				continue
			}
			ek.Certificate, ek.Intermediates = cert, chain
			eks = append(eks, ek)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return eks, nil
}

// readEK reads the persisted EK of a slot, or creates it from the template
// (RSA always, ECC when a certificate says the EK exists).
func (t *TPM) readEK(slot ekSlot, haveCert bool) (EK, bool, error) {
	rp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(slot.handle)}.Execute(t.conn)
	if err == nil {
		ek, err := newEK(slot.alg, rp.OutPublic.Bytes())
		if err != nil {
			return EK{}, false, fmt.Errorf("reading EK at 0x%08x: %w", slot.handle, err)
		}
		ek.Handle = slot.handle
		return ek, true, nil
	}
	if !isHandleMissing(err) {
		return EK{}, false, fmt.Errorf("reading EK at 0x%08x: %w", slot.handle, err)
	}
	tmpl := ekTemplate(slot.alg)
	if tmpl == nil || (slot.alg != AlgRSA2048 && !haveCert) {
		return EK{}, false, nil
	}
	h, pub, err := t.createEK(tmpl)
	if err != nil {
		return EK{}, false, err
	}
	t.flush(h.Handle)
	ek, err := newEK(slot.alg, pub)
	if err != nil {
		return EK{}, false, fmt.Errorf("creating %s EK: %w", slot.alg, err)
	}
	return ek, true, nil
}

func (t *TPM) createEK(tmpl *tpm2.TPMTPublic) (tpm2.NamedHandle, []byte, error) {
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(*tmpl),
	}.Execute(t.conn)
	if err != nil {
		return tpm2.NamedHandle{}, nil, fmt.Errorf("creating EK from the TCG template: %w", err)
	}
	return tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}, rsp.OutPublic.Bytes(), nil
}

// ErrForeignEK is returned by AK.ActivateCredential for an EK that is not
// one of this TPM's (not what EndorsementKeys returns).
var ErrForeignEK = errors.New("the EK is not this TPM's")

// ekHandle makes the EK usable for one operation; the returned function
// releases it (flushes a template-created EK). It refuses an EK whose public
// area differs from the TPM's own at that handle or from that template: a
// credential activated against a foreign EK can only fail, and swtpm was seen
// to enter failure mode on it.
func (t *TPM) ekHandle(ek EK) (tpm2.NamedHandle, *tpm2.TPMTPublic, func(), error) {
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](ek.PublicArea)
	if err != nil {
		return tpm2.NamedHandle{}, nil, nil, fmt.Errorf("decoding EK public area: %w", err)
	}
	if ek.Handle != 0 {
		if !isEKHandle(ek.Handle) {
			return tpm2.NamedHandle{}, nil, nil, fmt.Errorf("0x%08x is not an EK handle: %w", ek.Handle, ErrForeignEK)
		}
		rp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(ek.Handle)}.Execute(t.conn)
		if err != nil {
			if isHandleMissing(err) {
				return tpm2.NamedHandle{}, nil, nil, fmt.Errorf("no EK at 0x%08x: %w", ek.Handle, ErrForeignEK)
			}
			return tpm2.NamedHandle{}, nil, nil, fmt.Errorf("reading EK at 0x%08x: %w", ek.Handle, err)
		}
		if !bytes.Equal(rp.OutPublic.Bytes(), ek.PublicArea) {
			return tpm2.NamedHandle{}, nil, nil, fmt.Errorf("EK at 0x%08x differs: %w", ek.Handle, ErrForeignEK)
		}
		return tpm2.NamedHandle{Handle: tpm2.TPMHandle(ek.Handle), Name: rp.Name}, pub, func() {}, nil
	}
	tmpl := ekTemplate(ek.Algorithm)
	if tmpl == nil {
		return tpm2.NamedHandle{}, nil, nil, fmt.Errorf("%s EK has no persistent handle and no default template", ek.Algorithm)
	}
	h, area, err := t.createEK(tmpl)
	if err != nil {
		return tpm2.NamedHandle{}, nil, nil, err
	}
	if !bytes.Equal(area, ek.PublicArea) {
		t.flush(h.Handle)
		return tpm2.NamedHandle{}, nil, nil, fmt.Errorf("%s EK from the TCG template differs: %w", ek.Algorithm, ErrForeignEK)
	}
	return h, pub, func() { t.flush(h.Handle) }, nil
}

// isEKHandle reports whether h is a persistent handle EndorsementKeys
// returns; nothing else is used as an EK.
func isEKHandle(h uint32) bool {
	for _, s := range ekSlots() {
		if s.handle == h {
			return true
		}
	}
	return false
}

func newEK(alg string, publicArea []byte) (EK, error) {
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](publicArea)
	if err != nil {
		return EK{}, fmt.Errorf("decoding public area: %w", err)
	}
	key, err := tpm2.Pub(*pub)
	if err != nil {
		return EK{}, fmt.Errorf("decoding public key: %w", err)
	}
	return EK{Algorithm: alg, Public: key, PublicArea: publicArea}, nil
}

func isHandleMissing(err error) bool {
	return errors.Is(err, tpm2.TPMRCHandle) || errors.Is(err, tpm2.TPMRCValue)
}

// readNVCert reads and unwraps a certificate from an NV index; nil, nil
// when the index is not defined.
func (t *TPM) readNVCert(index uint32) ([]byte, error) {
	b, err := t.readNV(index)
	if err != nil || b == nil {
		return nil, err
	}
	return certFromNV(b)
}

// readNV reads a whole NV index, nil when it is not defined.
func (t *TPM) readNV(index uint32) ([]byte, error) {
	pub, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}.Execute(t.conn)
	if err != nil {
		if isHandleMissing(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("reading NV 0x%08x public area: %w", index, err)
	}
	nv, err := pub.NVPublic.Contents()
	if err != nil {
		return nil, fmt.Errorf("decoding NV 0x%08x public area: %w", index, err)
	}
	nvHandle := tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: pub.NVName}
	// EK certificate indices are readable with their own (empty) auth;
	// some TPMs only allow owner reads.
	auth := tpm2.AuthHandle{Handle: nvHandle.Handle, Name: nvHandle.Name, Auth: tpm2.PasswordAuth(nil)}
	if !nv.Attributes.AuthRead && nv.Attributes.OwnerRead {
		auth = tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)}
	}
	chunk := t.nvBufferMax()
	out := make([]byte, 0, nv.DataSize)
	for off := uint16(0); off < nv.DataSize; {
		n := min(nv.DataSize-off, chunk)
		rsp, err := tpm2.NVRead{AuthHandle: auth, NVIndex: nvHandle, Size: n, Offset: off}.Execute(t.conn)
		if err != nil {
			return nil, fmt.Errorf("reading NV 0x%08x: %w", index, err)
		}
		if len(rsp.Data.Buffer) == 0 {
			return nil, fmt.Errorf("reading NV 0x%08x: empty read at offset %d", index, off)
		}
		out = append(out, rsp.Data.Buffer...)
		off += uint16(len(rsp.Data.Buffer))
	}
	return out, nil
}

// nvBufferMax returns TPM_PT_NV_BUFFER_MAX, or a size every TPM accepts.
func (t *TPM) nvBufferMax() uint16 {
	const fallback = 512
	rsp, err := tpm2.GetCapability{
		Capability: tpm2.TPMCapTPMProperties, Property: uint32(tpm2.TPMPTNVBufferMax), PropertyCount: 1,
	}.Execute(t.conn)
	if err != nil {
		return fallback
	}
	props, err := rsp.CapabilityData.Data.TPMProperties()
	if err != nil || len(props.TPMProperty) == 0 || props.TPMProperty[0].Property != tpm2.TPMPTNVBufferMax {
		return fallback
	}
	v := props.TPMProperty[0].Value
	if v == 0 || v > 4096 {
		return fallback
	}
	return uint16(v)
}

// readEKChain reads the CA certificates in NV 0x01c00100–0x01c001ff. A
// certificate that does not read or parse is logged and skipped: the chain
// only offers intermediates, the verifier decides.
func (t *TPM) readEKChain() [][]byte {
	rsp, err := tpm2.GetCapability{
		Capability: tpm2.TPMCapHandles, Property: nvEKChainFirst, PropertyCount: nvEKChainLast - nvEKChainFirst + 1,
	}.Execute(t.conn)
	if err != nil {
		t.log.Debug("listing EK chain NV indices", "error", err)
		return nil
	}
	hs, err := rsp.CapabilityData.Data.Handles()
	if err != nil {
		return nil
	}
	var chain [][]byte
	for _, h := range hs.Handle {
		if uint32(h) < nvEKChainFirst || uint32(h) > nvEKChainLast {
			continue
		}
		cert, err := t.readNVCert(uint32(h))
		if err != nil || cert == nil {
			t.log.Warn("reading EK chain certificate", "nv", fmt.Sprintf("0x%08x", uint32(h)), "error", err)
			continue
		}
		chain = append(chain, cert)
	}
	return chain
}

// certFromNV extracts the DER certificate from an NV index's contents:
// removes the TCG PC Client header `10 01 <len16>` some platforms write,
// and cuts trailing padding after the outer SEQUENCE.
func certFromNV(b []byte) ([]byte, error) {
	if len(b) >= 4 && b[0] == 0x10 && b[1] == 0x01 {
		n := int(b[2])<<8 | int(b[3])
		if n > len(b)-4 {
			return nil, fmt.Errorf("EK certificate NV header says %d bytes, have %d", n, len(b)-4)
		}
		b = b[4 : 4+n]
	}
	n, err := derLength(b)
	if err != nil {
		return nil, fmt.Errorf("EK certificate: %w", err)
	}
	return append([]byte(nil), b[:n]...), nil
}

// derLength returns the total length of the DER SEQUENCE at the start of b.
func derLength(b []byte) (int, error) {
	if len(b) < 2 || b[0] != 0x30 {
		return 0, errors.New("not a DER SEQUENCE")
	}
	hdr, l := 2, int(b[1])
	if l >= 0x80 {
		k := l & 0x7f
		if k == 0 || k > 3 || len(b) < 2+k {
			return 0, errors.New("unsupported DER length encoding")
		}
		l = 0
		for _, c := range b[2 : 2+k] {
			l = l<<8 | int(c)
		}
		hdr += k
	}
	if l > len(b)-hdr {
		return 0, fmt.Errorf("DER SEQUENCE of %d bytes truncated to %d", l, len(b)-hdr)
	}
	return hdr + l, nil
}
