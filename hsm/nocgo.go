//go:build !cgo

package hsm

import (
	"context"
	"crypto"
	"fmt"
	"io"
)

// This file keeps the package's API in binaries built without cgo, where no
// PKCS#11 module can be loaded: everything fails with ErrNoCGO.

// Error is a failed PKCS#11 call (never produced without cgo).
type Error struct {
	// Func is the PKCS#11 function.
	Func string
	// Code is the CK_RV value.
	Code uint
}

// Error returns the function and code.
func (e *Error) Error() string { return fmt.Sprintf("%s: 0x%08X", e.Func, e.Code) }

// Module is a PKCS#11 module; without cgo none can be loaded.
type Module struct{}

// Info describes a module.
type Info struct {
	// Manufacturer is the library manufacturer ID.
	Manufacturer string
	// Description is the library description.
	Description string
	// Version is the library version.
	Version string
}

// LoadModule fails with ErrNoCGO.
func LoadModule(context.Context, string) (*Module, error) { return nil, ErrNoCGO }

// Path returns "".
func (m *Module) Path() string { return "" }

// Info fails with ErrNoCGO.
func (m *Module) Info() (Info, error) { return Info{}, ErrNoCGO }

// Open fails with ErrNoCGO.
func (m *Module) Open(context.Context, string, ...Option) (*HSM, error) { return nil, ErrNoCGO }

// OpenURI fails with ErrNoCGO.
func (m *Module) OpenURI(context.Context, *URI, ...Option) (*HSM, error) { return nil, ErrNoCGO }

// Close does nothing.
func (m *Module) Close() error { return nil }

// HSM is a PKCS#11 token; without cgo none can be opened.
type HSM struct{}

// PoolStats describes the session pool.
type PoolStats struct {
	// Size is the maximum number of operation sessions.
	Size int
	// InUse is the number of sessions lent out.
	InUse int
	// Recoveries counts recoveries.
	Recoveries uint64
}

// Open fails with ErrNoCGO.
func Open(context.Context, string, ...Option) (*HSM, error) { return nil, ErrNoCGO }

// GenerateKey fails with ErrNoCGO.
func (h *HSM) GenerateKey(context.Context, KeyType, string) (*Key, error) { return nil, ErrNoCGO }

// FindKey fails with ErrNoCGO.
func (h *HSM) FindKey(context.Context, KeyRef) (*Key, error) { return nil, ErrNoCGO }

// DestroyKey fails with ErrNoCGO.
func (h *HSM) DestroyKey(context.Context, KeyRef) error { return ErrNoCGO }

// Keys fails with ErrNoCGO.
func (h *HSM) Keys(context.Context) ([]KeyRef, error) { return nil, ErrNoCGO }

// URI returns "".
func (h *HSM) URI() string { return "" }

// Module returns nil.
func (h *HSM) Module() *Module { return nil }

// Stats returns zero statistics.
func (h *HSM) Stats() PoolStats { return PoolStats{} }

// Close does nothing.
func (h *HSM) Close() error { return nil }

// Key is a key on a token; without cgo none exists.
type Key struct{}

var _ crypto.Signer = (*Key)(nil)

// Public returns nil.
func (k *Key) Public() crypto.PublicKey { return nil }

// Ref returns the zero KeyRef.
func (k *Key) Ref() KeyRef { return KeyRef{} }

// URI returns "".
func (k *Key) URI() string { return "" }

// Attributes fails with ErrNoCGO.
func (k *Key) Attributes(context.Context) (KeyAttributes, error) { return KeyAttributes{}, ErrNoCGO }

// Sign fails with ErrNoCGO.
func (k *Key) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) { return nil, ErrNoCGO }

// SignContext fails with ErrNoCGO.
func (k *Key) SignContext(context.Context, []byte, crypto.SignerOpts) ([]byte, error) {
	return nil, ErrNoCGO
}
