package store

import (
	"crypto/x509"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Limits on entry fields.
const (
	maxEntryIDLen = 255
	maxDNSNames   = 64
	maxDNSNameLen = 253
	maxHintLen    = 1024
	maxBlobLen    = 1 << 20 // evidence, clock, certificates
)

// Validate checks an entry before it is stored: valid SPIFFE IDs in the same
// trust domain, at least one valid selector, non-negative TTLs, sane DNS
// names and hint. It does not check the ID, which the store may assign.
func (e *Entry) Validate() error {
	if e == nil {
		return fmt.Errorf("%w: entry is nil", ErrInvalid)
	}
	id, err := spiffeid.FromString(e.SPIFFEID)
	if err != nil {
		return fmt.Errorf("%w: SPIFFE ID %q: %v", ErrInvalid, e.SPIFFEID, err)
	}
	parent, err := spiffeid.FromString(e.ParentID)
	if err != nil {
		return fmt.Errorf("%w: parent ID %q: %v", ErrInvalid, e.ParentID, err)
	}
	if id.TrustDomain() != parent.TrustDomain() {
		return fmt.Errorf("%w: SPIFFE ID %q and parent ID %q are in different trust domains", ErrInvalid, e.SPIFFEID, e.ParentID)
	}
	if id == parent {
		return fmt.Errorf("%w: SPIFFE ID %q is its own parent", ErrInvalid, e.SPIFFEID)
	}
	if err := validateSelectors(e.Selectors, false); err != nil {
		return err
	}
	if e.X509SVIDTTL < 0 || e.JWTSVIDTTL < 0 {
		return fmt.Errorf("%w: TTLs must not be negative", ErrInvalid)
	}
	if len(e.DNSNames) > maxDNSNames {
		return fmt.Errorf("%w: more than %d DNS names", ErrInvalid, maxDNSNames)
	}
	for _, name := range e.DNSNames {
		if err := validateDNSName(name); err != nil {
			return err
		}
	}
	if len(e.Hint) > maxHintLen || !printable(e.Hint) {
		return fmt.Errorf("%w: hint must be printable and at most %d bytes", ErrInvalid, maxHintLen)
	}
	return nil
}

// validateEntryID checks a caller-supplied entry ID: printable ASCII
// without spaces or slashes, so it is safe in URLs, CLIs and logs.
func validateEntryID(id string) error {
	if id == "" || len(id) > maxEntryIDLen {
		return fmt.Errorf("%w: entry ID must be 1 to %d characters", ErrInvalid, maxEntryIDLen)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if c <= ' ' || c > '~' || c == '/' {
			return fmt.Errorf("%w: entry ID %q has a character outside printable ASCII or a '/'", ErrInvalid, id)
		}
	}
	return nil
}

// validateDNSName accepts LDH labels and a leading "*." wildcard; the
// certificate library does the final check when signing.
func validateDNSName(name string) error {
	if name == "" || len(name) > maxDNSNameLen {
		return fmt.Errorf("%w: DNS name %q must be 1 to %d characters", ErrInvalid, name, maxDNSNameLen)
	}
	labels := strings.Split(strings.TrimPrefix(name, "*."), ".")
	for _, l := range labels {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return fmt.Errorf("%w: DNS name %q has an invalid label", ErrInvalid, name)
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return fmt.Errorf("%w: DNS name %q has an invalid character", ErrInvalid, name)
			}
		}
	}
	return nil
}

func validateNode(n *Node) error {
	if n == nil {
		return fmt.Errorf("%w: node is nil", ErrInvalid)
	}
	if _, err := spiffeid.FromString(n.SPIFFEID); err != nil {
		return fmt.Errorf("%w: agent ID %q: %v", ErrInvalid, n.SPIFFEID, err)
	}
	for i := 0; i < len(n.EKHash); i++ {
		c := n.EKHash[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return fmt.Errorf("%w: EK hash must be lowercase hex", ErrInvalid)
		}
	}
	if err := validateSelectors(n.Selectors, true); err != nil {
		return err
	}
	if len(n.Evidence) > maxBlobLen || len(n.Clock) > maxBlobLen {
		return fmt.Errorf("%w: evidence or clock larger than %d bytes", ErrInvalid, maxBlobLen)
	}
	if len(n.CertSerial) > 128 || !printable(n.CertSerial) {
		return fmt.Errorf("%w: certificate serial must be printable and at most 128 bytes", ErrInvalid)
	}
	return nil
}

// validateAuthority also parses the public material, so that only a
// certificate or a public key can ever land in those columns.
func validateAuthority(a *Authority) error {
	if a == nil {
		return fmt.Errorf("%w: authority is nil", ErrInvalid)
	}
	if a.ID == "" || len(a.ID) > 128 || !printable(a.ID) || strings.Contains(a.ID, "/") {
		return fmt.Errorf("%w: authority ID must be 1 to 128 printable characters without '/'", ErrInvalid)
	}
	switch a.State {
	case StatePrepared, StateActive, StateOld:
	default:
		return fmt.Errorf("%w: authority %s: unknown state %q", ErrInvalid, a.ID, a.State)
	}
	if len(a.KeyToken) > 256 || len(a.KeyLabel) > 256 || len(a.KeyID) > 256 || len(a.KeyIDJWT) > 256 {
		return fmt.Errorf("%w: authority %s: key reference longer than 256 bytes", ErrInvalid, a.ID)
	}
	if len(a.Certificate) > maxBlobLen || len(a.PublicKey) > maxBlobLen {
		return fmt.Errorf("%w: authority %s: certificate or public key too large", ErrInvalid, a.ID)
	}
	if !a.NotAfter.After(a.NotBefore) {
		return fmt.Errorf("%w: authority %s: NotAfter must be after NotBefore", ErrInvalid, a.ID)
	}
	switch a.Kind {
	case AuthorityX509:
		if _, err := x509.ParseCertificate(a.Certificate); err != nil {
			return fmt.Errorf("%w: authority %s: parsing CA certificate: %v", ErrInvalid, a.ID, err)
		}
	case AuthorityJWT:
		if a.KeyIDJWT == "" {
			return fmt.Errorf("%w: authority %s: JWT key ID (kid) is empty", ErrInvalid, a.ID)
		}
	default:
		return fmt.Errorf("%w: authority %s: unknown kind %q", ErrInvalid, a.ID, a.Kind)
	}
	if len(a.PublicKey) > 0 || a.Kind == AuthorityJWT {
		if _, err := x509.ParsePKIXPublicKey(a.PublicKey); err != nil {
			return fmt.Errorf("%w: authority %s: parsing PKIX public key: %v", ErrInvalid, a.ID, err)
		}
	}
	return nil
}
