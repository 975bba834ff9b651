// Package ca builds and signs the trust domain's certificates and tokens:
// CA certificates, X509-SVIDs to the SPIFFE standard and JWT-SVIDs. Signing
// goes through crypto.Signer, so the keys stay wherever they live (an HSM in
// production); this package never sees key material.
package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// backdate absorbs clock skew between the server and relying parties, as
// SPIRE does for CA certificates.
const backdate = 10 * time.Second

// CAParams describes a CA certificate to create.
type CAParams struct {
	// TrustDomain is the trust domain; the CA's URI SAN is spiffe://<td>.
	TrustDomain spiffeid.TrustDomain
	// Signer is the CA's own key (the certificate's subject key).
	Signer crypto.Signer
	// NotBefore is the start of validity (backdated by 10 s); TTL its length.
	NotBefore time.Time
	TTL       time.Duration
	// Subject defaults to C=US, O=SPIFFE.
	Subject pkix.Name
	// Parent and ParentSigner make an intermediate under an upstream CA; nil
	// for a self-signed root.
	Parent       *x509.Certificate
	ParentSigner crypto.Signer
}

// NewCACertificate creates a CA certificate: URI SAN spiffe://<td>,
// CertSign+CRLSign, SKI from the key and AKI from the parent; NotAfter is
// capped at the parent's.
func NewCACertificate(p CAParams) (*x509.Certificate, error) {
	if p.Signer == nil {
		return nil, errors.New("creating CA certificate: no signer")
	}
	if p.TrustDomain.IsZero() {
		return nil, errors.New("creating CA certificate: no trust domain")
	}
	if p.TTL <= 0 {
		return nil, errors.New("creating CA certificate: TTL must be positive")
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	ski, err := subjectKeyID(p.Signer.Public())
	if err != nil {
		return nil, fmt.Errorf("creating CA certificate: %w", err)
	}
	subject := p.Subject
	if len(subject.Country) == 0 && len(subject.Organization) == 0 && subject.CommonName == "" {
		subject = pkix.Name{Country: []string{"US"}, Organization: []string{"SPIFFE"}}
	}
	subject.SerialNumber = serial.String()
	notBefore := p.NotBefore.Add(-backdate).UTC()
	notAfter := p.NotBefore.Add(p.TTL).UTC()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               subject,
		URIs:                  []*url.URL{p.TrustDomain.ID().URL()},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		SubjectKeyId:          ski,
	}
	parent, parentSigner := tmpl, p.Signer
	if p.Parent != nil {
		if p.ParentSigner == nil {
			return nil, errors.New("creating CA certificate: upstream certificate without its signer")
		}
		if !p.Parent.IsCA {
			return nil, errors.New("creating CA certificate: upstream certificate is not a CA")
		}
		if !publicKeysEqual(p.Parent.PublicKey, p.ParentSigner.Public()) {
			return nil, errors.New("creating CA certificate: upstream key does not match the upstream certificate")
		}
		parent, parentSigner = p.Parent, p.ParentSigner
		tmpl.AuthorityKeyId = p.Parent.SubjectKeyId
		if tmpl.NotAfter.After(p.Parent.NotAfter) {
			tmpl.NotAfter = p.Parent.NotAfter
		}
		if !tmpl.NotAfter.After(p.NotBefore) {
			return nil, errors.New("creating CA certificate: upstream certificate has expired")
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, p.Signer.Public(), parentSigner)
	if err != nil {
		return nil, fmt.Errorf("signing CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing new CA certificate: %w", err)
	}
	return cert, nil
}

// SVIDParams describes an X509-SVID to sign.
type SVIDParams struct {
	// ID is the SVID's SPIFFE ID (non-empty path, CA's trust domain).
	ID spiffeid.ID
	// PublicKey is the subject key, normally from a verified CSR.
	PublicKey crypto.PublicKey
	// DNSNames become DNS SANs; the first also becomes the CN.
	DNSNames []string
	// NotBefore and TTL give the validity; NotAfter is capped at the CA's.
	NotBefore time.Time
	TTL       time.Duration
}

// SignX509SVID signs an X509-SVID to the SPIFFE standard: exactly one URI
// SAN, CA=false, key usage digitalSignature|keyEncipherment|keyAgreement
// (critical), EKU serverAuth+clientAuth, a 128-bit random serial.
func SignX509SVID(caCert *x509.Certificate, caSigner crypto.Signer, p SVIDParams) (*x509.Certificate, error) {
	if caCert == nil || caSigner == nil {
		return nil, errors.New("signing X509-SVID: no CA")
	}
	if p.ID.IsZero() || p.ID.Path() == "" {
		return nil, fmt.Errorf("signing X509-SVID: %q is not a workload SPIFFE ID (empty path)", p.ID)
	}
	if len(caCert.URIs) == 1 {
		caTD, err := spiffeid.FromURI(caCert.URIs[0])
		if err == nil && caTD.TrustDomain() != p.ID.TrustDomain() {
			return nil, fmt.Errorf("signing X509-SVID: %s is not in trust domain %s", p.ID, caTD.TrustDomain())
		}
	}
	if p.TTL <= 0 {
		return nil, errors.New("signing X509-SVID: TTL must be positive")
	}
	if err := checkSubjectKey(p.PublicKey); err != nil {
		return nil, fmt.Errorf("signing X509-SVID: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	notAfter := p.NotBefore.Add(p.TTL).UTC()
	if notAfter.After(caCert.NotAfter) {
		notAfter = caCert.NotAfter
	}
	if !notAfter.After(p.NotBefore) {
		return nil, errors.New("signing X509-SVID: the CA certificate has expired")
	}
	subject := pkix.Name{Country: []string{"US"}, Organization: []string{"SPIRE"}, SerialNumber: serial.String()}
	if len(p.DNSNames) > 0 {
		subject.CommonName = p.DNSNames[0]
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               subject,
		URIs:                  []*url.URL{p.ID.URL()},
		DNSNames:              p.DNSNames,
		NotBefore:             p.NotBefore.Add(-backdate).UTC(),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageKeyAgreement,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
		AuthorityKeyId:        caCert.SubjectKeyId,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, p.PublicKey, caSigner)
	if err != nil {
		return nil, fmt.Errorf("signing X509-SVID for %s: %w", p.ID, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing new X509-SVID: %w", err)
	}
	return cert, nil
}

// ParseCSR parses a PKCS#10 request and checks its self-signature; the
// request's names are ignored (the entry decides the identity).
func ParseCSR(der []byte) (*x509.CertificateRequest, error) {
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("parsing CSR: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("checking CSR signature: %w", err)
	}
	if err := checkSubjectKey(csr.PublicKey); err != nil {
		return nil, fmt.Errorf("CSR: %w", err)
	}
	return csr, nil
}

func checkSubjectKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256(), elliptic.P384(), elliptic.P521():
			return nil
		}
		return errors.New("subject key uses an unsupported curve")
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return fmt.Errorf("subject RSA key of %d bits is too small (min 2048)", k.N.BitLen())
		}
		return nil
	case nil:
		return errors.New("no subject key")
	default:
		return fmt.Errorf("unsupported subject key type %T", pub)
	}
}

