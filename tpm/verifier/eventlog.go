package verifier

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"unicode/utf16"

	"github.com/google/go-attestation/attest"
)

// maxEventLogBytes bounds the measured-boot log; real ones are tens of KiB.
const maxEventLogBytes = 4 << 20

// TCG PC Client event types accepted in a log (PC Client Platform Firmware
// Profile 1.05, and the EFI types). Event types are not covered by the
// digests, so anything else is refused rather than guessed at.
var knownEventTypes = map[uint32]bool{
	0x00000000: true, // EV_PREBOOT_CERT
	0x00000001: true, // EV_POST_CODE
	0x00000003: true, // EV_NO_ACTION
	0x00000004: true, // EV_SEPARATOR
	0x00000005: true, // EV_ACTION
	0x00000006: true, // EV_EVENT_TAG
	0x00000007: true, // EV_S_CRTM_CONTENTS
	0x00000008: true, // EV_S_CRTM_VERSION
	0x00000009: true, // EV_CPU_MICROCODE
	0x0000000A: true, // EV_PLATFORM_CONFIG_FLAGS
	0x0000000B: true, // EV_TABLE_OF_DEVICES
	0x0000000C: true, // EV_COMPACT_HASH
	0x0000000D: true, // EV_IPL
	0x0000000E: true, // EV_IPL_PARTITION_DATA
	0x0000000F: true, // EV_NONHOST_CODE
	0x00000010: true, // EV_NONHOST_CONFIG
	0x00000011: true, // EV_NONHOST_INFO
	0x00000012: true, // EV_OMIT_BOOT_DEVICE_EVENTS
	0x80000001: true, // EV_EFI_VARIABLE_DRIVER_CONFIG
	0x80000002: true, // EV_EFI_VARIABLE_BOOT
	0x80000003: true, // EV_EFI_BOOT_SERVICES_APPLICATION
	0x80000004: true, // EV_EFI_BOOT_SERVICES_DRIVER
	0x80000005: true, // EV_EFI_RUNTIME_SERVICES_DRIVER
	0x80000006: true, // EV_EFI_GPT_EVENT
	0x80000007: true, // EV_EFI_ACTION
	0x80000008: true, // EV_EFI_PLATFORM_FIRMWARE_BLOB
	0x80000009: true, // EV_EFI_HANDOFF_TABLES
	0x8000000A: true, // EV_EFI_PLATFORM_FIRMWARE_BLOB2
	0x8000000B: true, // EV_EFI_HANDOFF_TABLES2
	0x8000000C: true, // EV_EFI_VARIABLE_BOOT2
	0x80000010: true, // EV_EFI_HCRTM_EVENT
	0x800000E0: true, // EV_EFI_VARIABLE_AUTHORITY
	0x800000E1: true, // EV_EFI_SPDM_FIRMWARE_BLOB
	0x800000E2: true, // EV_EFI_SPDM_FIRMWARE_CONFIG
}

const (
	evNoAction                 = 0x00000003
	lastFirmwarePCR            = 9 // PCRs 0–9: firmware, Secure Boot, boot loader (TCG PC Client)
	evSeparator                = 0x00000004
	evEFIVariableDriverConfig  = 0x80000001
	evEFIAction                = 0x80000007
	secureBootPCR              = 7
	maxEventsForStrictChecking = 1 << 16
)

