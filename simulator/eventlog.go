package simulator

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math/big"
	"strings"
	"time"
	"unicode/utf16"
)

// TCG PC Client event types the synthetic log uses (PC Client Platform
// Firmware Profile, section 10.4.1).
const (
	EvNoAction                   uint32 = 0x00000003
	EvSeparator                  uint32 = 0x00000004
	EvSCRTMVersion               uint32 = 0x00000008
	EvIPL                        uint32 = 0x0000000D
	EvEFIVariableDriverConfig    uint32 = 0x80000001
	EvEFIVariableBoot            uint32 = 0x80000002
	EvEFIBootServicesApplication uint32 = 0x80000003
	EvEFIAction                  uint32 = 0x80000007
	EvEFIPlatformFirmwareBlob    uint32 = 0x80000008
	EvEFIVariableAuthority       uint32 = 0x800000E0
)

// LogEvent is one event of a synthetic measured-boot log.
type LogEvent struct {
	// PCR is the PCR the event was extended into.
	PCR int
	// Type is the TCG event type (EvSeparator, …).
	Type uint32
	// Data is the event data as logged.
	Data []byte
	// Digest is the SHA-256 digest extended into the PCR. For most event
	// types it is the hash of Data; for code measurements it is the hash of
	// the image, which the log does not carry.
	Digest []byte
}

// EventLog builds a crypto-agile (SHA-256 only) TCG PC Client measured-boot
// log, as firmware would leave it in /sys/kernel/security/tpm0/
// binary_bios_measurements, together with the digests to extend into a TPM so
// that the log replays. Tests may edit Events to tamper with the log after
// extending the original digests.
type EventLog struct {
	// Events are the measured events in log order (the Spec ID header event
	// is implicit and written by Bytes).
	Events []LogEvent
}

// Measure appends an event whose digest is the SHA-256 of its data.
func (l *EventLog) Measure(pcr int, typ uint32, data []byte) {
	sum := sha256.Sum256(data)
	l.MeasureDigest(pcr, typ, data, sum[:])
}

// MeasureDigest appends an event with an explicit digest (the hash of a
// measured image that the log only describes).
func (l *EventLog) MeasureDigest(pcr int, typ uint32, data, digest []byte) {
	l.Events = append(l.Events, LogEvent{
		PCR:    pcr,
		Type:   typ,
		Data:   append([]byte(nil), data...),
		Digest: append([]byte(nil), digest...),
	})
}

// Clone returns a deep copy, for tampering without touching the original.
func (l *EventLog) Clone() *EventLog {
	out := &EventLog{Events: make([]LogEvent, len(l.Events))}
	for i, e := range l.Events {
		out.Events[i] = LogEvent{
			PCR:    e.PCR,
			Type:   e.Type,
			Data:   append([]byte(nil), e.Data...),
			Digest: append([]byte(nil), e.Digest...),
		}
	}
	return out
}

// Extends returns, in order, the events a TPM must have extended for the log
// to replay (EV_NO_ACTION events extend nothing).
func (l *EventLog) Extends() []LogEvent {
	var out []LogEvent
	for _, e := range l.Events {
		if e.Type != EvNoAction {
			out = append(out, e)
		}
	}
	return out
}

// PCRs returns the SHA-256 PCR values the log replays to, from PCRs reset to
// zero, for every PCR the log touches.
func (l *EventLog) PCRs() map[int][]byte {
	out := make(map[int][]byte)
	for _, e := range l.Extends() {
		cur, ok := out[e.PCR]
		if !ok {
			cur = make([]byte, sha256.Size)
		}
		h := sha256.New()
		h.Write(cur)
		h.Write(e.Digest)
		out[e.PCR] = h.Sum(nil)
	}
	return out
}

