package workloadapi

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"

	"github.com/go-jose/go-jose/v4"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
)

// SecurityHeader is the gRPC metadata key every Workload API request must
// carry with the single value "true" (SSRF protection).
const SecurityHeader = "workload.spiffe.io"

// Status messages, the same as SPIRE's so operators recognise them.
const (
	msgHeaderMissing     = "security header missing from request"
	msgAttestationFailed = "workload attestation failed"
	msgNoIdentity        = "no identity issued"
)

func checkSecurityHeader(ctx context.Context, method string) error {
	if !strings.HasPrefix(method, "/"+serviceName+"/") {
		return nil // health and reflection are not Workload API methods
	}
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get(SecurityHeader); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, msgHeaderMissing)
	}
	return nil
}

func unaryHeaderCheck(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := checkSecurityHeader(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func streamHeaderCheck(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if err := checkSecurityHeader(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return handler(srv, ss)
}

// attest identifies the caller of the RPC and returns its selectors and a
// logger that names it.
func (s *Server) attest(ctx context.Context, method string) ([]Selector, *slog.Logger, error) {
	log := s.cfg.log.With("method", method)
	caller, ok := CallerFromContext(ctx)
	if !ok {
		log.Warn(msgAttestationFailed, "error", "connection has no peer credentials")
		return nil, log, status.Error(codes.Unavailable, msgAttestationFailed)
	}
	log = log.With("pid", caller.PID, "uid", caller.UID)
	sels, err := s.attestor.Attest(ctx, caller.PID)
	if err == nil {
		// After the /proc reads: the PID must still be the caller's.
		err = caller.Verify()
	}
	if err != nil {
		log.Warn(msgAttestationFailed, "error", err)
		return nil, log, status.Error(codes.Unavailable, msgAttestationFailed)
	}
	log.Debug("workload attested", "selectors", len(sels))
	return sels, log, nil
}

// FetchX509SVID implements the Workload API: a stream of every X509-SVID the
// caller is entitled to, with bundles, full state in every message.
func (s *Server) FetchX509SVID(_ *workload.X509SVIDRequest, stream workload.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
	ctx := stream.Context()
	sels, log, err := s.attest(ctx, "FetchX509SVID")
	if err != nil {
		return err
	}
	return follow(s, ctx, sels, log, func(snap *Snapshot) (*workload.X509SVIDResponse, error) {
		return x509SVIDResponse(snap, log)
	}, stream.Send)
}

// FetchX509Bundles implements the Workload API: a stream of the X.509
// bundles of the caller's trust domain and federated trust domains.
func (s *Server) FetchX509Bundles(_ *workload.X509BundlesRequest, stream workload.SpiffeWorkloadAPI_FetchX509BundlesServer) error {
	ctx := stream.Context()
	sels, log, err := s.attest(ctx, "FetchX509Bundles")
	if err != nil {
		return err
	}
	return follow(s, ctx, sels, log, func(snap *Snapshot) (*workload.X509BundlesResponse, error) {
		if len(snap.SVIDs) == 0 && !s.cfg.allowUnauthVerifiers {
			return nil, status.Error(codes.PermissionDenied, msgNoIdentity)
		}
		bundles, err := allBundles(snap)
		if err != nil {
			return nil, err
		}
		resp := &workload.X509BundlesResponse{Bundles: make(map[string][]byte, len(bundles))}
		for _, b := range bundles {
			resp.Bundles[b.TrustDomain().IDString()] = concatDER(b.X509Authorities())
		}
		return resp, nil
	}, stream.Send)
}

// FetchJWTBundles implements the Workload API: a stream of JWKS documents,
// one per trust domain, holding the JWT-SVID signing keys.
func (s *Server) FetchJWTBundles(_ *workload.JWTBundlesRequest, stream workload.SpiffeWorkloadAPI_FetchJWTBundlesServer) error {
	ctx := stream.Context()
	sels, log, err := s.attest(ctx, "FetchJWTBundles")
	if err != nil {
		return err
	}
	return follow(s, ctx, sels, log, func(snap *Snapshot) (*workload.JWTBundlesResponse, error) {
		if len(snap.SVIDs) == 0 && !s.cfg.allowUnauthVerifiers {
			return nil, status.Error(codes.PermissionDenied, msgNoIdentity)
		}
		bundles, err := allBundles(snap)
		if err != nil {
			return nil, err
		}
		resp := &workload.JWTBundlesResponse{Bundles: make(map[string][]byte, len(bundles))}
		for _, b := range bundles {
			resp.Bundles[b.TrustDomain().IDString()] = marshalJWKS(b, log)
		}
		return resp, nil
	}, stream.Send)
}

// FetchJWTSVID implements the Workload API: JWT-SVIDs for the requested
// audience, for one entitled identity or all of them.
func (s *Server) FetchJWTSVID(ctx context.Context, req *workload.JWTSVIDRequest) (*workload.JWTSVIDResponse, error) {
	if len(req.Audience) == 0 || slices.Contains(req.Audience, "") {
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	}
	var id spiffeid.ID
	if req.SpiffeId != "" {
		var err error
		if id, err = spiffeid.FromString(req.SpiffeId); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "invalid requested SPIFFE ID: %v", err)
		}
	}
	sels, log, err := s.attest(ctx, "FetchJWTSVID")
	if err != nil {
		return nil, err
	}
	svids, err := s.source.FetchJWTSVIDs(ctx, sels, slices.Clone(req.Audience), id)
	switch {
	case errors.Is(err, ErrNoIdentity):
		return nil, status.Error(codes.PermissionDenied, msgNoIdentity)
	case err != nil:
		log.Error("fetching JWT-SVIDs", "error", err)
		return nil, status.Error(codes.Unavailable, "could not fetch JWT-SVID")
	}
	resp := &workload.JWTSVIDResponse{}
	hints := make(map[string]bool)
	for _, svid := range svids {
		if !id.IsZero() && svid.ID != id {
			continue
		}
		if svid.Token == "" || svid.ID.IsZero() {
			log.Error("identity source returned an empty JWT-SVID", "spiffe_id", svid.ID.String())
			continue
		}
		if svid.Hint != "" {
			if hints[svid.Hint] {
				continue // first of a hint wins
			}
			hints[svid.Hint] = true
		}
		resp.Svids = append(resp.Svids, &workload.JWTSVID{SpiffeId: svid.ID.String(), Svid: svid.Token, Hint: svid.Hint})
	}
	if len(resp.Svids) == 0 {
		return nil, status.Error(codes.PermissionDenied, msgNoIdentity)
	}
	return resp, nil
}

// ValidateJWTSVID implements the Workload API: it validates a JWT-SVID for
// an audience against the JWT bundle of the token's trust domain.
func (s *Server) ValidateJWTSVID(ctx context.Context, req *workload.ValidateJWTSVIDRequest) (*workload.ValidateJWTSVIDResponse, error) {
	if req.Audience == "" {
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	}
	if req.Svid == "" {
		return nil, status.Error(codes.InvalidArgument, "svid must be specified")
	}
	sels, log, err := s.attest(ctx, "ValidateJWTSVID")
	if err != nil {
		return nil, err
	}
	snap, err := s.snapshot(ctx, sels, log)
	if err != nil {
		return nil, err
	}
	bundles, err := allBundles(snap)
	if err != nil {
		return nil, err
	}
	set := jwtbundle.NewSet()
	for _, b := range bundles {
		set.Add(b.JWTBundle())
	}
	svid, err := jwtsvid.ParseAndValidate(req.Svid, set, []string{req.Audience})
	if err != nil {
		// The error names the failed check, never the token.
		log.Debug("JWT-SVID validation failed", "error", err)
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	claims, err := structpb.NewStruct(jsonSafe(svid.Claims))
	if err != nil {
		log.Error("encoding JWT-SVID claims", "error", err)
		return nil, status.Error(codes.Internal, "could not encode claims")
	}
	return &workload.ValidateJWTSVIDResponse{SpiffeId: svid.ID.String(), Claims: claims}, nil
}

// snapshot returns the caller's current state once.
func (s *Server) snapshot(ctx context.Context, sels []Selector, log *slog.Logger) (*Snapshot, error) {
	sub, err := s.source.Subscribe(ctx, sels)
	if err != nil {
		log.Error("subscribing to workload identities", "error", err)
		return nil, status.Error(codes.Unavailable, "identity source unavailable")
	}
	defer sub.Close()
	select {
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	case <-s.done:
		return nil, status.Error(codes.Unavailable, "workload API server is stopping")
	case snap, ok := <-sub.Updates():
		if !ok || snap == nil {
			return nil, status.Error(codes.Unavailable, "identity source closed the subscription")
		}
		return snap, nil
	}
}

// follow runs a full-state stream: every snapshot from the source is turned
// into a response by build (a status error from build ends the stream) and
// sent, unless it is identical to the last one sent.
func follow[T proto.Message](s *Server, ctx context.Context, sels []Selector, log *slog.Logger, build func(*Snapshot) (T, error), send func(T) error) error {
	sub, err := s.source.Subscribe(ctx, sels)
	if err != nil {
		log.Error("subscribing to workload identities", "error", err)
		return status.Error(codes.Unavailable, "identity source unavailable")
	}
	defer sub.Close()
	// Only a digest of the last response is kept: a workload with many
	// SVIDs would otherwise pin a megabyte per open stream.
	var (
		last    [sha256.Size]byte
		started bool
	)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.done:
			return status.Error(codes.Unavailable, "workload API server is stopping")
		case snap, ok := <-sub.Updates():
			if !ok {
				return status.Error(codes.Unavailable, "identity source closed the subscription")
			}
			if snap == nil {
				continue
			}
			resp, err := build(snap)
			if err != nil {
				return err
			}
			if sum, ok := responseDigest(resp); ok {
				if started && sum == last {
					continue
				}
				last, started = sum, true
			}
			if err := send(resp); err != nil {
				return err
			}
		}
	}
}

