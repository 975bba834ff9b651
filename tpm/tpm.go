// Package tpm is the agent side of Ironroot's TPM 2.0 node attestation: it
// opens a TPM (a device such as /dev/tpmrm0, or a swtpm socket), reads the
// endorsement keys and their certificates, creates an attestation key bound
// to the EK by credential activation, quotes PCRs over a server nonce, and
// creates ECDSA keys that live in the TPM and are certified by the AK.
//
// Object policy: swtpm and /dev/tpm0 have no resource manager and only three
// transient object slots, so nothing stays loaded between calls. Every
// object (parent primaries, AK, Key) is kept as a saved context (TPM2_ContextSave) and
// loaded for the duration of one operation, then flushed. When a saved
// context no longer loads (the TPM was reset), the object is reloaded from
// its TPM-wrapped blob under its re-created parent.
//
// Parents: the AK lives under a primary made from the standard ECC P-256 SRK
// template in the endorsement hierarchy (as go-attestation does), because a
// TPM obfuscates resetCount and restartCount in everything signed by a key
// outside the endorsement and platform hierarchies (TPM 2.0 Part 1,
// "Obfuscation"); under this parent the quotes carry the real counters the
// verifier compares across attestations. Keys (NewKey) live under the same
// template in the owner (storage) hierarchy, the usual home of application
// keys: their blobs survive as long as the storage seed does. Both primaries
// use empty hierarchy passwords and are never made persistent.
package tpm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"

	"github.com/google/go-tpm/tpm2"
)

// DefaultEventLogPath is where Linux exposes the firmware's measured-boot log.
const DefaultEventLogPath = "/sys/kernel/security/tpm0/binary_bios_measurements"

// TPM is an open TPM 2.0. It is safe for concurrent use: a mutex serializes
// every command sequence.
type TPM struct {
	address      string
	log          *slog.Logger
	eventLogPath string

	mu     sync.Mutex
	conn   conn
	closed bool
	// srk (owner hierarchy) parents keys, ekParent (endorsement
	// hierarchy) parents AKs.
	srk      primary
	ekParent primary
}

// primary is a primary key that objects are created under, kept as a saved
// context once created.
type primary struct {
	hierarchy tpm2.TPMHandle
	saved     *tpm2.TPMSContext
	name      tpm2.TPM2BName
}

type config struct {
	eventLogPath *string
	logger       *slog.Logger
	dial         dialFunc
}

// Option configures Open.
type Option func(*config)

// WithEventLogPath reads the measured-boot event log from path. An empty
// path means the platform has no log. The default is DefaultEventLogPath for
// device paths and no log for sockets (swtpm has no firmware).
func WithEventLogPath(path string) Option {
	return func(c *config) { c.eventLogPath = &path }
}

// WithLogger sets the logger for diagnostics (never key material).
func WithLogger(l *slog.Logger) Option {
	return func(c *config) { c.logger = l }
}

// withDialer replaces the socket dialer; tests use it to inject faulty
// connections.
func withDialer(d dialFunc) Option {
	return func(c *config) { c.dial = d }
}

// Open opens the TPM at address: a device path ("/dev/tpmrm0"),
// "unix:///path" or "tcp://host:port" (a swtpm data channel). It checks that
// a TPM 2.0 answers.
func Open(ctx context.Context, address string, opts ...Option) (*TPM, error) {
	var cfg config
	for _, o := range opts {
		o(&cfg)
	}
	network, addr, err := parseAddress(address)
	if err != nil {
		return nil, err
	}
	t := &TPM{
		address:  address,
		log:      cfg.logger,
		srk:      primary{hierarchy: tpm2.TPMRHOwner},
		ekParent: primary{hierarchy: tpm2.TPMRHEndorsement},
	}
	if t.log == nil {
		t.log = slog.New(slog.DiscardHandler)
	}
	switch network {
	case "device":
		d, err := openDevice(addr)
		if err != nil {
			return nil, err
		}
		t.conn = d
		t.eventLogPath = DefaultEventLogPath
	default:
		t.conn = newSocketConn(network, addr, cfg.dial)
	}
	if cfg.eventLogPath != nil {
		t.eventLogPath = *cfg.eventLogPath
	}
	if _, err := t.Info(ctx); err != nil {
		t.conn.Close()
		return nil, fmt.Errorf("opening TPM at %s: %w", address, err)
	}
	return t, nil
}

