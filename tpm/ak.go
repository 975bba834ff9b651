package tpm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"

	"github.com/google/go-tpm/tpm2"
)

// maxNonceSize is the largest qualifying data every TPM accepts in a quote
// or certification (TPM2B_DATA holds a TPMT_HA: 2 + 64 bytes).
const maxNonceSize = 64

// quoteAttempts bounds the quote/PCR-read retries when a PCR changes in
// between (rust-keylime uses 5).
const quoteAttempts = 5

// ecdsaSHA256 is the signature scheme of the AK and of certifications.
func ecdsaSHA256() tpm2.TPMTSigScheme {
	return tpm2.TPMTSigScheme{
		Scheme:  tpm2.TPMAlgECDSA,
		Details: tpm2.NewTPMUSigScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSchemeHash{HashAlg: tpm2.TPMAlgSHA256}),
	}
}

// akTemplate is a restricted ECDSA P-256 signing key: it signs only
// TPM-generated structures (quotes, certifications), never arbitrary
// digests, which is what makes its signatures evidence.
func akTemplate() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:            true,
			FixedParent:         true,
			SensitiveDataOrigin: true,
			UserWithAuth:        true,
			NoDA:                true,
			Restricted:          true,
			SignEncrypt:         true,
		},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme: tpm2.TPMTECCScheme{
				Scheme:  tpm2.TPMAlgECDSA,
				Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
			},
			CurveID: tpm2.TPMECCNistP256,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
	}
}

// AK is an attestation key: a restricted ECDSA P-256 signing key under an
// endorsement-hierarchy primary (so its quotes carry unobfuscated reset and
// restart counts), certified at creation by TPM2_CertifyCreation.
type AK struct {
	tpm    *TPM
	obj    object
	params AttestationKey
	pub    crypto.PublicKey
	closed bool // guarded by tpm.mu
}

