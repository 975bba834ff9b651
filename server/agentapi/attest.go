package agentapi

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/server/ca"
	"github.com/ironroot/ironroot/server/store"
	"github.com/ironroot/ironroot/tpm"
	"github.com/ironroot/ironroot/tpm/verifier"
)

// Limits on the fields of one attestation, checked before any of them
// reaches the verifier. The gRPC server caps a whole message at 4 MiB.
const (
	// MaxTPMStructBytes bounds one raw TPM structure (EK and AK public
	// areas, creation data, attestations, signatures); real ones are a
	// few hundred bytes.
	MaxTPMStructBytes = 8 << 10
	// MaxEKCertificateBytes bounds the EK certificate and each intermediate.
	MaxEKCertificateBytes = 16 << 10
	// MaxEKIntermediates bounds the intermediates an agent may offer.
	MaxEKIntermediates = 16
	// MaxEvidencePCRs bounds the PCR values in the evidence (a bank has 24).
	MaxEvidencePCRs = 24
	// MaxEventLogBytes bounds the measured-boot log; real ones are tens of
	// KiB, and the whole evidence message must fit in 4 MiB.
	MaxEventLogBytes = 3 << 20
	// maxActivationSecret bounds the activation proof (the secret is 32
	// bytes; a TPM2B_DIGEST holds at most 64).
	maxActivationSecret = 64
)

// pcrBank is the only PCR bank the verifier accepts.
const pcrBank = "sha256"

// NodeEvidence is the JSON summary of a node's attestation stored on its
// record (and shown by `ironroot-server agent show`). It holds public
// material only.
type NodeEvidence struct {
	// EKHash is the lowercase hex SHA-256 of the EK public key's PKIX DER.
	EKHash string `json:"ek_hash"`
	// Manufacturer is the TPM vendor from the verified EK certificate, or
	// empty when the EK was admitted by the allow-list only.
	Manufacturer string `json:"manufacturer,omitempty"`
	// EKChain is the verified EK certificate chain, EK certificate first.
	EKChain []EvidenceCert `json:"ek_chain,omitempty"`
	// PCRs maps quoted SHA-256 PCR index to lowercase hex value.
	PCRs map[string]string `json:"pcrs"`
	// SecureBoot is "enabled" or "disabled" when an event log established
	// it, else empty.
	SecureBoot string `json:"secure_boot,omitempty"`
	// AttestedAt is when the evidence was verified.
	AttestedAt time.Time `json:"attested_at"`
}

// EvidenceCert is one certificate of an EK chain.
type EvidenceCert struct {
	Subject  string    `json:"subject"`
	Issuer   string    `json:"issuer"`
	NotAfter time.Time `json:"not_after"`
	PEM      string    `json:"pem"`
}

// Attest runs TPM node attestation (see package tpm/verifier) over one
// stream: Identity → CredentialChallenge → ActivationProof → QuoteRequest
// → PlatformEvidence → AttestResult. Each step must arrive within the
// configured StepTimeout. Refused evidence ends the stream with
// PermissionDenied and the verifier's reason, malformed or out-of-order
// messages with InvalidArgument; nothing is stored unless the whole
// attestation succeeded. The agent ID is derived from the EK, so a node
// that re-attests keeps its ID and gets its selectors replaced; a banned
// node is refused until it is evicted.
func (s *Service) Attest(stream agentv1.Agent_AttestServer) error {
	ctx := stream.Context()
	from := "unknown"
	var addr net.Addr
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		addr, from = p.Addr, p.Addr.String()
	}
	if !s.limiter.allow(addr) {
		s.log.Warn("node attestation rate-limited", "peer", from)
		return status.Error(codes.ResourceExhausted, "too many attestation attempts from this address: retry later")
	}
	a := &attestation{s: s, stream: stream}
	res, err := a.run(ctx)
	if err != nil {
		st := status.Convert(err)
		attrs := []any{"peer", from, "stage", a.stage, "agent_id", a.agentID,
			"ek_hash", a.ekHash, "code", st.Code().String(), "reason", st.Message()}
		if a.detail != "" {
			attrs = append(attrs, "detail", a.detail)
		}
		s.log.Info("node attestation refused", attrs...)
		return err
	}
	s.log.Info("node attested", "peer", from, "agent_id", res.SpiffeId, "ek_hash", a.ekHash,
		"serial", a.serial, "renewed", a.renewed, "selectors", len(res.Selectors))
	return nil
}

