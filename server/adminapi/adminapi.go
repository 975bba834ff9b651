// Package adminapi serves ironroot-server's administration API
// (server/api/admin/v1) on the local unix socket: registration entries,
// attested agents, the bundle and the CA's key slots. Access control is the
// socket directory's mode (0700): whoever can reach the socket administers.
package adminapi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ironroot/ironroot/server/agentapi"
	adminv1 "github.com/ironroot/ironroot/server/api/admin/v1"
	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/server/ca"
	"github.com/ironroot/ironroot/server/store"
)

// MaxBatch bounds BatchCreateEntry.
const MaxBatch = 10000

// Config wires the admin API.
type Config struct {
	TrustDomain spiffeid.TrustDomain
	Store       store.Store
	CA          *ca.Manager
	Logger      *slog.Logger
}

// Service implements adminv1.AdminServer.
type Service struct {
	adminv1.UnimplementedAdminServer
	cfg      Config
	log      *slog.Logger
	serverID spiffeid.ID
}

// New returns the admin service.
func New(cfg Config) (*Service, error) {
	if cfg.TrustDomain.IsZero() || cfg.Store == nil || cfg.CA == nil {
		return nil, errors.New("admin API: trust domain, store and CA are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	id, err := spiffeid.FromPath(cfg.TrustDomain, agentapi.ServerPath)
	if err != nil {
		return nil, err
	}
	return &Service{cfg: cfg, log: cfg.Logger, serverID: id}, nil
}

// storeError maps store errors to gRPC status codes with the store's
// message, which names what was wrong.
func storeError(what string, err error) error {
	var be *store.BatchError
	msg := err.Error()
	// Store errors already name their operation; do not say it twice.
	if !strings.HasPrefix(msg, what) {
		msg = what + ": " + msg
	}
	switch {
	case errors.As(err, &be) && errors.Is(be.Err, store.ErrAlreadyExists):
		return status.Error(codes.AlreadyExists, msg)
	case errors.As(err, &be):
		return status.Error(codes.InvalidArgument, msg)
	case errors.Is(err, store.ErrNotFound):
		return status.Error(codes.NotFound, msg)
	case errors.Is(err, store.ErrAlreadyExists):
		return status.Error(codes.AlreadyExists, msg)
	case errors.Is(err, store.ErrInvalid):
		return status.Error(codes.InvalidArgument, msg)
	case errors.Is(err, store.ErrBanned):
		return status.Error(codes.FailedPrecondition, msg)
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.Canceled, msg)
	}
	return status.Error(codes.Internal, msg)
}

// fromProtoEntry converts and checks an entry from a request: IDs must be
// SPIFFE IDs of this trust domain, and reserved Ironroot IDs cannot be
// issued to workloads.
func (s *Service) fromProtoEntry(e *agentv1.Entry) (*store.Entry, error) {
	if e == nil {
		return nil, errors.New("entry is empty")
	}
	id, err := spiffeid.FromString(e.SpiffeId)
	if err != nil {
		return nil, fmt.Errorf("spiffe_id %q: %v", e.SpiffeId, err)
	}
	parent, err := spiffeid.FromString(e.ParentId)
	if err != nil {
		return nil, fmt.Errorf("parent_id %q: %v", e.ParentId, err)
	}
	if id.TrustDomain() != s.cfg.TrustDomain || parent.TrustDomain() != s.cfg.TrustDomain {
		return nil, fmt.Errorf("spiffe_id and parent_id must be in trust domain %s", s.cfg.TrustDomain)
	}
	if id.Path() == "" {
		return nil, fmt.Errorf("spiffe_id %s has no path", id)
	}
	if id == s.serverID || strings.HasPrefix(id.Path(), agentapi.AgentPathPrefix) {
		return nil, fmt.Errorf("spiffe_id %s is reserved for Ironroot's server and agents", id)
	}
	if id == parent {
		return nil, fmt.Errorf("spiffe_id and parent_id are both %s", id)
	}
	if e.X509SvidTtl < 0 || e.JwtSvidTtl < 0 {
		return nil, errors.New("TTLs must not be negative")
	}
	out := &store.Entry{
		ID:          e.Id,
		SPIFFEID:    id.String(),
		ParentID:    parent.String(),
		X509SVIDTTL: e.X509SvidTtl,
		JWTSVIDTTL:  e.JwtSvidTtl,
		DNSNames:    e.DnsNames,
		Hint:        e.Hint,
	}
	if len(e.Selectors) == 0 {
		return nil, errors.New("at least one selector is required")
	}
	for _, sel := range e.Selectors {
		if sel == nil {
			return nil, errors.New("empty selector")
		}
		out.Selectors = append(out.Selectors, store.Selector{Type: sel.Type, Value: sel.Value})
	}
	if err := out.Validate(); err != nil {
		return nil, err
	}
	return out, nil
}

// BatchCreateEntry creates entries all-or-nothing.
func (s *Service) BatchCreateEntry(ctx context.Context, req *adminv1.BatchCreateEntryRequest) (*adminv1.BatchCreateEntryResponse, error) {
	if len(req.Entries) == 0 {
		return nil, status.Error(codes.InvalidArgument, "no entries in the request")
	}
	if len(req.Entries) > MaxBatch {
		return nil, status.Errorf(codes.InvalidArgument, "batch of %d entries exceeds the limit of %d", len(req.Entries), MaxBatch)
	}
	entries := make([]*store.Entry, 0, len(req.Entries))
	for i, e := range req.Entries {
		se, err := s.fromProtoEntry(e)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "entry %d: %v", i, err)
		}
		if se.ID != "" {
			return nil, status.Errorf(codes.InvalidArgument, "entry %d: the server assigns entry IDs", i)
		}
		entries = append(entries, se)
	}
	created, err := s.cfg.Store.CreateEntries(ctx, entries)
	if err != nil {
		return nil, storeError("creating entries", err)
	}
	resp := &adminv1.BatchCreateEntryResponse{}
	for _, e := range created {
		resp.Entries = append(resp.Entries, agentapi.ToProtoEntry(e))
		s.log.Info("entry created", "id", e.ID, "spiffe_id", e.SPIFFEID, "parent_id", e.ParentID)
	}
	return resp, nil
}

