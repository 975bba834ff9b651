// Package agentapi serves ironroot-server's agent API (server/api/agent/v1):
// TPM node attestation, the entry Sync stream and SVID signing. Every RPC
// but Attest authenticates the caller by its agent X509-SVID (mTLS) and
// checks it against the node record, so a banned or re-attested-away SVID is
// refused even while it is unexpired.
package agentapi

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/server/ca"
	"github.com/ironroot/ironroot/server/entrycache"
	"github.com/ironroot/ironroot/server/store"
	"github.com/ironroot/ironroot/tpm/verifier"
)

// AgentPathPrefix is the path prefix of agent IDs:
// spiffe://<td>/ironroot/agent/tpm/<ekhash>.
const AgentPathPrefix = "/ironroot/agent/tpm/"

// ServerPath is the path of the server's own ID; node aliases are parented
// to it.
const ServerPath = "/ironroot/server"

// Limits on requests, so one agent cannot make the server do unbounded work.
const (
	// MaxBatchCSRs bounds BatchNewX509SVID.
	MaxBatchCSRs = 1000
	// MaxAudiences bounds NewJWTSVID's audience list.
	MaxAudiences = 32
	// MaxCSRBytes bounds one CSR.
	MaxCSRBytes = 16 << 10
)

// Config wires the service to the rest of the server.
type Config struct {
	TrustDomain spiffeid.TrustDomain
	Store       store.Store
	Entries     *entrycache.Cache
	CA          *ca.Manager
	Verifier    *verifier.Verifier
	// AgentTTL is the agent SVID's lifetime.
	AgentTTL time.Duration
	// DefaultX509SVIDTTL and DefaultJWTSVIDTTL apply to entries with no TTL.
	DefaultX509SVIDTTL time.Duration
	DefaultJWTSVIDTTL  time.Duration
	// AttestRatePerIP bounds attestations per second per source IP.
	AttestRatePerIP float64
	// StepTimeout bounds each step of the attestation protocol.
	StepTimeout time.Duration
	Logger      *slog.Logger
	Clock       func() time.Time
}

// Service implements agentv1.AgentServer.
type Service struct {
	agentv1.UnimplementedAgentServer
	cfg      Config
	log      *slog.Logger
	serverID spiffeid.ID
	limiter  *ipLimiter

	// stopping is closed by Stop, ending open Sync streams.
	stopping chan struct{}
	stopOnce sync.Once
}

// New checks the configuration and returns the service.
func New(cfg Config) (*Service, error) {
	if cfg.TrustDomain.IsZero() || cfg.Store == nil || cfg.Entries == nil || cfg.CA == nil || cfg.Verifier == nil {
		return nil, errors.New("agent API: trust domain, store, entry cache, CA and verifier are required")
	}
	if cfg.AgentTTL <= 0 {
		cfg.AgentTTL = time.Hour
	}
	if cfg.DefaultX509SVIDTTL <= 0 {
		cfg.DefaultX509SVIDTTL = time.Hour
	}
	if cfg.DefaultJWTSVIDTTL <= 0 {
		cfg.DefaultJWTSVIDTTL = 5 * time.Minute
	}
	if cfg.AttestRatePerIP <= 0 {
		cfg.AttestRatePerIP = 1
	}
	if cfg.StepTimeout <= 0 {
		cfg.StepTimeout = 30 * time.Second
	}
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	serverID, err := spiffeid.FromPath(cfg.TrustDomain, ServerPath)
	if err != nil {
		return nil, fmt.Errorf("agent API: server ID: %w", err)
	}
	return &Service{
		cfg:      cfg,
		log:      cfg.Logger,
		serverID: serverID,
		limiter:  newIPLimiter(cfg.AttestRatePerIP, cfg.Clock),
		stopping: make(chan struct{}),
	}, nil
}

// AgentID returns the agent ID for an EK hash.
func AgentID(td spiffeid.TrustDomain, ekHash string) (spiffeid.ID, error) {
	return spiffeid.FromPath(td, AgentPathPrefix+ekHash)
}