// attestation is the state of one Attest stream, for its log lines.
type attestation struct {
	s      *Service
	stream agentv1.Agent_AttestServer

	stage   string
	detail  string // refusal detail for the log only
	ekHash  string
	agentID string
	serial  string
	renewed bool
}

func (a *attestation) run(ctx context.Context) (*agentv1.AttestResult, error) {
	s := a.s

	// Step 1: identity → credential challenge.
	a.stage = "identity"
	stepCtx, cancel := context.WithTimeout(ctx, s.cfg.StepTimeout)
	defer cancel()
	req, err := a.recv(ctx, stepCtx, "identity")
	if err != nil {
		return nil, err
	}
	id, err := identityFromProto(req.GetIdentity(), req)
	if err != nil {
		return nil, err
	}
	sess, challenge, err := s.cfg.Verifier.Begin(stepCtx, id)
	if err != nil {
		return nil, a.refusal(ctx, "checking the TPM identity", err)
	}
	a.ekHash = sess.EKHash()
	agentID, err := AgentID(s.cfg.TrustDomain, a.ekHash)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "deriving the agent ID: %v", err)
	}
	a.agentID = agentID.String()
	// A banned node is refused before it costs a quote; the check is
	// repeated before signing, since a ban may land mid-session.
	prev, err := a.node(stepCtx, agentID)
	if err != nil {
		return nil, err
	}
	prevClock, err := previousClock(prev)
	if err != nil {
		return nil, err
	}
	if err := a.send(&agentv1.AttestResponse{Step: &agentv1.AttestResponse_Challenge{Challenge: &agentv1.CredentialChallenge{
		Credential: challenge.Credential, Secret: challenge.Secret,
	}}}); err != nil {
		return nil, err
	}
	cancel()

	// Step 2: activation proof → quote request with a fresh nonce.
	a.stage = "activation"
	stepCtx, cancel = context.WithTimeout(ctx, s.cfg.StepTimeout)
	defer cancel()
	if req, err = a.recv(ctx, stepCtx, "proof"); err != nil {
		return nil, err
	}
	proof := req.GetProof()
	if proof == nil {
		return nil, outOfOrder("proof", req)
	}
	if len(proof.Secret) == 0 || len(proof.Secret) > maxActivationSecret {
		return nil, status.Errorf(codes.InvalidArgument, "proof.secret must be 1–%d bytes", maxActivationSecret)
	}
	nonce, err := sess.Activate(stepCtx, tpm.ActivationProof{Secret: proof.Secret})
	if err != nil {
		return nil, a.refusal(ctx, "checking the activation proof", err)
	}
	pcrs := s.cfg.Verifier.PCRs()
	qr := &agentv1.QuoteRequest{Nonce: nonce, PcrBank: pcrBank, Pcrs: make([]uint32, len(pcrs))}
	for i, p := range pcrs {
		qr.Pcrs[i] = uint32(p)
	}
	if err := a.send(&agentv1.AttestResponse{Step: &agentv1.AttestResponse_QuoteRequest{QuoteRequest: qr}}); err != nil {
		return nil, err
	}
	cancel()

	// Step 3: platform evidence → agent SVID.
	a.stage = "evidence"
	stepCtx, cancel = context.WithTimeout(ctx, s.cfg.StepTimeout)
	defer cancel()
	if req, err = a.recv(ctx, stepCtx, "evidence"); err != nil {
		return nil, err
	}
	pev := req.GetEvidence()
	if pev == nil {
		return nil, outOfOrder("evidence", req)
	}
	ev, err := evidenceFromProto(pev)
	if err != nil {
		return nil, err
	}
	// The CSR is parsed before Finish so a malformed one is InvalidArgument;
	// whether it is for the certified key is decided after.
	csr, err := x509.ParseCertificateRequest(pev.Csr)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "evidence.csr is not a PKCS#10 request: %v", err)
	}
	res, err := sess.Finish(stepCtx, ev, prevClock)
	if err != nil {
		return nil, a.refusal(ctx, "verifying the platform evidence", err)
	}
	if res.EKHash != a.ekHash {
		return nil, status.Error(codes.Internal, "the verified EK differs from the session's")
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, status.Errorf(codes.PermissionDenied, "the CSR signature is invalid: %v", err)
	}
	if !publicKeyEqual(csr.PublicKey, res.AgentKey) {
		return nil, status.Error(codes.PermissionDenied, "the CSR is not for the TPM-resident key the attestation key certified")
	}

	a.stage = "issue"
	if prev, err = a.node(stepCtx, agentID); err != nil {
		return nil, err
	}
	a.renewed = prev != nil
	sels, err := nodeSelectors(res)
	if err != nil {
		return nil, err
	}
	now := s.cfg.Clock()
	evidence, err := json.Marshal(summarize(res, now))
	if err != nil {
		return nil, status.Errorf(codes.Internal, "encoding the evidence summary: %v", err)
	}
	clock, err := json.Marshal(res.Clock)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "encoding the TPM clock: %v", err)
	}
	chain, err := s.cfg.CA.SignX509SVID(ca.SVIDParams{ID: agentID, PublicKey: csr.PublicKey, NotBefore: now, TTL: s.cfg.AgentTTL})
	if err != nil {
		s.log.Error("signing agent SVID failed", "agent_id", a.agentID, "error", err)
		return nil, status.Error(codes.Internal, "signing the agent SVID failed")
	}
	leaf := chain[0]
	bundle, err := ToProtoBundle(s.cfg.CA.Bundle())
	if err != nil {
		return nil, status.Errorf(codes.Internal, "encoding the bundle: %v", err)
	}
	result := &agentv1.AttestResult{SpiffeId: a.agentID, Bundle: bundle}
	for _, c := range chain {
		result.SvidChain = append(result.SvidChain, c.Raw)
	}
	for _, sel := range sels {
		result.Selectors = append(result.Selectors, &agentv1.Selector{Type: sel.Type, Value: sel.Value})
	}
	a.serial = leaf.SerialNumber.String()
	// The record is written last: up to here a failure leaves no trace.
	if _, err := s.cfg.Store.UpsertNode(stepCtx, &store.Node{
		SPIFFEID:     a.agentID,
		EKHash:       a.ekHash,
		Selectors:    sels,
		Evidence:     evidence,
		CertSerial:   a.serial,
		CertNotAfter: leaf.NotAfter,
		Clock:        clock,
	}); err != nil {
		if errors.Is(err, store.ErrBanned) {
			return nil, status.Errorf(codes.PermissionDenied, "agent %s is banned: an operator must evict it before it may attest again", a.agentID)
		}
		s.log.Error("storing node record failed", "agent_id", a.agentID, "error", err)
		return nil, status.Error(codes.Internal, "storing the node record failed")
	}
	// If this send fails the agent simply attests again; its record
	// already names the new serial, so the undelivered SVID is harmless.
	if err := a.send(&agentv1.AttestResponse{Step: &agentv1.AttestResponse_Result{Result: result}}); err != nil {
		return nil, err
	}
	return result, nil
}

