//go:build cgo

package hsm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/miekg/pkcs11"
)

// Module is a loaded and initialised PKCS#11 module. A module can be
// initialised only once per process (a second C_Initialize fails with
// CKR_CRYPTOKI_ALREADY_INITIALIZED), so a process that opens several tokens of
// one module loads it once and opens every token through the same Module.
// LoadModule of a module already initialised in the process fails with
// ErrModuleInUse rather than sharing state behind the caller's back.
type Module struct {
	path string
	ctx  *pkcs11.Ctx

	mu      sync.Mutex
	open    int  // HSMs opened through this module and not yet closed
	pending bool // close once the last HSM is closed (see closeWhenUnused)
	closed  bool
}

// LoadModule loads the PKCS#11 module at the absolute path and initialises it
// (with OS locking, so it may be called from many goroutines).
func LoadModule(ctx context.Context, path string) (*Module, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("loading PKCS#11 module: %w", err)
	}
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("loading PKCS#11 module %q: path is not absolute", path)
	}
	st, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("loading PKCS#11 module %s: %w", path, ErrModuleNotFound)
		}
		return nil, fmt.Errorf("loading PKCS#11 module %s: %w", path, err)
	}
	if st.IsDir() {
		return nil, fmt.Errorf("loading PKCS#11 module %s: is a directory: %w", path, ErrNotPKCS11Module)
	}
	c := pkcs11.New(path)
	if c == nil {
		return nil, fmt.Errorf("loading PKCS#11 module %s: %w", path, ErrNotPKCS11Module)
	}
	if err := c.Initialize(); err != nil {
		// Destroy only drops our dlopen reference; another owner keeps its own.
		c.Destroy()
		if isCode(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
			return nil, fmt.Errorf("loading PKCS#11 module %s: %w (%w)", path, ErrModuleInUse, p11err("C_Initialize", err))
		}
		return nil, fmt.Errorf("initialising PKCS#11 module %s: %w", path, p11err("C_Initialize", err))
	}
	return &Module{path: path, ctx: c}, nil
}

// Path returns the module's file path.
func (m *Module) Path() string { return m.path }

// Info describes the module (C_GetInfo).
type Info struct {
	// Manufacturer is the library manufacturer ID.
	Manufacturer string
	// Description is the library description.
	Description string
	// Version is the library version, "major.minor".
	Version string
}

// Info returns the module's C_GetInfo fields.
func (m *Module) Info() (Info, error) {
	if err := m.use(); err != nil {
		return Info{}, err
	}
	in, err := m.ctx.GetInfo()
	if err != nil {
		return Info{}, fmt.Errorf("reading PKCS#11 module info: %w", p11err("C_GetInfo", err))
	}
	return Info{
		Manufacturer: in.ManufacturerID,
		Description:  in.LibraryDescription,
		Version:      fmt.Sprintf("%d.%d", in.LibraryVersion.Major, in.LibraryVersion.Minor),
	}, nil
}

func (m *Module) use() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return fmt.Errorf("PKCS#11 module %s: %w", m.path, ErrClosed)
	}
	return nil
}

// acquire counts an HSM opened through the module.
func (m *Module) acquire() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return fmt.Errorf("PKCS#11 module %s: %w", m.path, ErrClosed)
	}
	m.open++
	return nil
}

// release uncounts an HSM; the last one finalises the module if its owner
// asked for that.
func (m *Module) release() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.open--
	if m.open == 0 && m.pending {
		return m.closeLocked()
	}
	return nil
}

// closeWhenUnused finalises the module now if no HSM uses it, else when the
// last one is closed. An HSM made by Open calls it on Close, so tokens other
// code opened through h.Module() keep working until they are closed too.
func (m *Module) closeWhenUnused() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.open > 0 {
		m.pending = true
		return nil
	}
	return m.closeLocked()
}

// reinitialize runs C_Initialize again after the module reported
// CKR_CRYPTOKI_NOT_INITIALIZED (someone finalised it).
func (m *Module) reinitialize() error {
	if err := m.ctx.Initialize(); err != nil && !isCode(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		return fmt.Errorf("re-initialising PKCS#11 module %s: %w", m.path, p11err("C_Initialize", err))
	}
	return nil
}

// Close finalises and unloads the module. It fails while tokens opened
// through it are still open. Closing twice is not an error.
func (m *Module) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	if m.open > 0 {
		return fmt.Errorf("closing PKCS#11 module %s: %d token(s) still open", m.path, m.open)
	}
	return m.closeLocked()
}

func (m *Module) closeLocked() error {
	if m.closed {
		return nil
	}
	m.closed = true
	err := m.ctx.Finalize()
	m.ctx.Destroy()
	if err != nil {
		return fmt.Errorf("closing PKCS#11 module %s: %w", m.path, p11err("C_Finalize", err))
	}
	return nil
}
