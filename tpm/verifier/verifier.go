// Package verifier is the server side of Ironroot's TPM node attestation.
//
// A Verifier checks the evidence an agent's TPM produces, in two round trips:
//
//	s, challenge, err := v.Begin(ctx, identity)   // EK trust, AK properties, MakeCredential
//	nonce, err := s.Activate(ctx, proof)          // constant-time secret check, fresh nonce
//	res, err := s.Finish(ctx, evidence, previous) // quote, PCRs, event log, clock, certified key
//
// Every refusal wraps one of the package's sentinel errors (ErrEKUntrusted,
// ErrQuote, …) so that callers can tell refusal classes apart with errors.Is.
// A Session is single use: any failure consumes it, and so does success.
package verifier

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/ironroot/ironroot/tpm"
)

// Config is the verifier's policy.
type Config struct {
	// EKRoots are the TPM manufacturer CA certificates an EK certificate must
	// chain to.
	EKRoots []*x509.Certificate
	// EKIntermediates are extra untrusted CA certificates offered for path
	// building, beside those the agent sends.
	EKIntermediates []*x509.Certificate
	// AllowList admits EKs by public-key hash. With RequireEKCertificate
	// false, an EK passes if its certificate chains to EKRoots OR the
	// allow-list admits it. With RequireEKCertificate true, the certificate
	// must chain AND, when AllowList is set, the allow-list must admit it.
	AllowList AllowList
	// RequireEKCertificate refuses EKs without a certificate chaining to
	// EKRoots.
	RequireEKCertificate bool
	// PCRs is the SHA-256 PCR selection every quote must cover exactly.
	// Default: 0–7.
	PCRs []int
	// RequiredPCRs maps PCR index to the SHA-256 value the node must have.
	// Every index must be in PCRs.
	RequiredPCRs map[int][]byte
	// NonceTTL bounds the time from Begin to Activate and from Activate to
	// Finish. Default: 60 s.
	NonceTTL time.Duration
}

// Option configures a Verifier.
type Option func(*Verifier)

// WithClock sets the time source, for tests of expiry.
func WithClock(now func() time.Time) Option {
	return func(v *Verifier) {
		if now != nil {
			v.now = now
		}
	}
}

// WithEKChainCache sets how many verified EK certificate chains are kept
// (default 4096; 0 disables the cache). A node re-attests with the same EK
// certificate, and path building with RSA signature checks is the largest
// single cost of an attestation. Entries are re-verified after 10 minutes
// and never outlive a certificate's NotAfter.
func WithEKChainCache(entries int) Option {
	return func(v *Verifier) {
		if entries >= 0 {
			v.chainCacheSize = entries
		}
	}
}

// WithLogger sets the logger for refusals and successes (never secrets).
func WithLogger(l *slog.Logger) Option {
	return func(v *Verifier) {
		if l != nil {
			v.log = l
		}
	}
}

// Verifier checks TPM attestation evidence. It is safe for concurrent use.
type Verifier struct {
	cfg           Config
	roots         *x509.CertPool
	intermediates []*x509.Certificate
	pcrs          []int
	pcrSet        map[int]bool
	now           func() time.Time
	log           *slog.Logger

	mu     sync.Mutex
	nonces map[string]time.Time // outstanding quote nonces → expiry

	chainCacheSize int
	chainMu        sync.Mutex
	chains         map[[32]byte]chainEntry
}

// chainEntry is a verified EK chain and when it must be verified again.
type chainEntry struct {
	chain        []*x509.Certificate
	manufacturer string
	until        time.Time
}

// defaultPCRs is the PCR selection used when Config.PCRs is empty: the
// firmware and boot loader PCRs of the TCG PC Client profile.
var defaultPCRs = []int{0, 1, 2, 3, 4, 5, 6, 7}

const (
	defaultChainCacheSize = 4096
	chainCacheTTL         = 10 * time.Minute
)

// DefaultNonceTTL is the nonce lifetime used when Config.NonceTTL is zero.
const DefaultNonceTTL = 60 * time.Second