// recv receives the next request within the step's deadline. A stalled
// client gets DeadlineExceeded; the blocked Recv ends when the handler
// returns and gRPC cancels the stream.
func (a *attestation) recv(streamCtx, stepCtx context.Context, want string) (*agentv1.AttestRequest, error) {
	type received struct {
		req *agentv1.AttestRequest
		err error
	}
	ch := make(chan received, 1)
	go func() {
		req, err := a.stream.Recv()
		ch <- received{req, err}
	}()
	select {
	case r := <-ch:
		switch {
		case errors.Is(r.err, io.EOF):
			return nil, status.Errorf(codes.InvalidArgument, "the agent closed the stream before sending its %s", want)
		case r.err != nil:
			if streamCtx.Err() != nil {
				return nil, status.FromContextError(streamCtx.Err()).Err()
			}
			return nil, r.err
		}
		return r.req, nil
	case <-stepCtx.Done():
		if streamCtx.Err() != nil {
			return nil, status.FromContextError(streamCtx.Err()).Err()
		}
		return nil, status.Errorf(codes.DeadlineExceeded, "no %s within the step timeout of %s", want, a.s.cfg.StepTimeout)
	}
}

func (a *attestation) send(resp *agentv1.AttestResponse) error {
	if err := a.stream.Send(resp); err != nil {
		return status.Errorf(codes.Unavailable, "sending the %s response: %v", a.stage, err)
	}
	return nil
}

