package verifier

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/google/go-attestation/attest"
	attestx509 "github.com/google/go-attestation/x509"
	"github.com/google/go-tpm/tpm2"

	"github.com/ironroot/ironroot/tpm"
)

var (
	oidSubjectAltName   = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidTPMManufacturer  = asn1.ObjectIdentifier{2, 23, 133, 2, 1}
	maxEKIntermediates  = 16
	maxCertificateBytes = 16 << 10
)

// ekInfo is what Begin learned about the EK.
type ekInfo struct {
	pub          *tpm2.TPMTPublic
	key          crypto.PublicKey
	hash         string
	chain        []*x509.Certificate
	manufacturer string
}

// EKHash returns the lowercase hex SHA-256 of the PKIX DER encoding of an EK
// public key: the node's stable identifier in SPIFFE IDs and allow-lists.
func EKHash(key crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(key)
	if err != nil {
		return "", fmt.Errorf("encoding EK public key: %w", err)
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:]), nil
}

func (v *Verifier) checkEK(ctx context.Context, id tpm.Identity) (*ekInfo, error) {
	pub, err := unmarshal[tpm2.TPMTPublic](id.EKPublic)
	if err != nil {
		return nil, fmt.Errorf("%w: decoding EK public area: %v", ErrMalformed, err)
	}
	if err := checkEKTemplate(pub); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrEKTemplate, err)
	}
	key, err := publicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("%w: EK key: %v", ErrEKTemplate, err)
	}
	hash, err := EKHash(key)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrEKTemplate, err)
	}
	info := &ekInfo{pub: pub, key: key, hash: hash}

	var chainErr error
	chained := false
	if len(id.EKCertificate) > 0 {
		if len(id.EKCertificate) > maxCertificateBytes {
			return nil, fmt.Errorf("%w: EK certificate of %d bytes", ErrMalformed, len(id.EKCertificate))
		}
		cert, err := parseEKCertificate(id.EKCertificate)
		if err != nil {
			return nil, fmt.Errorf("%w: parsing EK certificate: %v", ErrMalformed, err)
		}
		certKey, ok := cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
		if !ok || !certKey.Equal(key) {
			return nil, fmt.Errorf("%w: certificate key (%T) differs from the EK public area (%s)", ErrEKMismatch, cert.PublicKey, hash)
		}
		key := chainKey(id.EKCertificate, id.EKIntermediates)
		if e, ok := v.cachedChain(key); ok {
			chained, info.chain, info.manufacturer = true, e.chain, e.manufacturer
		} else {
			inter, err := parseIntermediates(id.EKIntermediates)
			if err != nil {
				return nil, err
			}
			chain, err := v.verifyEKChain(cert, inter)
			if err == nil {
				chained = true
				info.chain = chain
				info.manufacturer = manufacturer(cert)
				v.cacheChain(key, chainEntry{chain: chain, manufacturer: info.manufacturer})
			} else {
				chainErr = err
			}
		}
	}

	if v.cfg.RequireEKCertificate {
		switch {
		case len(id.EKCertificate) == 0:
			return nil, fmt.Errorf("%w: EK %s has no certificate and certificates are required", ErrEKUntrusted, hash)
		case !chained:
			return nil, fmt.Errorf("%w: EK %s: %v", ErrEKUntrusted, hash, chainErr)
		}
		if v.cfg.AllowList != nil {
			if err := v.allowed(ctx, hash); err != nil {
				return nil, err
			}
		}
		return info, nil
	}
	if chained {
		return info, nil
	}
	if v.cfg.AllowList != nil {
		if err := v.allowed(ctx, hash); err != nil {
			if chainErr != nil {
				return nil, fmt.Errorf("%w (certificate not trusted either: %v)", err, chainErr)
			}
			return nil, err
		}
		return info, nil
	}
	if chainErr != nil {
		return nil, fmt.Errorf("%w: EK %s: %v", ErrEKUntrusted, hash, chainErr)
	}
	return nil, fmt.Errorf("%w: EK %s has no certificate and no allow-list is configured", ErrEKUntrusted, hash)
}

// allowed consults the allow-list; every error denies.
func (v *Verifier) allowed(ctx context.Context, hash string) error {
	ok, err := v.cfg.AllowList.Allowed(ctx, hash)
	if err != nil {
		return fmt.Errorf("%w: EK %s: allow-list lookup failed, denying: %v", ErrEKNotAllowed, hash, err)
	}
	if !ok {
		return fmt.Errorf("%w: EK %s", ErrEKNotAllowed, hash)
	}
	return nil
}

// parseEKCertificate parses leniently (TCG NV header, trailing bytes) with
// go-attestation, without letting a parser panic escape.
func parseEKCertificate(der []byte) (c *x509.Certificate, err error) {
	defer func() {
		if r := recover(); r != nil {
			c, err = nil, errors.New("certificate cannot be parsed")
		}
	}()
	return attest.ParseEKCertificate(der)
}

func parseIntermediates(ders [][]byte) ([]*x509.Certificate, error) {
	if len(ders) > maxEKIntermediates {
		return nil, fmt.Errorf("%w: %d EK intermediates, at most %d accepted", ErrMalformed, len(ders), maxEKIntermediates)
	}
	var out []*x509.Certificate
	for i, der := range ders {
		if len(der) > maxCertificateBytes {
			return nil, fmt.Errorf("%w: EK intermediate %d of %d bytes", ErrMalformed, i, len(der))
		}
		c, err := parseEKCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("%w: parsing EK intermediate %d: %v", ErrMalformed, i, err)
		}
		out = append(out, c)
	}
	return out, nil
}

