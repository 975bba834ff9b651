package agentapi

import (
	"context"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/server/ca"
)

// BatchNewX509SVID signs workload CSRs for entries the calling agent is
// authorized for. Each CSR gets its own status: one bad CSR does not fail
// the batch, and an unauthorized entry is PermissionDenied.
func (s *Service) BatchNewX509SVID(ctx context.Context, req *agentv1.BatchNewX509SVIDRequest) (*agentv1.BatchNewX509SVIDResponse, error) {
	c, err := s.authenticate(ctx)
	if err != nil {
		return nil, err
	}
	if len(req.Params) == 0 {
		return nil, status.Error(codes.InvalidArgument, "no CSRs in the batch")
	}
	if len(req.Params) > MaxBatchCSRs {
		return nil, status.Errorf(codes.InvalidArgument, "batch of %d CSRs exceeds the limit of %d", len(req.Params), MaxBatchCSRs)
	}
	results := make([]*agentv1.X509SVIDResult, len(req.Params))
	now := s.cfg.Clock()
	// CSR checks and signatures are CPU and HSM bound and independent: one
	// agent's batch uses every core (the HSM has a session pool).
	workers := min(runtime.GOMAXPROCS(0), (len(req.Params)+csrsPerWorker-1)/csrsPerWorker)
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= len(req.Params) || ctx.Err() != nil {
					return
				}
				results[i] = s.signOne(c, req.Params[i], now)
			}
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, status.FromContextError(err).Err()
	}
	return &agentv1.BatchNewX509SVIDResponse{Results: results}, nil
}

// csrsPerWorker is the least work worth a goroutine of its own.
const csrsPerWorker = 8

func (s *Service) signOne(c *caller, p *agentv1.X509SVIDParams, now time.Time) *agentv1.X509SVIDResult {
	fail := func(code codes.Code, msg string) *agentv1.X509SVIDResult {
		return &agentv1.X509SVIDResult{Status: &agentv1.Status{Code: int32(code), Message: msg}}
	}
	if p == nil || p.EntryId == "" {
		return fail(codes.InvalidArgument, "entry_id is required")
	}
	if len(p.Csr) == 0 || len(p.Csr) > MaxCSRBytes {
		return fail(codes.InvalidArgument, "csr is missing or larger than 16 KiB")
	}
	entry, ok := s.cfg.Entries.AuthorizedEntry(c.id, c.node.Selectors, p.EntryId)
	if !ok {
		return fail(codes.PermissionDenied, "entry "+p.EntryId+" is not authorized for this agent")
	}
	csr, err := ca.ParseCSR(p.Csr)
	if err != nil {
		return fail(codes.InvalidArgument, err.Error())
	}
	id, err := spiffeid.FromString(entry.SPIFFEID)
	if err != nil {
		return fail(codes.Internal, "entry has an invalid SPIFFE ID")
	}
	ttl := s.cfg.DefaultX509SVIDTTL
	if entry.X509SVIDTTL > 0 {
		ttl = time.Duration(entry.X509SVIDTTL) * time.Second
	}
	chain, err := s.cfg.CA.SignX509SVID(ca.SVIDParams{ID: id, PublicKey: csr.PublicKey, DNSNames: entry.DNSNames, NotBefore: now, TTL: ttl})
	if err != nil {
		s.log.Error("signing X509-SVID failed", "entry", entry.ID, "spiffe_id", entry.SPIFFEID, "error", err)
		return fail(codes.Internal, "signing failed")
	}
	out := &agentv1.X509SVID{SpiffeId: id.String(), ExpiresAt: chain[0].NotAfter.Unix()}
	for _, cert := range chain {
		out.CertChain = append(out.CertChain, cert.Raw)
	}
	return &agentv1.X509SVIDResult{Status: &agentv1.Status{Code: int32(codes.OK)}, Svid: out}
}

// NewJWTSVID mints a JWT-SVID for an entry the calling agent is authorized
// for, signed by the active JWT key in the HSM.
func (s *Service) NewJWTSVID(ctx context.Context, req *agentv1.NewJWTSVIDRequest) (*agentv1.NewJWTSVIDResponse, error) {
	c, err := s.authenticate(ctx)
	if err != nil {
		return nil, err
	}
	if req.EntryId == "" {
		return nil, status.Error(codes.InvalidArgument, "entry_id is required")
	}
	if len(req.Audience) == 0 {
		return nil, status.Error(codes.InvalidArgument, "at least one audience is required")
	}
	if len(req.Audience) > MaxAudiences {
		return nil, status.Errorf(codes.InvalidArgument, "%d audiences exceed the limit of %d", len(req.Audience), MaxAudiences)
	}
	for _, a := range req.Audience {
		if a == "" || len(a) > 1024 {
			return nil, status.Error(codes.InvalidArgument, "audience values must be non-empty and at most 1024 bytes")
		}
	}
	entry, ok := s.cfg.Entries.AuthorizedEntry(c.id, c.node.Selectors, req.EntryId)
	if !ok {
		return nil, status.Errorf(codes.PermissionDenied, "entry %s is not authorized for this agent", req.EntryId)
	}
	id, err := spiffeid.FromString(entry.SPIFFEID)
	if err != nil {
		return nil, status.Error(codes.Internal, "entry has an invalid SPIFFE ID")
	}
	ttl := s.cfg.DefaultJWTSVIDTTL
	if entry.JWTSVIDTTL > 0 {
		ttl = time.Duration(entry.JWTSVIDTTL) * time.Second
	}
	now := s.cfg.Clock()
	token, exp, err := s.cfg.CA.SignJWTSVID(ca.JWTParams{ID: id, Audience: req.Audience, IssuedAt: now, TTL: ttl})
	if err != nil {
		s.log.Error("signing JWT-SVID failed", "entry", entry.ID, "error", err)
		return nil, status.Error(codes.Internal, "signing failed")
	}
	return &agentv1.NewJWTSVIDResponse{Svid: &agentv1.JWTSVID{Token: token, SpiffeId: id.String(), ExpiresAt: exp.Unix(), IssuedAt: now.Unix()}}, nil
}