// Bytes encodes the log: a TCG_PCR_EVENT carrying the TCG_EfiSpecIDEvent
// (SHA-256 only), then one TCG_PCR_EVENT2 per event.
func (l *EventLog) Bytes() []byte {
	var spec bytes.Buffer
	spec.WriteString("Spec ID Event03\x00")
	le(&spec, uint32(0)) // platformClass: client
	spec.WriteByte(0)    // specVersionMinor
	spec.WriteByte(2)    // specVersionMajor
	spec.WriteByte(0)    // specErrata
	spec.WriteByte(2)    // uintnSize: UINT64
	le(&spec, uint32(1)) // numberOfAlgorithms
	le(&spec, uint16(0x000B))
	le(&spec, uint16(sha256.Size))
	spec.WriteByte(0) // vendorInfoSize

	var out bytes.Buffer
	le(&out, uint32(0))
	le(&out, EvNoAction)
	out.Write(make([]byte, 20))
	le(&out, uint32(spec.Len()))
	out.Write(spec.Bytes())
	for _, e := range l.Events {
		le(&out, uint32(e.PCR))
		le(&out, e.Type)
		le(&out, uint32(1))
		le(&out, uint16(0x000B))
		d := make([]byte, sha256.Size)
		copy(d, e.Digest)
		out.Write(d)
		le(&out, uint32(len(e.Data)))
		out.Write(e.Data)
	}
	return out.Bytes()
}

func le(b *bytes.Buffer, v any) { _ = binary.Write(b, binary.LittleEndian, v) }

// BootOptions shape the synthetic UEFI boot of UEFIBootLog.
type BootOptions struct {
	// SecureBoot is the value of the SecureBoot variable measured in PCR 7.
	// When set, the log also carries PK/KEK/db contents and the db
	// authority that verified the boot loader, as ParseSecurebootState
	// requires.
	SecureBoot bool
	// Kernel names the measured kernel; it changes PCRs 4, 8 and 9, so
	// tests can make two boots differ. Default "vmlinuz".
	Kernel string
}

var (
	efiGlobalVariable   = mustGUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
	efiImageSecurityDB  = mustGUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
	efiCertSHA256GUID   = mustGUID("c1c41626-504c-4092-aca9-41f936934328")
	ironrootOwnerGUID   = mustGUID("5f1e4c3a-0b7d-4c8e-9a61-2d3b4c5d6e7f")
	separatorData       = []byte{0, 0, 0, 0}
	firmwareBlobAddress = uint64(0xFFC00000)
)

// UEFIBootLog returns the log of a plausible UEFI boot: CRTM and firmware in
// PCR 0, Secure Boot variables (SecureBoot, PK, KEK, db, dbx) in PCR 7,
// separators in PCRs 0–7, shim and grub as boot services applications in
// PCR 4, grub's command line in PCR 8 and the kernel in PCR 9.
func UEFIBootLog(opts BootOptions) (*EventLog, error) {
	kernel := opts.Kernel
	if kernel == "" {
		kernel = "vmlinuz"
	}
	l := &EventLog{}
	l.Measure(0, EvSCRTMVersion, utf16z("1.0"))
	blob := make([]byte, 16)
	binary.LittleEndian.PutUint64(blob, firmwareBlobAddress)
	binary.LittleEndian.PutUint64(blob[8:], 0x400000)
	fw := sha256.Sum256([]byte("ironroot synthetic firmware volume"))
	l.MeasureDigest(0, EvEFIPlatformFirmwareBlob, blob, fw[:])

	sb := byte(0)
	if opts.SecureBoot {
		sb = 1
	}
	l.Measure(7, EvEFIVariableDriverConfig, UEFIVariable(efiGlobalVariable, "SecureBoot", []byte{sb}))
	if opts.SecureBoot {
		l.Measure(7, EvEFIVariableDriverConfig, UEFIVariable(efiGlobalVariable, "PK", sha256SignatureList("platform key")))
		l.Measure(7, EvEFIVariableDriverConfig, UEFIVariable(efiGlobalVariable, "KEK", sha256SignatureList("key exchange key")))
		l.Measure(7, EvEFIVariableDriverConfig, UEFIVariable(efiImageSecurityDB, "db", sha256SignatureList("shim", "grub")))
		l.Measure(7, EvEFIVariableDriverConfig, UEFIVariable(efiImageSecurityDB, "dbx", sha256SignatureList("revoked loader")))
	} else {
		for _, v := range []struct {
			guid [16]byte
			name string
		}{{efiGlobalVariable, "PK"}, {efiGlobalVariable, "KEK"}, {efiImageSecurityDB, "db"}, {efiImageSecurityDB, "dbx"}} {
			l.Measure(7, EvEFIVariableDriverConfig, UEFIVariable(v.guid, v.name, nil))
		}
	}
	l.Measure(4, EvEFIAction, []byte("Calling EFI Application from Boot Option"))
	for pcr := 0; pcr <= 7; pcr++ {
		l.Measure(pcr, EvSeparator, separatorData)
	}
	if opts.SecureBoot {
		cert, err := authorityCert()
		if err != nil {
			return nil, err
		}
		sig := append(ironrootOwnerGUID[:], cert...)
		l.Measure(7, EvEFIVariableAuthority, UEFIVariable(efiImageSecurityDB, "db", sig))
	}
	shim := sha256.Sum256([]byte("shimx64.efi"))
	l.MeasureDigest(4, EvEFIBootServicesApplication, imageLoadEvent(0x7e000000, 0x100000), shim[:])
	grub := sha256.Sum256([]byte("grubx64.efi"))
	l.MeasureDigest(4, EvEFIBootServicesApplication, imageLoadEvent(0x7d000000, 0x200000), grub[:])
	cmd := "grub_cmd: linux /boot/" + kernel + " root=/dev/vda1 ro"
	l.Measure(8, EvIPL, append([]byte(cmd), 0))
	k := sha256.Sum256([]byte("kernel image " + kernel))
	l.MeasureDigest(9, EvIPL, append([]byte("/boot/"+kernel), 0), k[:])
	l.Measure(5, EvEFIAction, []byte("Exit Boot Services Invocation"))
	l.Measure(5, EvEFIAction, []byte("Exit Boot Services Returned with Success"))
	return l, nil
}

