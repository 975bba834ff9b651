package verifier

import (
	"context"
	"crypto"
	"crypto/subtle"
	"crypto/x509"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ironroot/ironroot/tpm"
)

type sessionState int

const (
	stateChallenged sessionState = iota // Begin done, waiting for Activate
	stateActivated                      // nonce issued, waiting for Finish
	stateDone                           // finished, failed or abandoned
)

// Session is one attestation in progress: Begin → Activate → Finish, each
// exactly once. Any failure ends the session; the agent starts over with a
// new Begin (and a new AK challenge). Safe for concurrent use, though the
// protocol itself is sequential.
type Session struct {
	v  *Verifier
	ek *ekInfo
	ak *akInfo

	mu      sync.Mutex
	state   sessionState
	secret  []byte
	expires time.Time
	nonce   []byte
}

// EKHash returns the lowercase hex SHA-256 of the EK's PKIX public key, known
// (and trusted) from Begin on.
func (s *Session) EKHash() string { return s.ek.hash }

// Activate checks the secret the agent recovered with TPM2_ActivateCredential,
// in constant time, and returns the fresh 32-byte quote nonce.
func (s *Session) Activate(ctx context.Context, p tpm.ActivationProof) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state != stateChallenged {
		s.state = stateDone
		return nil, fmt.Errorf("%w: session already activated or ended", ErrActivation)
	}
	s.state = stateDone // until proven otherwise, the session is spent
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("activating credential: %w", err)
	}
	if s.v.now().After(s.expires) {
		return nil, fmt.Errorf("%w: credential challenge expired", ErrActivation)
	}
	ok := subtle.ConstantTimeCompare(p.Secret, s.secret) == 1
	s.secret = nil
	if !ok {
		s.v.log.InfoContext(ctx, "TPM attestation refused", "stage", "activation", "ek_hash", s.ek.hash)
		return nil, fmt.Errorf("%w: recovered secret differs: the AK is not resident with this EK", ErrActivation)
	}
	expiry := s.v.now().Add(s.v.cfg.NonceTTL)
	nonce, err := s.v.registerNonce(expiry)
	if err != nil {
		return nil, err
	}
	s.nonce, s.expires, s.state = nonce, expiry, stateActivated
	return append([]byte(nil), nonce...), nil
}

// ClockInfo is the TPMS_CLOCK_INFO of a quote. The server stores it on the
// node record and passes it back as Finish's previous, so that counters can
// be checked never to go backwards.
type ClockInfo struct {
	// Clock is the TPM's milliseconds-powered-on counter.
	Clock uint64 `json:"clock"`
	// ResetCount counts TPM Resets (reboots) since the last TPM2_Clear.
	ResetCount uint32 `json:"reset_count"`
	// RestartCount counts TPM Restarts/Resumes since the last Reset.
	RestartCount uint32 `json:"restart_count"`
	// Safe reports that no larger Clock value was ever reported before.
	Safe bool `json:"safe"`
	// Obfuscated reports that ResetCount and RestartCount are obfuscated:
	// the TPM does so for quotes by keys outside the endorsement and
	// platform hierarchies (an AK under an owner-hierarchy SRK), with a
	// per-key offset, so they cannot be compared across AKs and only Clock
	// is checked against the previous attestation.
	Obfuscated bool `json:"obfuscated,omitempty"`
}

// Result is the verified evidence summary of a node.
type Result struct {
	// EKHash is the lowercase hex SHA-256 of the EK's PKIX DER public key.
	EKHash string
	// EKPublic is the EK public key.
	EKPublic crypto.PublicKey
	// Manufacturer is the TPM vendor from a verified EK certificate's TCG
	// SubjectAltName, mapped to a name when the TCG vendor ID is known, or
	// "" when the EK was admitted by the allow-list only.
	Manufacturer string
	// EKChain is the verified chain, EK certificate first; nil when the EK
	// was admitted by the allow-list only.
	EKChain []*x509.Certificate
	// PCRs are the quoted SHA-256 PCR values by index.
	PCRs map[int][]byte
	// SecureBoot is the Secure Boot state replayed from the event log; nil
	// when no log was sent or the log does not establish it.
	SecureBoot *bool
	// Clock is the quote's clock information, to store for the next check.
	Clock ClockInfo
	// AgentKey is the public key of the TPM-resident key the AK certified.
	AgentKey crypto.PublicKey
	// AKPublic is the attestation key's public key.
	AKPublic crypto.PublicKey
}