// responseDigest identifies a response's content. X509-SVID responses, the
// large ones (about 1.3 KB per SVID), are hashed field by field rather than
// marshalled once more just for the comparison; every field, each with its
// length, goes in, so different responses cannot collide by concatenation.
func responseDigest(m proto.Message) (sum [sha256.Size]byte, ok bool) {
	r, isX509 := m.(*workload.X509SVIDResponse)
	if !isX509 {
		b, err := (proto.MarshalOptions{Deterministic: true}).Marshal(m)
		if err != nil {
			return sum, false
		}
		return sha256.Sum256(b), true
	}
	h := sha256.New()
	var n [8]byte
	count := func(c int) {
		binary.BigEndian.PutUint64(n[:], uint64(c))
		h.Write(n[:])
	}
	field := func(b []byte) {
		count(len(b))
		h.Write(b)
	}
	count(len(r.Svids))
	for _, s := range r.Svids {
		field([]byte(s.SpiffeId))
		field(s.X509Svid)
		field(s.X509SvidKey)
		field(s.Bundle)
		field([]byte(s.Hint))
	}
	count(len(r.Crl))
	for _, c := range r.Crl {
		field(c)
	}
	tds := slices.Sorted(maps.Keys(r.FederatedBundles))
	count(len(tds))
	for _, td := range tds {
		field([]byte(td))
		field(r.FederatedBundles[td])
	}
	copy(sum[:], h.Sum(nil))
	return sum, true
}