// node returns the existing record of the agent, nil when there is none,
// and refuses a banned node.
func (a *attestation) node(ctx context.Context, id spiffeid.ID) (*store.Node, error) {
	n, err := a.s.cfg.Store.GetNode(ctx, id.String())
	switch {
	case errors.Is(err, store.ErrNotFound):
		return nil, nil
	case err != nil:
		a.s.log.Error("reading node record failed", "agent_id", id.String(), "error", err)
		return nil, status.Error(codes.Internal, "reading the node record failed")
	case n.Banned:
		return nil, status.Errorf(codes.PermissionDenied, "agent %s is banned: an operator must evict it before it may attest again", id)
	}
	return n, nil
}

// refusal maps a verifier error to a status: refused evidence is
// PermissionDenied with the verifier's reason (which never holds a
// secret), malformed structures InvalidArgument.
func (a *attestation) refusal(streamCtx context.Context, doing string, err error) error {
	switch {
	case errors.Is(err, verifier.ErrEKNotAllowed):
		// The detail may name the server's allow-list file and why it could
		// not be read: that stays in the server log.
		a.detail = err.Error()
		return status.Errorf(codes.PermissionDenied, "%s: %v", doing, verifier.ErrEKNotAllowed)
	case errors.Is(err, verifier.ErrMalformed):
		return status.Errorf(codes.InvalidArgument, "%s: %v", doing, err)
	case isVerifierRefusal(err):
		return status.Errorf(codes.PermissionDenied, "%s: %v", doing, err)
	case errors.Is(err, context.DeadlineExceeded) && streamCtx.Err() == nil:
		return status.Errorf(codes.DeadlineExceeded, "%s: exceeded the step timeout of %s", doing, a.s.cfg.StepTimeout)
	case streamCtx.Err() != nil:
		return status.FromContextError(streamCtx.Err()).Err()
	}
	a.s.log.Error("node attestation failed", "stage", a.stage, "ek_hash", a.ekHash, "error", err)
	return status.Errorf(codes.Internal, "%s failed on the server", doing)
}

// refusals are the verifier's sentinel errors for evidence it refuses.
var refusals = []error{
	verifier.ErrEKUntrusted, verifier.ErrEKNotAllowed, verifier.ErrEKMismatch, verifier.ErrEKTemplate,
	verifier.ErrAKInvalid, verifier.ErrActivation, verifier.ErrNonce, verifier.ErrPCRSelection,
	verifier.ErrQuote, verifier.ErrPCRValues, verifier.ErrEventLog, verifier.ErrClock,
	verifier.ErrPCRPolicy, verifier.ErrKeyCertification,
}

func isVerifierRefusal(err error) bool {
	for _, r := range refusals {
		if errors.Is(err, r) {
			return true
		}
	}
	return false
}