// UpdateEntry replaces an entry's fields.
func (s *Service) UpdateEntry(ctx context.Context, req *adminv1.UpdateEntryRequest) (*agentv1.Entry, error) {
	if req.Entry == nil || req.Entry.Id == "" {
		return nil, status.Error(codes.InvalidArgument, "entry.id is required")
	}
	se, err := s.fromProtoEntry(req.Entry)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	out, err := s.cfg.Store.UpdateEntry(ctx, se)
	if err != nil {
		return nil, storeError("updating entry "+se.ID, err)
	}
	s.log.Info("entry updated", "id", out.ID, "revision", out.RevisionNumber)
	return agentapi.ToProtoEntry(out), nil
}

// DeleteEntry deletes an entry.
func (s *Service) DeleteEntry(ctx context.Context, req *adminv1.DeleteEntryRequest) (*adminv1.DeleteEntryResponse, error) {
	if req.Id == "" {
		return nil, status.Error(codes.InvalidArgument, "id is required")
	}
	if _, err := s.cfg.Store.DeleteEntry(ctx, req.Id); err != nil {
		return nil, storeError("deleting entry "+req.Id, err)
	}
	s.log.Info("entry deleted", "id", req.Id)
	return &adminv1.DeleteEntryResponse{}, nil
}

// GetEntry returns one entry.
func (s *Service) GetEntry(ctx context.Context, req *adminv1.GetEntryRequest) (*agentv1.Entry, error) {
	if req.Id == "" {
		return nil, status.Error(codes.InvalidArgument, "id is required")
	}
	e, err := s.cfg.Store.GetEntry(ctx, req.Id)
	if err != nil {
		return nil, storeError("getting entry "+req.Id, err)
	}
	return agentapi.ToProtoEntry(e), nil
}

// ListEntries lists entries by SPIFFE ID, parent ID and exact selectors.
func (s *Service) ListEntries(ctx context.Context, req *adminv1.ListEntriesRequest) (*adminv1.ListEntriesResponse, error) {
	lr := store.ListEntriesRequest{SPIFFEID: req.SpiffeId, ParentID: req.ParentId}
	if len(req.Selectors) > 0 {
		f := &store.SelectorFilter{Match: store.MatchExact}
		for _, sel := range req.Selectors {
			f.Selectors = append(f.Selectors, store.Selector{Type: sel.GetType(), Value: sel.GetValue()})
		}
		lr.BySelectors = f
	}
	entries, _, err := s.cfg.Store.ListEntries(ctx, lr)
	if err != nil {
		return nil, storeError("listing entries", err)
	}
	resp := &adminv1.ListEntriesResponse{}
	for _, e := range entries {
		resp.Entries = append(resp.Entries, agentapi.ToProtoEntry(e))
	}
	return resp, nil
}

func toAgentInfo(n *store.Node) *adminv1.AgentInfo {
	out := &adminv1.AgentInfo{
		SpiffeId: n.SPIFFEID, EkHash: n.EKHash, Evidence: n.Evidence,
		CertSerial: n.CertSerial, Banned: n.Banned,
		CreatedAt: n.CreatedAt.Unix(), UpdatedAt: n.UpdatedAt.Unix(),
	}
	if !n.CertNotAfter.IsZero() {
		out.CertNotAfter = n.CertNotAfter.Unix()
	}
	for _, sel := range n.Selectors {
		out.Selectors = append(out.Selectors, &agentv1.Selector{Type: sel.Type, Value: sel.Value})
	}
	return out
}

