// Package attest is the agent's side of TPM node attestation: it runs the
// server's Attest stream with the host's TPM and returns the agent SVID,
// whose key was created inside the TPM and certified by the attestation key
// over the server's nonce.
package attest

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	agentv1 "github.com/ironroot/ironroot/server/api/agent/v1"
	"github.com/ironroot/ironroot/tpm"
)

// Result is a successful attestation.
type Result struct {
	// ID is the agent's SPIFFE ID.
	ID spiffeid.ID
	// SVID is the agent X509-SVID chain, leaf first.
	SVID []*x509.Certificate
	// Key is the TPM-resident SVID key; KeyBlob is its TPM-wrapped form to
	// keep in the data directory.
	Key     *tpm.Key
	KeyBlob []byte
	// Bundle is the trust domain's bundle as the server sent it.
	Bundle *agentv1.Bundle
	// Selectors are the node selectors the server derived.
	Selectors []string
	// EKHash is the hash of the EK that was used.
	EKHash string
}

type options struct {
	ekAlgorithm string
	stepTimeout time.Duration
	log         *slog.Logger
}

// Option configures Attest.
type Option func(*options)

// WithEKAlgorithm picks the EK by algorithm (tpm.AlgRSA2048, tpm.AlgP256,
// tpm.AlgP384). By default the first of RSA-2048, P-256, P-384 that has a
// certificate is used, else the first EK found: the choice must be stable,
// since the EK names the agent.
func WithEKAlgorithm(alg string) Option { return func(o *options) { o.ekAlgorithm = alg } }

// WithStepTimeout bounds each round trip (default 30 s).
func WithStepTimeout(d time.Duration) Option { return func(o *options) { o.stepTimeout = d } }

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// ChooseEK returns the EK the agent attests with.
func ChooseEK(eks []tpm.EK, alg string) (tpm.EK, error) {
	if len(eks) == 0 {
		return tpm.EK{}, errors.New("the TPM has no endorsement key")
	}
	if alg != "" {
		for _, ek := range eks {
			if ek.Algorithm == alg {
				return ek, nil
			}
		}
		return tpm.EK{}, fmt.Errorf("the TPM has no %s endorsement key", alg)
	}
	for _, a := range []string{tpm.AlgRSA2048, tpm.AlgP256, tpm.AlgP384} {
		for _, ek := range eks {
			if ek.Algorithm == a && len(ek.Certificate) > 0 {
				return ek, nil
			}
		}
	}
	return eks[0], nil
}

// Attest runs node attestation against the server. On refusal it returns
// the server's gRPC status error (PermissionDenied says why). The TPM key it
// creates is flushed on failure.
func Attest(ctx context.Context, client agentv1.AgentClient, t *tpm.TPM, opts ...Option) (res *Result, err error) {
	o := options{stepTimeout: 30 * time.Second, log: slog.New(slog.DiscardHandler)}
	for _, opt := range opts {
		opt(&o)
	}
	eks, err := t.EndorsementKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading endorsement keys: %w", err)
	}
	ek, err := ChooseEK(eks, o.ekAlgorithm)
	if err != nil {
		return nil, err
	}
	ekHash, err := ek.Hash()
	if err != nil {
		return nil, fmt.Errorf("hashing the %s endorsement key: %w", ek.Algorithm, err)
	}
	ak, err := t.NewAK(ctx)
	if err != nil {
		return nil, fmt.Errorf("creating attestation key: %w", err)
	}
	defer ak.Close()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := client.Attest(ctx)
	if err != nil {
		return nil, fmt.Errorf("opening attestation stream: %w", err)
	}
	step := func(req *agentv1.AttestRequest) (*agentv1.AttestResponse, error) {
		timedOut := make(chan struct{})
		timer := time.AfterFunc(o.stepTimeout, func() { close(timedOut); cancel() })
		resp, err := sendRecv(stream, req)
		if !timer.Stop() {
			// The timer fired: the error is the cancellation it caused, so
			// say what happened instead.
			<-timedOut
			return nil, fmt.Errorf("no answer from the server within %s", o.stepTimeout)
		}
		return resp, err
	}

	id := ak.Identity(ek)
	resp, err := step(&agentv1.AttestRequest{Step: &agentv1.AttestRequest_Identity{Identity: &agentv1.Identity{
		EkPublic: id.EKPublic, EkCertificate: id.EKCertificate, EkIntermediates: id.EKIntermediates,
		Ak: &agentv1.AttestationKey{
			Public: id.AK.Public, CreateData: id.AK.CreateData,
			CreateAttestation: id.AK.CreateAttestation, CreateSignature: id.AK.CreateSignature,
		},
	}}})
	if err != nil {
		return nil, fmt.Errorf("sending TPM identity: %w", err)
	}
	ch := resp.GetChallenge()
	if ch == nil {
		return nil, errors.New("attestation: the server did not send a credential challenge")
	}
	proof, err := ak.ActivateCredential(ctx, ek, tpm.CredentialChallenge{Credential: ch.Credential, Secret: ch.Secret})
	if err != nil {
		return nil, fmt.Errorf("activating the credential: %w", err)
	}
	resp, err = step(&agentv1.AttestRequest{Step: &agentv1.AttestRequest_Proof{Proof: &agentv1.ActivationProof{Secret: proof.Secret}}})
	if err != nil {
		return nil, fmt.Errorf("sending activation proof: %w", err)
	}
	qr := resp.GetQuoteRequest()
	if qr == nil {
		return nil, errors.New("attestation: the server did not send a quote request")
	}
	sel := tpm.PCRSelection{Alg: qr.PcrBank}
	for _, i := range qr.Pcrs {
		sel.PCRs = append(sel.PCRs, int(i))
	}
	quote, pcrs, err := ak.Quote(ctx, qr.Nonce, sel)
	if err != nil {
		return nil, fmt.Errorf("quoting PCRs: %w", err)
	}
	key, certified, err := t.NewKey(ctx, ak, qr.Nonce)
	if err != nil {
		return nil, fmt.Errorf("creating the TPM-resident key: %w", err)
	}
	defer func() {
		if err != nil {
			key.Close()
		}
	}()
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, fmt.Errorf("signing CSR with the TPM key: %w", err)
	}
	eventLog, err := t.EventLog(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading the event log: %w", err)
	}
	ev := &agentv1.PlatformEvidence{
		Quote:    &agentv1.Quote{Attest: quote.Attest, Signature: quote.Signature},
		EventLog: eventLog,
		Key:      &agentv1.CertifiedKey{Public: certified.Public, CertifyInfo: certified.CertifyInfo, Signature: certified.Signature},
		Csr:      csr,
	}
	for _, p := range pcrs {
		ev.Pcrs = append(ev.Pcrs, &agentv1.PCR{Index: uint32(p.Index), Alg: p.Alg, Digest: p.Digest})
	}
	resp, err = step(&agentv1.AttestRequest{Step: &agentv1.AttestRequest_Evidence{Evidence: ev}})
	if err != nil {
		return nil, fmt.Errorf("sending platform evidence: %w", err)
	}
	_ = stream.CloseSend()
	r := resp.GetResult()
	if r == nil || len(r.SvidChain) == 0 {
		return nil, errors.New("attestation: the server sent no agent SVID")
	}
	res = &Result{Key: key, KeyBlob: key.Marshal(), Bundle: r.Bundle, EKHash: ekHash}
	if res.SVID, res.ID, err = checkResult(r, key, ekHash); err != nil {
		return nil, fmt.Errorf("attestation: %w", err)
	}
	for _, s := range r.Selectors {
		res.Selectors = append(res.Selectors, s.Type+":"+s.Value)
	}
	o.log.Info("node attested", "spiffe_id", res.ID.String(), "ek_hash", ekHash, "expires", res.SVID[0].NotAfter)
	return res, nil
}