// verifyEKChain builds a path from the EK certificate to a configured root.
// EK certificates mark their TCG SubjectAltName (a DirectoryName Go does not
// parse) critical and carry the EK EKU 2.23.133.8.1; those two quirks are
// tolerated, everything else (signatures, validity, CA constraints) is not.
func (v *Verifier) verifyEKChain(cert *x509.Certificate, agentInter []*x509.Certificate) ([]*x509.Certificate, error) {
	if len(v.cfg.EKRoots) == 0 {
		return nil, errors.New("no EK roots configured")
	}
	leaf := *cert // a copy: the caller's certificate is not mutated
	leaf.UnhandledCriticalExtensions = nil
	for _, ext := range cert.UnhandledCriticalExtensions {
		if !ext.Equal(oidSubjectAltName) {
			leaf.UnhandledCriticalExtensions = append(leaf.UnhandledCriticalExtensions, ext)
		}
	}
	pool := x509.NewCertPool()
	for _, c := range v.intermediates {
		pool.AddCert(c)
	}
	for _, c := range agentInter {
		pool.AddCert(c)
	}
	chains, err := leaf.Verify(x509.VerifyOptions{
		Roots:         v.roots,
		Intermediates: pool,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
		CurrentTime:   v.now(),
	})
	if err != nil {
		return nil, fmt.Errorf("verifying EK certificate chain: %w", err)
	}
	chain := chains[0]
	chain[0] = cert
	return chain, nil
}

// manufacturer reads the TPM manufacturer from the EK certificate's TCG
// SubjectAltName and maps TCG vendor IDs to names ("id:49424D00" → "IBM");
// unknown IDs are returned raw.
func manufacturer(cert *x509.Certificate) string {
	for _, ext := range cert.Extensions {
		if !ext.Id.Equal(oidSubjectAltName) {
			continue
		}
		san, err := attestx509.ParseSubjectAltName(ext)
		if err != nil {
			return ""
		}
		for _, dn := range san.DirectoryNames {
			for _, atv := range dn.Names {
				if !atv.Type.Equal(oidTPMManufacturer) {
					continue
				}
				s, ok := atv.Value.(string)
				if !ok {
					return ""
				}
				return vendorName(s)
			}
		}
	}
	return ""
}

func vendorName(raw string) string {
	raw = strings.TrimSpace(raw)
	hexID, ok := strings.CutPrefix(strings.ToLower(raw), "id:")
	if ok {
		if n, err := strconv.ParseUint(hexID, 16, 32); err == nil {
			if name := attest.TCGVendorID(n).String(); name != "" {
				return name
			}
		}
	}
	// Keep selectors printable and single-line.
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return -1
		}
		return r
	}, raw)
}

// checkEKTemplate checks the public area is an endorsement key: a restricted
// decryption (storage-style) key that can never leave this TPM, with a
// symmetric algorithm so that MakeCredential can target it.
func checkEKTemplate(pub *tpm2.TPMTPublic) error {
	a := pub.ObjectAttributes
	switch {
	case !a.FixedTPM:
		return errors.New("EK lacks fixedTPM")
	case !a.FixedParent:
		return errors.New("EK lacks fixedParent")
	case !a.SensitiveDataOrigin:
		return errors.New("EK lacks sensitiveDataOrigin")
	case !a.Restricted:
		return errors.New("EK is not restricted")
	case !a.Decrypt:
		return errors.New("EK is not a decryption key")
	case a.SignEncrypt:
		return errors.New("EK is a signing key")
	}
	if _, err := strongHash(pub.NameAlg); err != nil {
		return fmt.Errorf("EK name algorithm: %v", err)
	}
	var sym tpm2.TPMTSymDefObject
	switch pub.Type {
	case tpm2.TPMAlgRSA:
		p, err := pub.Parameters.RSADetail()
		if err != nil {
			return fmt.Errorf("EK RSA parameters: %v", err)
		}
		sym = p.Symmetric
	case tpm2.TPMAlgECC:
		p, err := pub.Parameters.ECCDetail()
		if err != nil {
			return fmt.Errorf("EK ECC parameters: %v", err)
		}
		sym = p.Symmetric
	default:
		return fmt.Errorf("EK type 0x%x is neither RSA nor ECC", uint16(pub.Type))
	}
	if sym.Algorithm != tpm2.TPMAlgAES {
		return fmt.Errorf("EK symmetric algorithm 0x%x, want AES", uint16(sym.Algorithm))
	}
	return nil
}

// chainKey identifies an EK certificate with the intermediates offered for
// it: both determine the path.
func chainKey(cert []byte, inter [][]byte) [32]byte {
	h := sha256.New()
	for _, b := range append([][]byte{cert}, inter...) {
		h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(b))))
		h.Write(b)
	}
	var k [32]byte
	h.Sum(k[:0])
	return k
}

func (v *Verifier) cachedChain(key [32]byte) (chainEntry, bool) {
	if v.chainCacheSize == 0 {
		return chainEntry{}, false
	}
	now := v.now()
	v.chainMu.Lock()
	defer v.chainMu.Unlock()
	e, ok := v.chains[key]
	if !ok || !now.Before(e.until) {
		delete(v.chains, key)
		return chainEntry{}, false
	}
	return e, true
}

func (v *Verifier) cacheChain(key [32]byte, e chainEntry) {
	if v.chainCacheSize == 0 {
		return
	}
	e.until = v.now().Add(chainCacheTTL)
	for _, c := range e.chain {
		if c.NotAfter.Before(e.until) {
			e.until = c.NotAfter
		}
	}
	v.chainMu.Lock()
	defer v.chainMu.Unlock()
	for k := range v.chains {
		if len(v.chains) < v.chainCacheSize {
			break
		}
		delete(v.chains, k) // map order: an arbitrary victim
	}
	v.chains[key] = e
}
