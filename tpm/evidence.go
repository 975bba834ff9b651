package tpm

// The types in this file are the attestation evidence that crosses the network
// between the agent (package tpm) and the server's verifier (package
// tpm/verifier). Every byte slice holds a raw TPM 2.0 structure exactly as the
// TPM produced it, so that the verifier checks what the TPM signed and nothing
// the agent re-encoded. They are plain data: the server's gRPC API carries
// them field by field.
//
// The protocol has two round trips:
//
//	agent → server  Identity            EK (+certificate) and AK creation evidence
//	server → agent  CredentialChallenge MakeCredential output bound to the AK name and EK
//	agent → server  ActivationProof     the recovered secret
//	server → agent  nonce               32 fresh random bytes, single use
//	agent → server  PlatformEvidence    quote over the nonce, PCR values, event log,
//	                                    TPM-resident key certified by the AK over the nonce

// Identity is what the agent sends first: who the TPM is and which AK it made.
type Identity struct {
	// EKPublic is the EK's TPMT_PUBLIC area, as returned by TPM2_ReadPublic.
	// The verifier needs the full area (name algorithm, symmetric scheme) to
	// make a credential the TPM can activate, and compares its key with the
	// EK certificate's.
	EKPublic []byte
	// EKCertificate is the DER EK certificate read from NV, if the TPM has one
	// for this EK. Empty when the node relies on the EK allow-list.
	EKCertificate []byte
	// EKIntermediates are DER CA certificates the platform stores beside the
	// EK certificate (NV 0x01c00100–0x01c001ff), offered as untrusted
	// intermediates for path building.
	EKIntermediates [][]byte
	// AK is the attestation key's creation evidence.
	AK AttestationKey
}

// AttestationKey is the creation evidence of an AK, in the layout of
// go-attestation's attest.AttestationParameters.
type AttestationKey struct {
	// Public is the AK's TPMT_PUBLIC area.
	Public []byte
	// CreateData is the TPMS_CREATION_DATA returned by TPM2_Create.
	CreateData []byte
	// CreateAttestation is the TPMS_ATTEST returned by TPM2_CertifyCreation.
	CreateAttestation []byte
	// CreateSignature is the AK's TPMT_SIGNATURE over CreateAttestation.
	CreateSignature []byte
}

// CredentialChallenge is TPM2_MakeCredential output: only the TPM holding the
// EK can recover the secret, and only for an object whose name is the AK's.
type CredentialChallenge struct {
	// Credential is the TPM2B_ID_OBJECT contents (without the size prefix).
	Credential []byte
	// Secret is the TPM2B_ENCRYPTED_SECRET contents (without the size prefix).
	Secret []byte
}

// ActivationProof is the agent's answer to a CredentialChallenge.
type ActivationProof struct {
	// Secret is the value TPM2_ActivateCredential recovered.
	Secret []byte
}

// PlatformEvidence is the agent's answer to the server's nonce.
type PlatformEvidence struct {
	// Quote is a TPM2_Quote by the AK with the nonce as qualifying data.
	Quote Quote
	// PCRs are the values of the quoted PCRs, read after the quote and
	// re-read until they match its digest.
	PCRs []PCR
	// EventLog is the platform's TCG measured-boot log (binary, as read from
	// /sys/kernel/security/tpm0/binary_bios_measurements). Empty when the
	// platform has none.
	EventLog []byte
	// Key is the TPM-resident key, certified by the AK with the nonce as
	// qualifying data.
	Key CertifiedKey
}

// Quote is a TPM2_Quote result.
type Quote struct {
	// Attest is the TPMS_ATTEST structure the TPM signed.
	Attest []byte
	// Signature is the AK's TPMT_SIGNATURE over Attest.
	Signature []byte
}

// PCR is one PCR value of one bank.
type PCR struct {
	// Index is the PCR number (0–23).
	Index int
	// Alg is the bank's TPM hash algorithm name: "sha256" (the default),
	// "sha1", "sha384" or "sha512".
	Alg string
	// Digest is the PCR value.
	Digest []byte
}

// CertifiedKey is a key created inside the TPM and certified by the AK with
// TPM2_Certify.
type CertifiedKey struct {
	// Public is the key's TPMT_PUBLIC area.
	Public []byte
	// CertifyInfo is the TPMS_ATTEST (type ATTEST_CERTIFY) the AK signed.
	CertifyInfo []byte
	// Signature is the AK's TPMT_SIGNATURE over CertifyInfo.
	Signature []byte
}