// outOfOrder reports a message of the wrong kind (or none) for the step.
func outOfOrder(want string, got *agentv1.AttestRequest) error {
	kind := "an empty message"
	switch got.GetStep().(type) {
	case *agentv1.AttestRequest_Identity:
		kind = "identity"
	case *agentv1.AttestRequest_Proof:
		kind = "proof"
	case *agentv1.AttestRequest_Evidence:
		kind = "evidence"
	}
	return status.Errorf(codes.InvalidArgument, "out of order: expected %s, got %s", want, kind)
}

func checkBytes(field string, b []byte, limit int) error {
	if len(b) == 0 {
		return status.Errorf(codes.InvalidArgument, "%s is required", field)
	}
	if len(b) > limit {
		return status.Errorf(codes.InvalidArgument, "%s of %d bytes exceeds the limit of %d", field, len(b), limit)
	}
	return nil
}

func identityFromProto(in *agentv1.Identity, req *agentv1.AttestRequest) (tpm.Identity, error) {
	if in == nil {
		return tpm.Identity{}, outOfOrder("identity", req)
	}
	if err := checkBytes("identity.ek_public", in.EkPublic, MaxTPMStructBytes); err != nil {
		return tpm.Identity{}, err
	}
	if len(in.EkCertificate) > MaxEKCertificateBytes {
		return tpm.Identity{}, status.Errorf(codes.InvalidArgument, "identity.ek_certificate of %d bytes exceeds the limit of %d", len(in.EkCertificate), MaxEKCertificateBytes)
	}
	if len(in.EkIntermediates) > MaxEKIntermediates {
		return tpm.Identity{}, status.Errorf(codes.InvalidArgument, "%d EK intermediates exceed the limit of %d", len(in.EkIntermediates), MaxEKIntermediates)
	}
	for i, c := range in.EkIntermediates {
		if err := checkBytes(fmt.Sprintf("identity.ek_intermediates[%d]", i), c, MaxEKCertificateBytes); err != nil {
			return tpm.Identity{}, err
		}
	}
	if in.Ak == nil {
		return tpm.Identity{}, status.Error(codes.InvalidArgument, "identity.ak is required")
	}
	for _, f := range []struct {
		name string
		b    []byte
	}{
		{"identity.ak.public", in.Ak.Public},
		{"identity.ak.create_data", in.Ak.CreateData},
		{"identity.ak.create_attestation", in.Ak.CreateAttestation},
		{"identity.ak.create_signature", in.Ak.CreateSignature},
	} {
		if err := checkBytes(f.name, f.b, MaxTPMStructBytes); err != nil {
			return tpm.Identity{}, err
		}
	}
	return tpm.Identity{
		EKPublic:        in.EkPublic,
		EKCertificate:   in.EkCertificate,
		EKIntermediates: in.EkIntermediates,
		AK: tpm.AttestationKey{
			Public:            in.Ak.Public,
			CreateData:        in.Ak.CreateData,
			CreateAttestation: in.Ak.CreateAttestation,
			CreateSignature:   in.Ak.CreateSignature,
		},
	}, nil
}