func x509SVIDResponse(snap *Snapshot, log *slog.Logger) (*workload.X509SVIDResponse, error) {
	if len(snap.SVIDs) == 0 {
		return nil, status.Error(codes.PermissionDenied, msgNoIdentity)
	}
	bundles, err := allBundles(snap)
	if err != nil {
		return nil, err
	}
	byTD := make(map[spiffeid.TrustDomain][]byte, len(bundles))
	for _, b := range bundles {
		byTD[b.TrustDomain()] = concatDER(b.X509Authorities())
	}
	resp := &workload.X509SVIDResponse{}
	hints := make(map[string]bool)
	for _, svid := range snap.SVIDs {
		if svid.Hint != "" {
			if hints[svid.Hint] {
				log.Debug("dropping X509-SVID with a duplicate hint", "spiffe_id", svid.ID.String(), "hint", svid.Hint)
				continue
			}
			hints[svid.Hint] = true
		}
		m, err := encodeX509SVID(svid, byTD)
		if err != nil {
			log.Error("encoding X509-SVID", "spiffe_id", svid.ID.String(), "error", err)
			continue
		}
		resp.Svids = append(resp.Svids, m)
	}
	if len(resp.Svids) == 0 {
		return nil, status.Error(codes.Unavailable, "no valid X509-SVID available")
	}
	if len(snap.FederatedBundles) > 0 {
		resp.FederatedBundles = make(map[string][]byte, len(snap.FederatedBundles))
		for _, b := range snap.FederatedBundles {
			if b != nil && b.TrustDomain() != snap.Bundle.TrustDomain() {
				resp.FederatedBundles[b.TrustDomain().IDString()] = byTD[b.TrustDomain()]
			}
		}
	}
	return resp, nil
}

