package verifier

import "errors"

// Sentinel errors, one per refusal class. Every error the verifier returns
// wraps exactly one of them, so callers can map refusals with errors.Is while
// the wrapped message says what precisely was wrong.
var (
	// ErrEKUntrusted: the EK certificate is missing (when required), does not
	// chain to a configured root, or is otherwise unusable.
	ErrEKUntrusted = errors.New("EK certificate not trusted")
	// ErrEKNotAllowed: the EK was not admitted by the allow-list, or the
	// allow-list could not be read (fail closed).
	ErrEKNotAllowed = errors.New("EK not on the allow-list")
	// ErrEKMismatch: the EK certificate's key differs from the EK public area.
	ErrEKMismatch = errors.New("EK certificate key does not match the EK")
	// ErrEKTemplate: the EK public area is not an endorsement key
	// (restricted decryption key, fixedTPM, fixedParent, strong key).
	ErrEKTemplate = errors.New("EK public area is not an endorsement key")
	// ErrAKInvalid: the AK creation evidence or attributes are unacceptable.
	ErrAKInvalid = errors.New("attestation key invalid")
	// ErrActivation: the credential activation proof is wrong, expired,
	// repeated or out of order.
	ErrActivation = errors.New("credential activation failed")
	// ErrNonce: the quote nonce is unknown, replayed, expired or differs.
	ErrNonce = errors.New("nonce invalid")
	// ErrPCRSelection: the quote covers a PCR selection other than the
	// configured one.
	ErrPCRSelection = errors.New("quoted PCR selection differs from the required selection")
	// ErrQuote: the quote is not a TPM-generated ATTEST_QUOTE signed by the AK.
	ErrQuote = errors.New("quote invalid")
	// ErrPCRValues: the supplied PCR values do not match the quoted digest or
	// include PCRs the quote does not cover.
	ErrPCRValues = errors.New("PCR values do not match the quote")
	// ErrEventLog: the event log does not parse strictly, does not replay to
	// the quoted PCRs, or describes an inconsistent boot.
	ErrEventLog = errors.New("event log invalid")
	// ErrClock: the quote's clock information shows an unsafe clock or a
	// counter that went backwards.
	ErrClock = errors.New("TPM clock information invalid")
	// ErrPCRPolicy: a PCR differs from the value the policy requires.
	ErrPCRPolicy = errors.New("PCR value violates policy")
	// ErrKeyCertification: the agent key is missing, not certified by this AK
	// over this nonce, or has unacceptable attributes.
	ErrKeyCertification = errors.New("key certification invalid")
	// ErrMalformed: a field is not a well-formed TPM structure.
	ErrMalformed = errors.New("malformed evidence")
)