// caller is an authenticated agent.
type caller struct {
	id   spiffeid.ID
	node *store.Node
	cert *x509.Certificate
}

// authenticate verifies the caller's agent SVID against the current bundle
// and the node record: the node must exist, not be banned, and the SVID's
// serial must be the one last issued to it.
func (s *Service) authenticate(ctx context.Context) (*caller, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, status.Error(codes.Unauthenticated, "no peer information")
	}
	tlsInfo, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(tlsInfo.State.PeerCertificates) == 0 {
		return nil, status.Error(codes.Unauthenticated, "an agent X509-SVID client certificate is required")
	}
	b := s.cfg.CA.Bundle()
	id, _, err := x509svid.Verify(tlsInfo.State.PeerCertificates, x509bundle.FromX509Authorities(s.cfg.TrustDomain, b.X509Authorities))
	if err != nil {
		return nil, status.Errorf(codes.Unauthenticated, "client certificate is not a valid SVID of %s: %v", s.cfg.TrustDomain, err)
	}
	if id.TrustDomain() != s.cfg.TrustDomain || !isAgentPath(id.Path()) {
		return nil, status.Errorf(codes.PermissionDenied, "%s is not an agent ID", id)
	}
	node, err := s.cfg.Store.GetNode(ctx, id.String())
	if errors.Is(err, store.ErrNotFound) {
		return nil, status.Errorf(codes.PermissionDenied, "agent %s is not attested (evicted?): it must re-attest", id)
	}
	if err != nil {
		return nil, status.Errorf(codes.Internal, "looking up agent %s: %v", id, err)
	}
	if node.Banned {
		return nil, status.Errorf(codes.PermissionDenied, "agent %s is banned", id)
	}
	leaf := tlsInfo.State.PeerCertificates[0]
	if node.CertSerial == "" || leaf.SerialNumber.String() != node.CertSerial {
		return nil, status.Errorf(codes.PermissionDenied, "agent %s presented an SVID that is no longer current: it must re-attest", id)
	}
	return &caller{id: id, node: node, cert: leaf}, nil
}

func isAgentPath(p string) bool {
	if len(p) <= len(AgentPathPrefix) || p[:len(AgentPathPrefix)] != AgentPathPrefix {
		return false
	}
	for _, c := range p[len(AgentPathPrefix):] {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// ToProtoEntry converts a store entry for the wire.
func ToProtoEntry(e *store.Entry) *agentv1.Entry {
	out := &agentv1.Entry{
		Id:             e.ID,
		SpiffeId:       e.SPIFFEID,
		ParentId:       e.ParentID,
		X509SvidTtl:    e.X509SVIDTTL,
		JwtSvidTtl:     e.JWTSVIDTTL,
		DnsNames:       e.DNSNames,
		Hint:           e.Hint,
		RevisionNumber: e.RevisionNumber,
	}
	for _, sel := range e.Selectors {
		out.Selectors = append(out.Selectors, &agentv1.Selector{Type: sel.Type, Value: sel.Value})
	}
	return out
}

// ToProtoBundle converts the CA's bundle for the wire.
func ToProtoBundle(b ca.Bundle) (*agentv1.Bundle, error) {
	out := &agentv1.Bundle{TrustDomain: b.TrustDomain.String(), SequenceNumber: b.Sequence, RefreshHintSeconds: 300}
	for _, c := range b.X509Authorities {
		out.X509Authorities = append(out.X509Authorities, c.Raw)
	}
	for _, k := range b.JWTAuthorities {
		der, err := x509.MarshalPKIXPublicKey(k.PublicKey)
		if err != nil {
			return nil, fmt.Errorf("encoding JWT authority %s: %w", k.KeyID, err)
		}
		out.JwtAuthorities = append(out.JwtAuthorities, &agentv1.JWTAuthority{KeyId: k.KeyID, PublicKey: der, ExpiresAt: k.NotAfter.Unix()})
	}
	return out, nil
}