// Finish verifies the platform evidence against the nonce issued by Activate
// and returns the node's evidence summary. previous is the ClockInfo stored
// from the node's last successful attestation, or nil for a new node.
func (s *Session) Finish(ctx context.Context, ev tpm.PlatformEvidence, previous *ClockInfo) (*Result, error) {
	s.mu.Lock()
	state, nonce := s.state, s.nonce
	s.state, s.nonce = stateDone, nil
	s.mu.Unlock()
	switch state {
	case stateChallenged:
		return nil, fmt.Errorf("%w: Finish before Activate", ErrActivation)
	case stateDone:
		return nil, fmt.Errorf("%w: session already finished or failed: nonce already used", ErrNonce)
	}
	res, err := s.finish(ctx, ev, nonce, previous)
	if err != nil {
		s.v.log.InfoContext(ctx, "TPM attestation refused", "stage", "evidence", "ek_hash", s.ek.hash, "error", err)
		return nil, err
	}
	s.v.log.InfoContext(ctx, "TPM attestation verified", "ek_hash", res.EKHash, "manufacturer", res.Manufacturer)
	return res, nil
}

func (s *Session) finish(ctx context.Context, ev tpm.PlatformEvidence, nonce []byte, previous *ClockInfo) (*Result, error) {
	// The nonce is consumed first, whatever follows: a refused quote cannot be
	// retried with the same nonce.
	if err := s.v.consumeNonce(nonce); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("verifying platform evidence: %w", err)
	}
	q, err := s.v.verifyQuote(ev.Quote, &s.ak.signer, nonce)
	if err != nil {
		return nil, err
	}
	clock := ClockInfo{
		Clock:        q.clock.Clock,
		ResetCount:   q.clock.ResetCount,
		RestartCount: q.clock.RestartCount,
		Safe:         bool(q.clock.Safe),
		Obfuscated:   s.ak.obfuscated,
	}
	if err := checkClock(clock, previous); err != nil {
		return nil, err
	}
	pcrs, err := s.v.checkPCRValues(q, ev.PCRs, s.ak.signer.hash)
	if err != nil {
		return nil, err
	}
	var secureBoot *bool
	if len(ev.EventLog) > 0 {
		if secureBoot, err = s.v.checkEventLog(ev.EventLog, pcrs); err != nil {
			return nil, err
		}
	}
	for i, want := range s.v.cfg.RequiredPCRs {
		if subtle.ConstantTimeCompare(pcrs[i], want) != 1 {
			return nil, fmt.Errorf("%w: PCR %d is %x, policy requires %x", ErrPCRPolicy, i, pcrs[i], want)
		}
	}
	agentKey, err := checkCertifiedKey(ev.Key, &s.ak.signer, nonce)
	if err != nil {
		return nil, err
	}
	return &Result{
		EKHash:       s.ek.hash,
		EKPublic:     s.ek.key,
		Manufacturer: s.ek.manufacturer,
		EKChain:      s.ek.chain,
		PCRs:         pcrs,
		SecureBoot:   secureBoot,
		Clock:        clock,
		AgentKey:     agentKey,
		AKPublic:     s.ak.signer.key,
	}, nil
}

// checkClock applies Keylime's check_quote_timing against the node's
// previous attestation: resetCount and restartCount never go backwards, and
// if neither moved the clock must have advanced and be safe.
//
// Unlike Keylime, an unsafe clock is refused only when no reset or restart
// explains it. A TPM that lost power reports safe=NO until it next writes
// its clock to NV, which the specification allows to take about 70 minutes
// (2^22 ms); refusing then would lock a node out for that long after every
// power cut. The unsafe clock can only have gone back to its last NV copy,
// and that happens only with a reset (resetCount moves), which the counters
// check; a first attestation has nothing to roll back to.
func checkClock(cur ClockInfo, prev *ClockInfo) error {
	if prev == nil {
		return nil
	}
	if cur.Obfuscated || prev.Obfuscated {
		// Without real counters a reset cannot be told apart from a clock
		// rollback: require a safe clock that advanced.
		if !cur.Safe {
			return fmt.Errorf("%w: clock not safe and the reset counters are obfuscated", ErrClock)
		}
		if cur.Clock <= prev.Clock {
			return fmt.Errorf("%w: clock went back or stood still (%d after %d)", ErrClock, cur.Clock, prev.Clock)
		}
		return nil
	}
	switch {
	case cur.ResetCount < prev.ResetCount:
		return fmt.Errorf("%w: resetCount went back from %d to %d", ErrClock, prev.ResetCount, cur.ResetCount)
	case cur.ResetCount > prev.ResetCount:
		return nil
	case cur.RestartCount < prev.RestartCount:
		return fmt.Errorf("%w: restartCount went back from %d to %d", ErrClock, prev.RestartCount, cur.RestartCount)
	case cur.RestartCount > prev.RestartCount:
		return nil
	case !cur.Safe:
		return fmt.Errorf("%w: clock not safe with no reset or restart since the last attestation", ErrClock)
	case cur.Clock <= prev.Clock:
		return fmt.Errorf("%w: clock did not advance (%d after %d) with no reset or restart", ErrClock, cur.Clock, prev.Clock)
	}
	return nil
}

var errNoKey = errors.New("no certified key in the evidence")
