package hsm

import (
	"fmt"
	"strings"
)

// KeyType is a key algorithm and size GenerateKey can create.
type KeyType int

// Key types.
const (
	ECP256 KeyType = iota + 1
	ECP384
	RSA2048
	RSA3072
	RSA4096
)

// String returns e.g. "EC-P256" or "RSA-2048".
func (t KeyType) String() string {
	switch t {
	case ECP256:
		return "EC-P256"
	case ECP384:
		return "EC-P384"
	case RSA2048:
		return "RSA-2048"
	case RSA3072:
		return "RSA-3072"
	case RSA4096:
		return "RSA-4096"
	}
	return fmt.Sprintf("KeyType(%d)", int(t))
}

// ParseKeyType parses the names String returns (case-insensitive; "P256",
// "ec-p256", "rsa2048" also work).
func ParseKeyType(s string) (KeyType, error) {
	n := strings.NewReplacer("-", "", "_", "").Replace(strings.ToLower(s))
	switch n {
	case "ecp256", "p256":
		return ECP256, nil
	case "ecp384", "p384":
		return ECP384, nil
	case "rsa2048":
		return RSA2048, nil
	case "rsa3072":
		return RSA3072, nil
	case "rsa4096":
		return RSA4096, nil
	}
	return 0, fmt.Errorf("unknown key type %q (want EC-P256, EC-P384, RSA-2048, RSA-3072 or RSA-4096)", s)
}

// KeyRef names a key pair on the token by CKA_ID and/or CKA_LABEL. When both
// are set both must match.
type KeyRef struct {
	// ID is the CKA_ID shared by the private and public key objects.
	ID []byte
	// Label is the CKA_LABEL.
	Label string
}

// String returns e.g. `label "ca-a" id 0a1b...`.
func (r KeyRef) String() string {
	switch {
	case len(r.ID) > 0 && r.Label != "":
		return fmt.Sprintf("label %q id %x", r.Label, r.ID)
	case len(r.ID) > 0:
		return fmt.Sprintf("id %x", r.ID)
	}
	return fmt.Sprintf("label %q", r.Label)
}

// KeyAttributes are the custody attributes of a private key object.
type KeyAttributes struct {
	// Sensitive: CKA_SENSITIVE, the key value cannot be read in clear.
	Sensitive bool
	// Extractable: CKA_EXTRACTABLE, the key can be wrapped out.
	Extractable bool
	// Local: CKA_LOCAL, the key was generated on the token.
	Local bool
	// AlwaysSensitive: CKA_ALWAYS_SENSITIVE, the key was never non-sensitive.
	AlwaysSensitive bool
	// NeverExtractable: CKA_NEVER_EXTRACTABLE, the key was never extractable.
	NeverExtractable bool
	// Sign: CKA_SIGN.
	Sign bool
	// Decrypt, Unwrap, Derive: other uses; GenerateKey sets them false.
	Decrypt, Unwrap, Derive bool
}

// HardwareBound reports nil when the attributes show the key was generated
// on the token and can never leave it, else an error naming the attribute
// that says otherwise.
func (a KeyAttributes) HardwareBound() error {
	var bad []string
	if !a.Local {
		bad = append(bad, "CKA_LOCAL is false (imported)")
	}
	if !a.Sensitive {
		bad = append(bad, "CKA_SENSITIVE is false")
	}
	if !a.AlwaysSensitive {
		bad = append(bad, "CKA_ALWAYS_SENSITIVE is false")
	}
	if !a.NeverExtractable {
		bad = append(bad, "CKA_NEVER_EXTRACTABLE is false")
	}
	if a.Extractable {
		bad = append(bad, "CKA_EXTRACTABLE is true")
	}
	if len(bad) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %s", ErrKeyNotHardware, strings.Join(bad, ", "))
}