// Address returns the address the TPM was opened with.
func (t *TPM) Address() string { return t.address }

// Close releases the connection. Keys and AKs of this TPM stop working.
func (t *TPM) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil
	}
	t.closed = true
	return t.conn.Close()
}

var errClosed = errors.New("TPM is closed")

// do runs fn as one operation: under the mutex, with ctx bound to the
// transport.
func (t *TPM) do(ctx context.Context, fn func() error) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return errClosed
	}
	t.conn.begin(ctx)
	defer t.conn.end()
	return fn()
}

// flush flushes a transient handle, logging (not returning) a failure: it
// runs on cleanup paths where the operation's own error matters more.
func (t *TPM) flush(h tpm2.TPMHandle) {
	if _, err := (tpm2.FlushContext{FlushHandle: h}).Execute(t.conn); err != nil {
		t.log.Warn("flushing TPM handle", "handle", fmt.Sprintf("0x%08x", uint32(h)), "error", err)
	}
}

// loadPrimary loads a parent from its saved context, or creates it from the
// ECC SRK template in its hierarchy (deterministic: the same key every time
// for the same seed). The caller flushes the returned handle.
func (t *TPM) loadPrimary(p *primary) (tpm2.NamedHandle, error) {
	if p.saved != nil {
		rsp, err := tpm2.ContextLoad{Context: *p.saved}.Execute(t.conn)
		if err == nil {
			return tpm2.NamedHandle{Handle: rsp.LoadedHandle, Name: p.name}, nil
		}
		t.log.Debug("saved parent context did not load, re-creating the parent", "hierarchy", hierarchyName(p.hierarchy), "error", err)
		p.saved = nil
	}
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: p.hierarchy, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tpm2.ECCSRKTemplate),
	}.Execute(t.conn)
	if err != nil {
		return tpm2.NamedHandle{}, fmt.Errorf("creating the %s-hierarchy parent key: %w", hierarchyName(p.hierarchy), err)
	}
	h := tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}
	saved, err := tpm2.ContextSave{SaveHandle: rsp.ObjectHandle}.Execute(t.conn)
	if err != nil {
		t.flush(h.Handle)
		return tpm2.NamedHandle{}, fmt.Errorf("saving the %s-hierarchy parent context: %w", hierarchyName(p.hierarchy), err)
	}
	p.saved, p.name = &saved.Context, rsp.Name
	return h, nil
}

func hierarchyName(h tpm2.TPMHandle) string {
	switch h {
	case tpm2.TPMRHOwner:
		return "owner"
	case tpm2.TPMRHEndorsement:
		return "endorsement"
	}
	return fmt.Sprintf("0x%08x", uint32(h))
}

// object is a TPM key under a primary: its wrapped blob and, once loaded,
// its saved context.
type object struct {
	parent  *primary
	public  tpm2.TPM2BPublic
	private tpm2.TPM2BPrivate
	name    tpm2.TPM2BName
	saved   *tpm2.TPMSContext
}

// load makes the object resident and returns its handle; the caller
// flushes it. It must run inside t.do.
func (t *TPM) load(o *object) (tpm2.NamedHandle, error) {
	if o.saved != nil {
		rsp, err := tpm2.ContextLoad{Context: *o.saved}.Execute(t.conn)
		if err == nil {
			return tpm2.NamedHandle{Handle: rsp.LoadedHandle, Name: o.name}, nil
		}
		t.log.Debug("saved context did not load, reloading from the wrapped blob", "error", err)
		o.saved = nil
	}
	parent, err := t.loadPrimary(o.parent)
	if err != nil {
		return tpm2.NamedHandle{}, err
	}
	rsp, err := tpm2.Load{
		ParentHandle: tpm2.AuthHandle{Handle: parent.Handle, Name: parent.Name, Auth: tpm2.PasswordAuth(nil)},
		InPrivate:    o.private,
		InPublic:     o.public,
	}.Execute(t.conn)
	t.flush(parent.Handle)
	if err != nil {
		return tpm2.NamedHandle{}, fmt.Errorf("loading key under its %s-hierarchy parent: %w", hierarchyName(o.parent.hierarchy), err)
	}
	h := tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}
	if len(o.name.Buffer) == 0 {
		// First load of a key read from a blob; the name never changes
		// after, so readers of o.name need no lock.
		o.name = rsp.Name
	}
	if saved, err := (tpm2.ContextSave{SaveHandle: rsp.ObjectHandle}).Execute(t.conn); err == nil {
		o.saved = &saved.Context
	} else {
		t.log.Debug("saving key context", "error", err)
	}
	return h, nil
}

