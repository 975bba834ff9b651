package workloadapi

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Attestor identifies a workload process by its selectors. The agent's unix
// attestor (agent/workloadattestor/unix) implements it.
type Attestor interface {
	// Attest returns the selectors of process pid. The server checks after
	// Attest returns that pid still names the process that connected.
	Attest(ctx context.Context, pid int32) ([]Selector, error)
}

// Source is what the server needs from the agent's SVID cache.
//
// Entitlement is decided by the Source: given a workload's selectors it
// returns the identities whose registration entries match. The server never
// inspects selectors itself.
type Source interface {
	// Subscribe returns the full state for a workload with these selectors
	// and follows it. The subscription's Updates channel must deliver the
	// current state at once (without waiting for a change) and then a new
	// Snapshot after every change; a slow reader may miss intermediate
	// snapshots as long as it gets the latest (Feed does all this). The
	// server calls Close when the stream ends; ctx is the stream's context.
	Subscribe(ctx context.Context, selectors []Selector) (Subscription, error)

	// FetchJWTSVIDs returns a JWT-SVID for audience for every identity the
	// selectors are entitled to, in entry order (the first is the
	// default), or only for id if id is not zero. It returns an empty slice
	// (or ErrNoIdentity) when there is no such identity. audience is never
	// empty.
	FetchJWTSVIDs(ctx context.Context, selectors []Selector, audience []string, id spiffeid.ID) ([]JWTSVID, error)
}

// Subscription follows the state of one workload. See Source.Subscribe.
type Subscription interface {
	// Updates delivers full snapshots. A closed channel ends every stream
	// using it with Unavailable, and clients reconnect.
	Updates() <-chan *Snapshot
	// Close releases the subscription. It may be called more than once.
	Close()
}

// Snapshot is the complete Workload API state of one workload at one time.
// The server never modifies a Snapshot; a Source must not modify one after
// sending it.
type Snapshot struct {
	// SVIDs are the X509-SVIDs the workload is entitled to; the first is the
	// default. Empty means no identity (PermissionDenied).
	SVIDs []X509SVID
	// Bundle is the agent's own trust domain bundle: X.509 authorities for
	// X509-SVID validation and JWT authorities (with key IDs) for JWT-SVIDs.
	Bundle *spiffebundle.Bundle
	// FederatedBundles are the bundles of foreign trust domains the
	// workload's entries federate with.
	FederatedBundles []*spiffebundle.Bundle
}

// X509SVID is one X509-SVID with its private key.
type X509SVID struct {
	// ID is the SPIFFE ID in the leaf's URI SAN.
	ID spiffeid.ID
	// Certificates is the chain, leaf first, then intermediates.
	Certificates []*x509.Certificate
	// PrivateKey is the leaf's key; it is sent to the workload as PKCS#8, so
	// it must be a software key (*ecdsa.PrivateKey, *rsa.PrivateKey,
	// ed25519.PrivateKey).
	PrivateKey crypto.Signer
	// Hint is the operator's hint for the workload; optional.
	Hint string
}

// JWTSVID is one signed JWT-SVID.
type JWTSVID struct {
	// ID is the token's subject.
	ID spiffeid.ID
	// Token is the JWS compact serialization.
	Token string
	// ExpiresAt is the token's exp claim.
	ExpiresAt time.Time
	// Hint is the operator's hint for the workload; optional.
	Hint string
}

// ErrNoIdentity may be returned by Source.FetchJWTSVIDs when the workload is
// not entitled to the identity asked for; the server answers
// PermissionDenied.
var ErrNoIdentity = errors.New("no identity issued")