func evidenceFromProto(in *agentv1.PlatformEvidence) (tpm.PlatformEvidence, error) {
	var out tpm.PlatformEvidence
	if in.Quote == nil {
		return out, status.Error(codes.InvalidArgument, "evidence.quote is required")
	}
	if err := checkBytes("evidence.quote.attest", in.Quote.Attest, MaxTPMStructBytes); err != nil {
		return out, err
	}
	if err := checkBytes("evidence.quote.signature", in.Quote.Signature, MaxTPMStructBytes); err != nil {
		return out, err
	}
	if len(in.Pcrs) == 0 || len(in.Pcrs) > MaxEvidencePCRs {
		return out, status.Errorf(codes.InvalidArgument, "evidence.pcrs must hold 1–%d values, got %d", MaxEvidencePCRs, len(in.Pcrs))
	}
	out.PCRs = make([]tpm.PCR, 0, len(in.Pcrs))
	for i, p := range in.Pcrs {
		switch {
		case p == nil:
			return out, status.Errorf(codes.InvalidArgument, "evidence.pcrs[%d] is empty", i)
		case p.Index > 23:
			return out, status.Errorf(codes.InvalidArgument, "evidence.pcrs[%d]: index %d out of range 0–23", i, p.Index)
		case p.Alg != pcrBank:
			return out, status.Errorf(codes.InvalidArgument, "evidence.pcrs[%d]: bank %.16q, want %s", i, p.Alg, pcrBank)
		case len(p.Digest) == 0 || len(p.Digest) > 64:
			return out, status.Errorf(codes.InvalidArgument, "evidence.pcrs[%d]: digest of %d bytes", i, len(p.Digest))
		}
		out.PCRs = append(out.PCRs, tpm.PCR{Index: int(p.Index), Alg: p.Alg, Digest: p.Digest})
	}
	if len(in.EventLog) > MaxEventLogBytes {
		return out, status.Errorf(codes.InvalidArgument, "evidence.event_log of %d bytes exceeds the limit of %d", len(in.EventLog), MaxEventLogBytes)
	}
	if in.Key == nil {
		return out, status.Error(codes.InvalidArgument, "evidence.key (the certified TPM-resident key) is required")
	}
	for _, f := range []struct {
		name string
		b    []byte
	}{
		{"evidence.key.public", in.Key.Public},
		{"evidence.key.certify_info", in.Key.CertifyInfo},
		{"evidence.key.signature", in.Key.Signature},
	} {
		if err := checkBytes(f.name, f.b, MaxTPMStructBytes); err != nil {
			return out, err
		}
	}
	if err := checkBytes("evidence.csr", in.Csr, MaxCSRBytes); err != nil {
		return out, err
	}
	out.Quote = tpm.Quote{Attest: in.Quote.Attest, Signature: in.Quote.Signature}
	out.EventLog = in.EventLog
	out.Key = tpm.CertifiedKey{Public: in.Key.Public, CertifyInfo: in.Key.CertifyInfo, Signature: in.Key.Signature}
	return out, nil
}

// previousClock decodes the TPM clock stored at the node's last
// attestation, so the verifier can refuse a clock that went back.
func previousClock(n *store.Node) (*verifier.ClockInfo, error) {
	if n == nil || len(n.Clock) == 0 {
		return nil, nil
	}
	var c verifier.ClockInfo
	if err := json.Unmarshal(n.Clock, &c); err != nil {
		// Fail closed: skipping the check would let a rolled-back TPM in.
		return nil, status.Errorf(codes.Internal, "the node record of %s holds an unreadable TPM clock: evict the node to reset it", n.SPIFFEID)
	}
	return &c, nil
}

func nodeSelectors(res *verifier.Result) ([]store.Selector, error) {
	raw := res.Selectors()
	out := make([]store.Selector, 0, len(raw))
	for _, r := range raw {
		sel, err := store.ParseSelector(r)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "node selector: %v", err)
		}
		out = append(out, sel)
	}
	return out, nil
}

func summarize(res *verifier.Result, now time.Time) NodeEvidence {
	ev := NodeEvidence{
		EKHash:       res.EKHash,
		Manufacturer: res.Manufacturer,
		PCRs:         make(map[string]string, len(res.PCRs)),
		AttestedAt:   now.UTC(),
	}
	for _, c := range res.EKChain {
		ev.EKChain = append(ev.EKChain, EvidenceCert{
			Subject:  c.Subject.String(),
			Issuer:   c.Issuer.String(),
			NotAfter: c.NotAfter.UTC(),
			PEM:      string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})),
		})
	}
	for i, d := range res.PCRs {
		ev.PCRs[strconv.Itoa(i)] = hex.EncodeToString(d)
	}
	if res.SecureBoot != nil {
		ev.SecureBoot = "disabled"
		if *res.SecureBoot {
			ev.SecureBoot = "enabled"
		}
	}
	return ev
}

func publicKeyEqual(a, b crypto.PublicKey) bool {
	eq, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && b != nil && eq.Equal(b)
}
