package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"errors"
	"fmt"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/cryptosigner"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// JWTAlgorithm picks the JWS algorithm for a key as SPIRE does: ES256 for
// P-256, ES384 for P-384, RS256 for RSA of at least 2048 bits.
func JWTAlgorithm(pub crypto.PublicKey) (jose.SignatureAlgorithm, error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return jose.ES256, nil
		case elliptic.P384():
			return jose.ES384, nil
		}
		return "", errors.New("JWT key uses an unsupported curve")
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return "", errors.New("JWT RSA key is smaller than 2048 bits")
		}
		return jose.RS256, nil
	default:
		return "", fmt.Errorf("unsupported JWT key type %T", pub)
	}
}

// JWTParams describes a JWT-SVID to sign.
type JWTParams struct {
	// ID is the subject (sub).
	ID spiffeid.ID
	// Audience is aud; at least one value.
	Audience []string
	// IssuedAt and TTL give iat and exp; exp is capped at KeyNotAfter.
	IssuedAt    time.Time
	TTL         time.Duration
	KeyNotAfter time.Time
}

// SignJWTSVID signs a JWT-SVID (JWS compact, header typ JWT and kid) with
// claims sub, aud, exp and iat. The key signs through crypto.Signer.
func SignJWTSVID(key crypto.Signer, keyID string, p JWTParams) (token string, expiresAt time.Time, err error) {
	if key == nil || keyID == "" {
		return "", time.Time{}, errors.New("signing JWT-SVID: no key or key ID")
	}
	if p.ID.IsZero() || p.ID.Path() == "" {
		return "", time.Time{}, fmt.Errorf("signing JWT-SVID: %q is not a workload SPIFFE ID", p.ID)
	}
	if len(p.Audience) == 0 {
		return "", time.Time{}, errors.New("signing JWT-SVID: audience is required")
	}
	for _, a := range p.Audience {
		if a == "" {
			return "", time.Time{}, errors.New("signing JWT-SVID: empty audience value")
		}
	}
	if p.TTL <= 0 {
		return "", time.Time{}, errors.New("signing JWT-SVID: TTL must be positive")
	}
	alg, err := JWTAlgorithm(key.Public())
	if err != nil {
		return "", time.Time{}, fmt.Errorf("signing JWT-SVID: %w", err)
	}
	signer, err := jose.NewSigner(jose.SigningKey{
		Algorithm: alg,
		Key:       jose.JSONWebKey{Key: cryptosigner.Opaque(key), KeyID: keyID},
	}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return "", time.Time{}, fmt.Errorf("signing JWT-SVID: %w", err)
	}
	exp := p.IssuedAt.Add(p.TTL)
	if !p.KeyNotAfter.IsZero() && exp.After(p.KeyNotAfter) {
		exp = p.KeyNotAfter
	}
	if !exp.After(p.IssuedAt) {
		return "", time.Time{}, errors.New("signing JWT-SVID: the JWT key has expired")
	}
	// Seconds, as JWT NumericDate; exp is truncated so it never exceeds the cap.
	exp = exp.Truncate(time.Second)
	claims := jwt.Claims{
		Subject:  p.ID.String(),
		Audience: jwt.Audience(p.Audience),
		Expiry:   jwt.NewNumericDate(exp),
		IssuedAt: jwt.NewNumericDate(p.IssuedAt),
	}
	token, err = jwt.Signed(signer).Claims(claims).Serialize()
	if err != nil {
		return "", time.Time{}, fmt.Errorf("signing JWT-SVID for %s: %w", p.ID, err)
	}
	return token, exp, nil
}