// NewAK creates an attestation key.
func (t *TPM) NewAK(ctx context.Context) (*AK, error) {
	ak := &AK{tpm: t}
	err := t.do(ctx, func() error {
		parent, err := t.loadPrimary(&t.ekParent)
		if err != nil {
			return err
		}
		defer t.flush(parent.Handle)
		created, err := tpm2.Create{
			ParentHandle: tpm2.AuthHandle{Handle: parent.Handle, Name: parent.Name, Auth: tpm2.PasswordAuth(nil)},
			InPublic:     tpm2.New2B(akTemplate()),
		}.Execute(t.conn)
		if err != nil {
			return fmt.Errorf("creating AK: %w", err)
		}
		loaded, err := tpm2.Load{
			ParentHandle: tpm2.AuthHandle{Handle: parent.Handle, Name: parent.Name, Auth: tpm2.PasswordAuth(nil)},
			InPrivate:    created.OutPrivate,
			InPublic:     created.OutPublic,
		}.Execute(t.conn)
		if err != nil {
			return fmt.Errorf("loading AK: %w", err)
		}
		defer t.flush(loaded.ObjectHandle)
		cc, err := tpm2.CertifyCreation{
			SignHandle:     tpm2.AuthHandle{Handle: loaded.ObjectHandle, Name: loaded.Name, Auth: tpm2.PasswordAuth(nil)},
			ObjectHandle:   tpm2.NamedHandle{Handle: loaded.ObjectHandle, Name: loaded.Name},
			CreationHash:   created.CreationHash,
			InScheme:       ecdsaSHA256(),
			CreationTicket: created.CreationTicket,
		}.Execute(t.conn)
		if err != nil {
			return fmt.Errorf("certifying AK creation: %w", err)
		}
		saved, err := tpm2.ContextSave{SaveHandle: loaded.ObjectHandle}.Execute(t.conn)
		if err != nil {
			return fmt.Errorf("saving AK context: %w", err)
		}
		pubArea, err := created.OutPublic.Contents()
		if err != nil {
			return fmt.Errorf("decoding AK public area: %w", err)
		}
		if ak.pub, err = tpm2.Pub(*pubArea); err != nil {
			return fmt.Errorf("decoding AK public key: %w", err)
		}
		ak.obj = object{parent: &t.ekParent, public: created.OutPublic, private: created.OutPrivate, name: loaded.Name, saved: &saved.Context}
		ak.params = AttestationKey{
			Public:            created.OutPublic.Bytes(),
			CreateData:        created.CreationData.Bytes(),
			CreateAttestation: cc.CertifyInfo.Bytes(),
			CreateSignature:   tpm2.Marshal(cc.Signature),
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return ak, nil
}

// AttestationParameters returns the AK's creation evidence.
func (ak *AK) AttestationParameters() AttestationKey { return ak.params }

// Public returns the AK's public key (*ecdsa.PublicKey).
func (ak *AK) Public() crypto.PublicKey { return ak.pub }

// Name returns the AK's TPM name (nameAlg || digest of its public area),
// which a credential challenge is bound to.
func (ak *AK) Name() []byte { return slices.Clone(ak.obj.name.Buffer) }

// Identity returns the first message of the attestation protocol for ek.
func (ak *AK) Identity(ek EK) Identity {
	return Identity{
		EKPublic:        slices.Clone(ek.PublicArea),
		EKCertificate:   slices.Clone(ek.Certificate),
		EKIntermediates: ek.Intermediates,
		AK:              ak.params,
	}
}

// Close forgets the AK. Nothing stays loaded in the TPM between calls, so
// there is nothing to flush; later calls fail.
func (ak *AK) Close() error {
	ak.tpm.mu.Lock()
	defer ak.tpm.mu.Unlock()
	ak.closed = true
	return nil
}

var errAKClosed = errors.New("AK is closed")

// ActivateCredential recovers the secret of a credential challenge made for
// this AK and ek: only this TPM can, and only if the AK's name is the one
// the challenge is bound to. Works with RSA and ECC EKs.
func (ak *AK) ActivateCredential(ctx context.Context, ek EK, ch CredentialChallenge) (ActivationProof, error) {
	if len(ch.Credential) == 0 || len(ch.Secret) == 0 {
		return ActivationProof{}, errors.New("activating credential: empty challenge")
	}
	t := ak.tpm
	var proof ActivationProof
	err := t.do(ctx, func() error {
		if ak.closed {
			return errAKClosed
		}
		ekh, ekPub, release, err := t.ekHandle(ek)
		if err != nil {
			return fmt.Errorf("activating credential: %w", err)
		}
		defer release()
		akh, err := t.load(&ak.obj)
		if err != nil {
			return fmt.Errorf("activating credential: %w", err)
		}
		defer t.flush(akh.Handle)
		ekAuth, closeAuth, err := t.ekAuth(ekPub)
		if err != nil {
			return fmt.Errorf("activating credential: %w", err)
		}
		defer closeAuth()
		rsp, err := tpm2.ActivateCredential{
			ActivateHandle: tpm2.AuthHandle{Handle: akh.Handle, Name: akh.Name, Auth: tpm2.PasswordAuth(nil)},
			KeyHandle:      tpm2.AuthHandle{Handle: ekh.Handle, Name: ekh.Name, Auth: ekAuth},
			CredentialBlob: tpm2.TPM2BIDObject{Buffer: ch.Credential},
			Secret:         tpm2.TPM2BEncryptedSecret{Buffer: ch.Secret},
		}.Execute(t.conn)
		if err != nil {
			return fmt.Errorf("activating credential: %w", err)
		}
		proof.Secret = rsp.CertInfo.Buffer
		return nil
	})
	return proof, err
}

// ekAuth returns the session that authorizes use of the EK. The TCG
// low-range templates (RSA-2048, P-256) clear userWithAuth and need
// PolicySecret(endorsement) in the EK's name algorithm; swtpm's P-384 EK sets
// userWithAuth, so its empty password suffices. The returned function
// flushes the session.
func (t *TPM) ekAuth(ekPub *tpm2.TPMTPublic) (tpm2.Session, func(), error) {
	if ekPub.ObjectAttributes.UserWithAuth {
		return tpm2.PasswordAuth(nil), func() {}, nil
	}
	sess, closeSess, err := tpm2.PolicySession(t.conn, ekPub.NameAlg, 16)
	if err != nil {
		return nil, nil, fmt.Errorf("starting EK policy session: %w", err)
	}
	// The session is flushed by the TPM when the command using it
	// succeeds (continueSession is clear), so a flush error then is moot.
	release := func() { _ = closeSess() }
	if _, err := (tpm2.PolicySecret{
		AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		PolicySession: sess.Handle(),
		NonceTPM:      sess.NonceTPM(),
	}).Execute(t.conn); err != nil {
		release()
		return nil, nil, fmt.Errorf("EK policy: PolicySecret(endorsement): %w", err)
	}
	return sess, release, nil
}

// PCRSelection selects PCRs of one bank. The zero value selects sha256 PCRs
// 0–7.
type PCRSelection struct {
	// Alg is the bank: "sha1", "sha256" (default), "sha384" or "sha512".
	Alg string
	// PCRs are the indices (0–23); empty means 0–7.
	PCRs []int
}

// DefaultPCRSelection returns sha256 PCRs 0–7: firmware, option ROMs,
// boot loader and Secure Boot policy.
func DefaultPCRSelection() PCRSelection {
	return PCRSelection{Alg: "sha256", PCRs: []int{0, 1, 2, 3, 4, 5, 6, 7}}
}

// pcrBank maps a PCR bank name to its TPM hash algorithm.
func pcrBank(name string) (tpm2.TPMIAlgHash, bool) {
	switch name {
	case "sha1":
		return tpm2.TPMAlgSHA1, true
	case "sha256":
		return tpm2.TPMAlgSHA256, true
	case "sha384":
		return tpm2.TPMAlgSHA384, true
	case "sha512":
		return tpm2.TPMAlgSHA512, true
	}
	return 0, false
}

// resolve validates the selection, applies defaults and returns the bank
// and the sorted, de-duplicated indices.
func (s PCRSelection) resolve() (string, tpm2.TPMIAlgHash, []uint, error) {
	def := DefaultPCRSelection()
	name := s.Alg
	if name == "" {
		name = def.Alg
	}
	alg, ok := pcrBank(name)
	if !ok {
		return "", 0, nil, fmt.Errorf("unknown PCR bank %q", s.Alg)
	}
	idx := s.PCRs
	if len(idx) == 0 {
		idx = def.PCRs
	}
	out := make([]uint, 0, len(idx))
	for _, i := range idx {
		if i < 0 || i > 23 {
			return "", 0, nil, fmt.Errorf("PCR index %d out of range 0–23", i)
		}
		out = append(out, uint(i))
	}
	slices.Sort(out)
	return name, alg, slices.Compact(out), nil
}

// Quote quotes the selected PCRs with nonce (1–64 bytes, the server's) as
// qualifying data and returns the PCR values the quote covers. PCRs are
// read after the quote and the pair retried until the values match the
// quoted digest, since a PCR may be extended in between.
func (ak *AK) Quote(ctx context.Context, nonce []byte, sel PCRSelection) (Quote, []PCR, error) {
	if len(nonce) == 0 || len(nonce) > maxNonceSize {
		return Quote{}, nil, fmt.Errorf("quoting: nonce must be 1–%d bytes, got %d", maxNonceSize, len(nonce))
	}
	bank, alg, idx, err := sel.resolve()
	if err != nil {
		return Quote{}, nil, fmt.Errorf("quoting: %w", err)
	}
	pcrSel := tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
		{Hash: alg, PCRSelect: tpm2.PCClientCompatible.PCRs(idx...)},
	}}
	t := ak.tpm
	var (
		q    Quote
		pcrs []PCR
	)
	err = t.do(ctx, func() error {
		if ak.closed {
			return errAKClosed
		}
		akh, err := t.load(&ak.obj)
		if err != nil {
			return fmt.Errorf("quoting: %w", err)
		}
		defer t.flush(akh.Handle)
		for attempt := 1; attempt <= quoteAttempts; attempt++ {
			rsp, err := tpm2.Quote{
				SignHandle:     tpm2.AuthHandle{Handle: akh.Handle, Name: akh.Name, Auth: tpm2.PasswordAuth(nil)},
				QualifyingData: tpm2.TPM2BData{Buffer: nonce},
				InScheme:       ecdsaSHA256(),
				PCRSelect:      pcrSel,
			}.Execute(t.conn)
			if err != nil {
				return fmt.Errorf("quoting: %w", err)
			}
			attest, err := rsp.Quoted.Contents()
			if err != nil {
				return fmt.Errorf("quoting: decoding attestation: %w", err)
			}
			info, err := attest.Attested.Quote()
			if err != nil {
				return fmt.Errorf("quoting: decoding quote info: %w", err)
			}
			values, err := t.readPCRs(alg, idx)
			if err != nil {
				return fmt.Errorf("quoting: %w", err)
			}
			// The quote's PCR digest uses the AK scheme's hash, SHA-256.
			h := sha256.New()
			for _, v := range values {
				h.Write(v)
			}
			if !bytes.Equal(h.Sum(nil), info.PCRDigest.Buffer) {
				t.log.Debug("PCRs changed between quote and read, retrying", "attempt", attempt)
				continue
			}
			q = Quote{Attest: rsp.Quoted.Bytes(), Signature: tpm2.Marshal(rsp.Signature)}
			pcrs = make([]PCR, len(idx))
			for i, n := range idx {
				pcrs[i] = PCR{Index: int(n), Alg: bank, Digest: values[i]}
			}
			return nil
		}
		return fmt.Errorf("quoting: PCRs kept changing between quote and read (%d attempts)", quoteAttempts)
	})
	if err != nil {
		return Quote{}, nil, err
	}
	return q, pcrs, nil
}

// ReadPCRs reads PCR values of one bank, in ascending index order.
func (t *TPM) ReadPCRs(ctx context.Context, sel PCRSelection) ([]PCR, error) {
	bank, alg, idx, err := sel.resolve()
	if err != nil {
		return nil, fmt.Errorf("reading PCRs: %w", err)
	}
	var pcrs []PCR
	err = t.do(ctx, func() error {
		values, err := t.readPCRs(alg, idx)
		if err != nil {
			return err
		}
		for i, n := range idx {
			pcrs = append(pcrs, PCR{Index: int(n), Alg: bank, Digest: values[i]})
		}
		return nil
	})
	return pcrs, err
}

// readPCRs reads the PCRs idx (sorted) of bank alg. TPM2_PCR_Read returns
// at most 8 digests per call, so it loops until all were returned.
func (t *TPM) readPCRs(alg tpm2.TPMIAlgHash, idx []uint) ([][]byte, error) {
	values := make(map[uint][]byte, len(idx))
	remaining := slices.Clone(idx)
	for len(remaining) > 0 {
		rsp, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
			{Hash: alg, PCRSelect: tpm2.PCClientCompatible.PCRs(remaining...)},
		}}}.Execute(t.conn)
		if err != nil {
			return nil, fmt.Errorf("reading PCRs: %w", err)
		}
		var got []uint
		for _, s := range rsp.PCRSelectionOut.PCRSelections {
			if s.Hash != alg {
				continue
			}
			for i, b := range s.PCRSelect {
				for bit := 0; bit < 8; bit++ {
					if b&(1<<bit) != 0 {
						got = append(got, uint(i*8+bit))
					}
				}
			}
		}
		if len(got) == 0 || len(got) != len(rsp.PCRValues.Digests) {
			return nil, fmt.Errorf("reading PCRs: bank %v not available", alg)
		}
		for i, n := range got {
			values[n] = rsp.PCRValues.Digests[i].Buffer
		}
		before := len(remaining)
		remaining = slices.DeleteFunc(remaining, func(n uint) bool { _, ok := values[n]; return ok })
		if len(remaining) == before {
			return nil, errors.New("reading PCRs: TPM returned none of the requested PCRs")
		}
	}
	out := make([][]byte, len(idx))
	for i, n := range idx {
		out[i] = values[n]
	}
	return out, nil
}

// Attest answers the server's nonce (the protocol's second round trip): a
// quote over sel, the quoted PCR values, the platform's event log, and a
// new TPM-resident key certified by the AK over the same nonce. The caller
// keeps the key (it becomes the agent's SVID key) and may Marshal it.
func (ak *AK) Attest(ctx context.Context, nonce []byte, sel PCRSelection) (PlatformEvidence, *Key, error) {
	q, pcrs, err := ak.Quote(ctx, nonce, sel)
	if err != nil {
		return PlatformEvidence{}, nil, err
	}
	log, err := ak.tpm.EventLog(ctx)
	if err != nil {
		return PlatformEvidence{}, nil, err
	}
	key, ck, err := ak.tpm.NewKey(ctx, ak, nonce)
	if err != nil {
		return PlatformEvidence{}, nil, err
	}
	return PlatformEvidence{Quote: q, PCRs: pcrs, EventLog: log, Key: ck}, key, nil
}