// New validates cfg and returns a Verifier.
func New(cfg Config, opts ...Option) (*Verifier, error) {
	v := &Verifier{
		now:    time.Now,
		log:    slog.New(slog.DiscardHandler),
		nonces: make(map[string]time.Time),
		chains: make(map[[32]byte]chainEntry),

		chainCacheSize: defaultChainCacheSize,
	}
	for _, o := range opts {
		o(v)
	}
	if len(cfg.EKRoots) == 0 && cfg.AllowList == nil {
		return nil, errors.New("verifier config: neither EK roots nor an EK allow-list: no TPM could be admitted")
	}
	if cfg.RequireEKCertificate && len(cfg.EKRoots) == 0 {
		return nil, errors.New("verifier config: EK certificates required but no EK roots configured")
	}
	v.roots = x509.NewCertPool()
	for i, c := range cfg.EKRoots {
		if c == nil {
			return nil, fmt.Errorf("verifier config: EK root %d is nil", i)
		}
		v.roots.AddCert(c)
	}
	for i, c := range cfg.EKIntermediates {
		if c == nil {
			return nil, fmt.Errorf("verifier config: EK intermediate %d is nil", i)
		}
	}
	v.intermediates = append([]*x509.Certificate(nil), cfg.EKIntermediates...)
	pcrs := cfg.PCRs
	if len(pcrs) == 0 {
		pcrs = defaultPCRs
	}
	v.pcrSet = make(map[int]bool, len(pcrs))
	for _, p := range pcrs {
		if p < 0 || p > 23 {
			return nil, fmt.Errorf("verifier config: PCR %d out of range 0–23", p)
		}
		if v.pcrSet[p] {
			return nil, fmt.Errorf("verifier config: PCR %d listed twice", p)
		}
		v.pcrSet[p] = true
	}
	v.pcrs = append([]int(nil), pcrs...)
	sort.Ints(v.pcrs)
	required := make(map[int][]byte, len(cfg.RequiredPCRs))
	for i, want := range cfg.RequiredPCRs {
		if !v.pcrSet[i] {
			return nil, fmt.Errorf("verifier config: required PCR %d is not in the quoted selection %v", i, v.pcrs)
		}
		if len(want) != sha256.Size {
			return nil, fmt.Errorf("verifier config: required PCR %d value has %d bytes, want %d (SHA-256)", i, len(want), sha256.Size)
		}
		required[i] = append([]byte(nil), want...)
	}
	cfg.RequiredPCRs = required
	if cfg.NonceTTL < 0 {
		return nil, fmt.Errorf("verifier config: negative nonce TTL %v", cfg.NonceTTL)
	}
	if cfg.NonceTTL == 0 {
		cfg.NonceTTL = DefaultNonceTTL
	}
	cfg.PCRs = v.pcrs
	v.cfg = cfg
	return v, nil
}

// PCRs returns the sorted PCR selection the verifier requires; the server
// sends it to the agent with the nonce.
func (v *Verifier) PCRs() []int { return append([]int(nil), v.pcrs...) }

// Begin checks the agent's identity (EK trust, EK template, AK properties)
// and returns a session and the credential challenge to send to the agent.
func (v *Verifier) Begin(ctx context.Context, id tpm.Identity) (*Session, tpm.CredentialChallenge, error) {
	if err := ctx.Err(); err != nil {
		return nil, tpm.CredentialChallenge{}, fmt.Errorf("beginning attestation: %w", err)
	}
	ek, err := v.checkEK(ctx, id)
	if err != nil {
		v.log.InfoContext(ctx, "TPM attestation refused", "stage", "ek", "error", err)
		return nil, tpm.CredentialChallenge{}, err
	}
	ak, err := checkAK(id.AK)
	if err != nil {
		v.log.InfoContext(ctx, "TPM attestation refused", "stage", "ak", "ek_hash", ek.hash, "error", err)
		return nil, tpm.CredentialChallenge{}, err
	}
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		return nil, tpm.CredentialChallenge{}, fmt.Errorf("generating activation secret: %w", err)
	}
	kem, err := tpm2.ImportEncapsulationKey(ek.pub)
	if err != nil {
		return nil, tpm.CredentialChallenge{}, fmt.Errorf("%w: EK cannot be used for MakeCredential: %v", ErrEKTemplate, err)
	}
	cred, encSecret, err := makeCredential(kem, ak.name, secret)
	if err != nil {
		return nil, tpm.CredentialChallenge{}, fmt.Errorf("%w: making credential for the EK: %v", ErrEKTemplate, err)
	}
	s := &Session{
		v:       v,
		ek:      ek,
		ak:      ak,
		secret:  secret,
		expires: v.now().Add(v.cfg.NonceTTL),
		state:   stateChallenged,
	}
	v.log.DebugContext(ctx, "TPM attestation challenge issued", "ek_hash", ek.hash)
	return s, tpm.CredentialChallenge{Credential: cred, Secret: encSecret}, nil
}

// makeCredential is TPM2_MakeCredential in software, panic-safe.
func makeCredential(kem tpm2.LabeledEncapsulationKey, name, secret []byte) (cred, encSecret []byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			cred, encSecret, err = nil, nil, errors.New("credential encryption failed")
		}
	}()
	return tpm2.CreateCredential(rand.Reader, kem, name, secret)
}

// registerNonce mints a fresh nonce valid until expiry.
func (v *Verifier) registerNonce(expiry time.Time) ([]byte, error) {
	nonce := make([]byte, 32)
	if _, err := rand.Read(nonce); err != nil {
		return nil, fmt.Errorf("generating nonce: %w", err)
	}
	now := v.now()
	v.mu.Lock()
	defer v.mu.Unlock()
	// Drop expired nonces so the table stays as small as the live sessions.
	for k, exp := range v.nonces {
		if now.After(exp) {
			delete(v.nonces, k)
		}
	}
	v.nonces[string(nonce)] = expiry
	return nonce, nil
}

// consumeNonce removes a nonce; it reports an error if it was not
// outstanding (never issued, already used, or pruned) or has expired.
func (v *Verifier) consumeNonce(nonce []byte) error {
	now := v.now()
	v.mu.Lock()
	exp, ok := v.nonces[string(nonce)]
	delete(v.nonces, string(nonce))
	v.mu.Unlock()
	if !ok {
		return fmt.Errorf("%w: nonce unknown or already used", ErrNonce)
	}
	if now.After(exp) {
		return fmt.Errorf("%w: nonce expired at %s", ErrNonce, exp.UTC().Format(time.RFC3339))
	}
	return nil
}