func encodeX509SVID(svid X509SVID, bundles map[spiffeid.TrustDomain][]byte) (*workload.X509SVID, error) {
	if svid.ID.IsZero() {
		return nil, errors.New("no SPIFFE ID")
	}
	if len(svid.Certificates) == 0 || svid.Certificates[0] == nil {
		return nil, errors.New("no certificate")
	}
	if svid.PrivateKey == nil {
		return nil, errors.New("no private key")
	}
	key, err := x509.MarshalPKCS8PrivateKey(svid.PrivateKey)
	if err != nil {
		return nil, fmt.Errorf("encoding private key as PKCS#8: %w", err)
	}
	bundle, ok := bundles[svid.ID.TrustDomain()]
	if !ok || len(bundle) == 0 {
		return nil, fmt.Errorf("no X.509 bundle for trust domain %q", svid.ID.TrustDomain().Name())
	}
	return &workload.X509SVID{
		SpiffeId:    svid.ID.String(),
		X509Svid:    concatDER(svid.Certificates),
		X509SvidKey: key,
		Bundle:      bundle,
		Hint:        svid.Hint,
	}, nil
}

// allBundles returns the own bundle first, then the federated ones.
func allBundles(snap *Snapshot) ([]*spiffebundle.Bundle, error) {
	if snap.Bundle == nil {
		return nil, status.Error(codes.Unavailable, "no trust bundle available yet")
	}
	out := make([]*spiffebundle.Bundle, 0, 1+len(snap.FederatedBundles))
	out = append(out, snap.Bundle)
	for _, b := range snap.FederatedBundles {
		if b != nil && b.TrustDomain() != snap.Bundle.TrustDomain() {
			out = append(out, b)
		}
	}
	return out, nil
}

func concatDER(certs []*x509.Certificate) []byte {
	n := 0
	for _, c := range certs {
		if c != nil {
			n += len(c.Raw)
		}
	}
	out := make([]byte, 0, n)
	for _, c := range certs {
		if c != nil {
			out = append(out, c.Raw...)
		}
	}
	return out
}

// marshalJWKS encodes the JWT authorities of b as a JWKS, keys sorted by key
// ID so that an unchanged bundle encodes to the same bytes.
func marshalJWKS(b *spiffebundle.Bundle, log *slog.Logger) []byte {
	auths := b.JWTAuthorities()
	kids := make([]string, 0, len(auths))
	for kid := range auths {
		kids = append(kids, kid)
	}
	slices.Sort(kids)
	set := jose.JSONWebKeySet{Keys: make([]jose.JSONWebKey, 0, len(kids))}
	for _, kid := range kids {
		k := jose.JSONWebKey{Key: auths[kid], KeyID: kid}
		if !k.Valid() {
			log.Error("skipping unusable JWT authority", "trust_domain", b.TrustDomain().Name(), "kid", kid)
			continue
		}
		set.Keys = append(set.Keys, k)
	}
	out, err := json.Marshal(set)
	if err != nil {
		log.Error("encoding JWT bundle", "trust_domain", b.TrustDomain().Name(), "error", err)
		return []byte(`{"keys":[]}`)
	}
	return out
}

// jsonSafe converts claim values that structpb does not take (such as
// json.Number or typed slices) by a JSON round trip.
func jsonSafe(claims map[string]any) map[string]any {
	b, err := json.Marshal(claims)
	if err != nil {
		return claims
	}
	var out map[string]any
	if err := json.Unmarshal(b, &out); err != nil {
		return claims
	}
	return out
}