// checkEventLog parses the log strictly, replays it against the quoted
// SHA-256 PCRs, and derives the Secure Boot state from the replayed (and only
// the replayed) events. Events of PCRs outside the quote cannot be verified
// and are not interpreted.
func (v *Verifier) checkEventLog(raw []byte, pcrs map[int][]byte) (*bool, error) {
	if len(raw) > maxEventLogBytes {
		return nil, fmt.Errorf("%w: log of %d bytes exceeds %d", ErrEventLog, len(raw), maxEventLogBytes)
	}
	el, err := parseEventLog(raw)
	if err != nil {
		return nil, fmt.Errorf("%w: parsing: %v", ErrEventLog, err)
	}
	hasSHA256 := false
	for _, a := range el.Algs {
		hasSHA256 = hasSHA256 || a == attest.HashSHA256
	}
	if !hasSHA256 {
		return nil, fmt.Errorf("%w: log has no SHA-256 digests (not a crypto-agile TCG log)", ErrEventLog)
	}
	all := el.Events(attest.HashSHA256)
	if len(all) > maxEventsForStrictChecking {
		return nil, fmt.Errorf("%w: %d events", ErrEventLog, len(all))
	}
	measured := make(map[int]bool)
	for i, e := range all {
		if !knownEventTypes[uint32(e.Type)] {
			return nil, fmt.Errorf("%w: event %d has unknown type 0x%08x", ErrEventLog, i, uint32(e.Type))
		}
		if e.Index < 0 || e.Index > 23 {
			return nil, fmt.Errorf("%w: event %d targets PCR %d", ErrEventLog, i, e.Index)
		}
		if uint32(e.Type) == evNoAction {
			// EV_NO_ACTION is skipped by replay, so a measured event
			// re-typed to it would vanish; real ones carry zero digests.
			if !bytes.Equal(e.Digest, make([]byte, len(e.Digest))) {
				return nil, fmt.Errorf("%w: EV_NO_ACTION event %d in PCR %d has a non-zero digest", ErrEventLog, i, e.Index)
			}
			continue
		}
		measured[e.Index] = true
	}
	// Replay only checks PCRs that have events: a firmware or boot loader
	// PCR whose value moved must be explained by the log.
	for i, d := range pcrs {
		if i <= lastFirmwarePCR && !measured[i] && !bytes.Equal(d, make([]byte, len(d))) {
			return nil, fmt.Errorf("%w: PCR %d was extended but the log has no event for it", ErrEventLog, i)
		}
	}
	list := make([]attest.PCR, 0, len(pcrs))
	for i, d := range pcrs {
		list = append(list, attest.PCR{Index: i, Digest: d, DigestAlg: crypto.SHA256})
	}
	events, err := verifyEventLog(el, list)
	if err != nil {
		return nil, fmt.Errorf("%w: replay against the quoted PCRs: %v", ErrEventLog, err)
	}
	sawSecureBootVar, sawPCR7 := false, false
	for _, e := range events {
		sawPCR7 = sawPCR7 || e.Index == secureBootPCR
		switch uint32(e.Type) {
		case evSeparator:
			if len(e.Data) != 4 || !digestOf(e) {
				return nil, fmt.Errorf("%w: separator in PCR %d does not match its digest", ErrEventLog, e.Index)
			}
		case evEFIAction, evEFIVariableDriverConfig:
			if !digestOf(e) {
				return nil, fmt.Errorf("%w: %v event in PCR %d does not match its digest", ErrEventLog, e.Type, e.Index)
			}
			if uint32(e.Type) == evEFIVariableDriverConfig && e.Index == secureBootPCR && uefiVarName(e.Data) == "SecureBoot" {
				sawSecureBootVar = true
			}
		}
	}
	if !sawPCR7 {
		return nil, nil
	}
	// PCR 7's events are checked whenever they were replayed, so that a
	// re-typed variable cannot hide the Secure Boot state.
	sb, err := parseSecurebootState(events)
	if err != nil {
		return nil, fmt.Errorf("%w: Secure Boot state: %v", ErrEventLog, err)
	}
	if !sawSecureBootVar {
		return nil, nil
	}
	enabled := sb.Enabled
	return &enabled, nil
}

// digestOf reports whether an event's verified SHA-256 digest is the hash of
// its data, for event types whose data is what was measured.
func digestOf(e attest.Event) bool {
	sum := sha256.Sum256(e.Data)
	return bytes.Equal(sum[:], e.Digest)
}

// uefiVarName returns the name of a UEFI_VARIABLE_DATA event payload.
func uefiVarName(data []byte) string {
	if len(data) < 32 {
		return ""
	}
	n := binary.LittleEndian.Uint64(data[16:24])
	if n > 64 || uint64(len(data)-32) < 2*n {
		return ""
	}
	u := make([]uint16, n)
	for i := range u {
		u[i] = binary.LittleEndian.Uint16(data[32+2*i:])
	}
	return string(utf16.Decode(u))
}

// The go-attestation calls below parse attacker-supplied bytes; a panic in
// them must not take the server down.

func parseEventLog(raw []byte) (el *attest.EventLog, err error) {
	defer func() {
		if r := recover(); r != nil {
			el, err = nil, errors.New("log cannot be parsed")
		}
	}()
	return attest.ParseEventLog(raw)
}

func verifyEventLog(el *attest.EventLog, pcrs []attest.PCR) (ev []attest.Event, err error) {
	defer func() {
		if r := recover(); r != nil {
			ev, err = nil, errors.New("log cannot be replayed")
		}
	}()
	return el.Verify(pcrs)
}

func parseSecurebootState(events []attest.Event) (sb *attest.SecurebootState, err error) {
	defer func() {
		if r := recover(); r != nil {
			sb, err = nil, errors.New("secure boot variables cannot be parsed")
		}
	}()
	return attest.ParseSecurebootState(events)
}