// sendRecv is one round trip on the stream.
func sendRecv(stream agentv1.Agent_AttestClient, req *agentv1.AttestRequest) (*agentv1.AttestResponse, error) {
	if err := stream.Send(req); err != nil {
		if errors.Is(err, io.EOF) {
			// The server closed the stream: its status says why.
			_, err = stream.Recv()
		}
		return nil, err
	}
	return stream.Recv()
}

// checkResult makes sure the agent SVID is what attestation promised: a
// valid X509-SVID under the bundle the server sent, for the agent ID of
// this EK in that trust domain, whose key is the TPM-resident key.
func checkResult(r *agentv1.AttestResult, key *tpm.Key, ekHash string) ([]*x509.Certificate, spiffeid.ID, error) {
	var chain []*x509.Certificate
	for _, der := range r.SvidChain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, spiffeid.ID{}, fmt.Errorf("parsing the agent SVID: %w", err)
		}
		chain = append(chain, c)
	}
	if r.Bundle == nil || len(r.Bundle.X509Authorities) == 0 {
		return nil, spiffeid.ID{}, errors.New("the server sent no bundle")
	}
	td, err := spiffeid.TrustDomainFromString(r.Bundle.TrustDomain)
	if err != nil {
		return nil, spiffeid.ID{}, fmt.Errorf("bundle trust domain %q: %w", r.Bundle.TrustDomain, err)
	}
	var authorities []*x509.Certificate
	for _, der := range r.Bundle.X509Authorities {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, spiffeid.ID{}, fmt.Errorf("parsing a bundle authority: %w", err)
		}
		authorities = append(authorities, c)
	}
	id, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(td, authorities))
	if err != nil {
		return nil, spiffeid.ID{}, fmt.Errorf("the agent SVID does not verify against the bundle: %w", err)
	}
	want, err := spiffeid.FromPath(td, "/ironroot/agent/tpm/"+ekHash)
	if err != nil {
		return nil, spiffeid.ID{}, err
	}
	if id != want || r.SpiffeId != want.String() {
		return nil, spiffeid.ID{}, fmt.Errorf("the agent SVID is for %s (result says %q), want %s", id, r.SpiffeId, want)
	}
	if !publicKeyEqual(chain[0].PublicKey, key.Public()) {
		return nil, spiffeid.ID{}, errors.New("the agent SVID is not for the TPM-resident key")
	}
	return chain, id, nil
}

func publicKeyEqual(a, b crypto.PublicKey) bool {
	eq, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && eq.Equal(b)
}