// newSerial returns a random positive 128-bit serial number.
func newSerial() (*big.Int, error) {
	limit := new(big.Int).Lsh(big.NewInt(1), 128)
	for {
		n, err := rand.Int(rand.Reader, limit)
		if err != nil {
			return nil, fmt.Errorf("generating serial number: %w", err)
		}
		if n.Sign() > 0 {
			return n, nil
		}
	}
}

// subjectKeyID is the RFC 5280 method 1 key identifier.
func subjectKeyID(pub crypto.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("marshaling public key: %w", err)
	}
	var spki struct {
		Algorithm        pkix.AlgorithmIdentifier
		SubjectPublicKey asn1.BitString
	}
	if _, err := asn1.Unmarshal(der, &spki); err != nil {
		return nil, fmt.Errorf("parsing public key: %w", err)
	}
	sum := sha1.Sum(spki.SubjectPublicKey.Bytes)
	return sum[:], nil
}

// publicKeysEqual reports whether two public keys are the same key.
func publicKeysEqual(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	ea, ok := a.(equaler)
	return ok && ea.Equal(b)
}

// verifySignature checks a signature over a SHA-256 digest, as made by a
// crypto.Signer (ECDSA ASN.1, or RSA PKCS#1 v1.5).
func verifySignature(pub crypto.PublicKey, digest, sig []byte) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(k, digest, sig) {
			return errors.New("ECDSA signature does not verify")
		}
		return nil
	case *rsa.PublicKey:
		return rsa.VerifyPKCS1v15(k, crypto.SHA256, digest, sig)
	default:
		return fmt.Errorf("unsupported key type %T", pub)
	}
}