func (s *Service) agentID(id string) (string, error) {
	parsed, err := spiffeid.FromString(id)
	if err != nil {
		return "", status.Errorf(codes.InvalidArgument, "spiffe_id %q: %v", id, err)
	}
	if parsed.TrustDomain() != s.cfg.TrustDomain || !strings.HasPrefix(parsed.Path(), agentapi.AgentPathPrefix) {
		return "", status.Errorf(codes.InvalidArgument, "%s is not an agent ID of %s", parsed, s.cfg.TrustDomain)
	}
	return parsed.String(), nil
}

// ListAgents lists attested agents.
func (s *Service) ListAgents(ctx context.Context, req *adminv1.ListAgentsRequest) (*adminv1.ListAgentsResponse, error) {
	lr := store.ListNodesRequest{}
	if req.BannedOnly {
		banned := true
		lr.Banned = &banned
	}
	nodes, _, err := s.cfg.Store.ListNodes(ctx, lr)
	if err != nil {
		return nil, storeError("listing agents", err)
	}
	resp := &adminv1.ListAgentsResponse{}
	for _, n := range nodes {
		resp.Agents = append(resp.Agents, toAgentInfo(n))
	}
	return resp, nil
}

// GetAgent shows one agent with its selectors and evidence summary.
func (s *Service) GetAgent(ctx context.Context, req *adminv1.GetAgentRequest) (*adminv1.AgentInfo, error) {
	id, err := s.agentID(req.SpiffeId)
	if err != nil {
		return nil, err
	}
	n, err := s.cfg.Store.GetNode(ctx, id)
	if err != nil {
		return nil, storeError("getting agent "+id, err)
	}
	return toAgentInfo(n), nil
}

// EvictAgent deletes the node record; the agent may attest afresh.
func (s *Service) EvictAgent(ctx context.Context, req *adminv1.AgentRequest) (*adminv1.AgentInfo, error) {
	id, err := s.agentID(req.SpiffeId)
	if err != nil {
		return nil, err
	}
	n, err := s.cfg.Store.GetNode(ctx, id)
	if err != nil {
		return nil, storeError("evicting agent "+id, err)
	}
	if err := s.cfg.Store.DeleteNode(ctx, id); err != nil {
		return nil, storeError("evicting agent "+id, err)
	}
	s.log.Info("agent evicted", "spiffe_id", id)
	return toAgentInfo(n), nil
}

// BanAgent bans a node: its SVID is refused and it cannot re-attest until
// evicted.
func (s *Service) BanAgent(ctx context.Context, req *adminv1.AgentRequest) (*adminv1.AgentInfo, error) {
	id, err := s.agentID(req.SpiffeId)
	if err != nil {
		return nil, err
	}
	n, err := s.cfg.Store.BanNode(ctx, id)
	if err != nil {
		return nil, storeError("banning agent "+id, err)
	}
	s.log.Info("agent banned", "spiffe_id", id)
	return toAgentInfo(n), nil
}

// GetBundle returns the trust domain's bundle.
func (s *Service) GetBundle(ctx context.Context, _ *adminv1.GetBundleRequest) (*agentv1.Bundle, error) {
	b, err := agentapi.ToProtoBundle(s.cfg.CA.Bundle())
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return b, nil
}

// ListAuthorities shows the CA's key slots with their HSM key references.
func (s *Service) ListAuthorities(ctx context.Context, _ *adminv1.ListAuthoritiesRequest) (*adminv1.ListAuthoritiesResponse, error) {
	resp := &adminv1.ListAuthoritiesResponse{}
	for _, a := range s.cfg.CA.X509Authorities() {
		resp.Authorities = append(resp.Authorities, &adminv1.Authority{
			Kind: string(a.Record.Kind), Id: a.Record.ID, State: string(a.Record.State),
			KeyUri: a.Key.URI(), NotBefore: a.Cert.NotBefore.Unix(), NotAfter: a.Cert.NotAfter.Unix(),
			Certificate: a.Cert.Raw,
		})
	}
	for _, a := range s.cfg.CA.JWTAuthorities() {
		resp.Authorities = append(resp.Authorities, &adminv1.Authority{
			Kind: string(a.Record.Kind), Id: a.Record.ID, State: string(a.Record.State),
			KeyUri: a.Key.URI(), KeyId: a.KeyID,
			NotBefore: a.Record.NotBefore.Unix(), NotAfter: a.Record.NotAfter.Unix(),
		})
	}
	return resp, nil
}