// UEFIVariable encodes a UEFI_VARIABLE_DATA event payload.
func UEFIVariable(guid [16]byte, name string, data []byte) []byte {
	u := utf16.Encode([]rune(name))
	var b bytes.Buffer
	b.Write(guid[:])
	le(&b, uint64(len(u)))
	le(&b, uint64(len(data)))
	for _, c := range u {
		le(&b, c)
	}
	b.Write(data)
	return b.Bytes()
}

// sha256SignatureList is an EFI_SIGNATURE_LIST of EFI_CERT_SHA256 entries,
// one per named (synthetic) image or key.
func sha256SignatureList(items ...string) []byte {
	const entry = 16 + sha256.Size
	var b bytes.Buffer
	b.Write(efiCertSHA256GUID[:])
	le(&b, uint32(28+entry*len(items)))
	le(&b, uint32(0))
	le(&b, uint32(entry))
	for _, it := range items {
		sum := sha256.Sum256([]byte(it))
		b.Write(ironrootOwnerGUID[:])
		b.Write(sum[:])
	}
	return b.Bytes()
}

// imageLoadEvent is a UEFI_IMAGE_LOAD_EVENT with an end-of-path device path.
func imageLoadEvent(addr, length uint64) []byte {
	var b bytes.Buffer
	end := []byte{0x7f, 0xff, 0x04, 0x00}
	le(&b, addr)
	le(&b, length)
	le(&b, uint64(0))
	le(&b, uint64(len(end)))
	b.Write(end)
	return b.Bytes()
}

// authorityCert is a throwaway self-signed certificate standing for the db
// key that verified the boot loader.
func authorityCert() ([]byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating db authority key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "Ironroot synthetic Secure Boot db"},
		NotBefore:    time.Unix(0, 0),
		NotAfter:     time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC),
		KeyUsage:     x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("creating db authority certificate: %w", err)
	}
	return der, nil
}

func utf16z(s string) []byte {
	var b bytes.Buffer
	for _, c := range utf16.Encode([]rune(s + "\x00")) {
		le(&b, c)
	}
	return b.Bytes()
}

// mustGUID encodes an EFI_GUID in its mixed-endian wire form.
func mustGUID(s string) [16]byte {
	raw, err := hex.DecodeString(strings.ReplaceAll(s, "-", ""))
	if err != nil || len(raw) != 16 {
		panic("invalid GUID literal " + s)
	}
	var g [16]byte
	g[0], g[1], g[2], g[3] = raw[3], raw[2], raw[1], raw[0]
	g[4], g[5] = raw[5], raw[4]
	g[6], g[7] = raw[7], raw[6]
	copy(g[8:], raw[8:])
	return g
}