// Info describes the TPM from its fixed properties.
type Info struct {
	// Manufacturer is the TCG vendor ID as text, e.g. "IBM", "INTC", "NTC".
	Manufacturer string
	// ManufacturerID is TPM_PT_MANUFACTURER as a number.
	ManufacturerID uint32
	// VendorInfo is the concatenated TPM_PT_VENDOR_STRING_1..4, e.g. "SW TPM".
	VendorInfo string
	// FirmwareVersion is TPM_PT_FIRMWARE_VERSION_1 and _2, as the TPM
	// reports them (vendor-specific encoding).
	FirmwareVersion [2]uint32
}

// Info reads the TPM's manufacturer, vendor strings and firmware version.
func (t *TPM) Info(ctx context.Context) (Info, error) {
	var info Info
	err := t.do(ctx, func() error {
		rsp, err := tpm2.GetCapability{
			Capability:    tpm2.TPMCapTPMProperties,
			Property:      uint32(tpm2.TPMPTManufacturer),
			PropertyCount: uint32(tpm2.TPMPTFirmwareVersion2-tpm2.TPMPTManufacturer) + 1,
		}.Execute(t.conn)
		if err != nil {
			return fmt.Errorf("reading TPM properties: %w", err)
		}
		props, err := rsp.CapabilityData.Data.TPMProperties()
		if err != nil {
			return fmt.Errorf("reading TPM properties: %w", err)
		}
		var vendor [4]uint32
		for _, p := range props.TPMProperty {
			switch p.Property {
			case tpm2.TPMPTManufacturer:
				info.ManufacturerID = p.Value
			case tpm2.TPMPTVendorString1, tpm2.TPMPTVendorString2, tpm2.TPMPTVendorString3, tpm2.TPMPTVendorString4:
				vendor[p.Property-tpm2.TPMPTVendorString1] = p.Value
			case tpm2.TPMPTFirmwareVersion1:
				info.FirmwareVersion[0] = p.Value
			case tpm2.TPMPTFirmwareVersion2:
				info.FirmwareVersion[1] = p.Value
			}
		}
		info.Manufacturer = fourCC(info.ManufacturerID)
		var sb strings.Builder
		for _, v := range vendor {
			sb.WriteString(fourCC(v))
		}
		info.VendorInfo = sb.String()
		return nil
	})
	return info, err
}

// fourCC decodes a TPM property holding up to four ASCII characters,
// dropping NULs and anything unprintable.
func fourCC(v uint32) string {
	b := []byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}
	out := make([]byte, 0, 4)
	for _, c := range b {
		if c >= 0x20 && c < 0x7f {
			out = append(out, c)
		}
	}
	return strings.TrimSpace(string(out))
}

// EventLog returns the platform's binary measured-boot log, or nothing (and
// no error) when the platform has none.
func (t *TPM) EventLog(ctx context.Context) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if t.eventLogPath == "" {
		return nil, nil
	}
	b, err := os.ReadFile(t.eventLogPath)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading event log %s: %w", t.eventLogPath, err)
	}
	return b, nil
}

// transientHandles returns the transient object handles loaded in the TPM;
// tests use it to prove every operation flushes what it loads.
func (t *TPM) transientHandles(ctx context.Context) ([]tpm2.TPMHandle, error) {
	var hs []tpm2.TPMHandle
	err := t.do(ctx, func() error {
		rsp, err := tpm2.GetCapability{
			Capability:    tpm2.TPMCapHandles,
			Property:      uint32(tpm2.TPMHTTransient) << 24,
			PropertyCount: 64,
		}.Execute(t.conn)
		if err != nil {
			return err
		}
		l, err := rsp.CapabilityData.Data.Handles()
		if err != nil {
			return err
		}
		hs = l.Handle
		return nil
	})
	return hs, err
}
