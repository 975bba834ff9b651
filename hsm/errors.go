package hsm

import "errors"

// Errors to test for with errors.Is. The returned errors wrap them with what
// was being done and, for PKCS#11 failures, the CKR_ name and code.
var (
	// ErrNoCGO: the binary was built without cgo, so no PKCS#11 module can
	// be loaded.
	ErrNoCGO = errors.New("compiled without cgo: PKCS#11 unavailable")
	// ErrModuleNotFound: the module-path names no file.
	ErrModuleNotFound = errors.New("PKCS#11 module not found")
	// ErrNotPKCS11Module: the file could not be loaded as a PKCS#11 module.
	ErrNotPKCS11Module = errors.New("not a loadable PKCS#11 module (dlopen or C_GetFunctionList failed)")
	// ErrModuleInUse: the module is already initialised in this process;
	// load it once with LoadModule and open every token through that Module.
	ErrModuleInUse = errors.New("PKCS#11 module already initialised in this process; share one *hsm.Module")
	// ErrTokenNotFound: no token matches the URI.
	ErrTokenNotFound = errors.New("PKCS#11 token not found")
	// ErrPIN: the token refused the PIN (incorrect, locked, expired or
	// invalid). It is never retried: retries can lock the token.
	ErrPIN = errors.New("PKCS#11 login refused the PIN")
	// ErrKeyNotFound: no private key matches the reference.
	ErrKeyNotFound = errors.New("PKCS#11 key not found")
	// ErrKeyExists: GenerateKey would overwrite an existing object.
	ErrKeyExists = errors.New("PKCS#11 object with this label or ID already exists")
	// ErrKeyNotHardware: the key's attributes show it was imported or is
	// (or was) extractable; see WithAllowImportedKeys.
	ErrKeyNotHardware = errors.New("PKCS#11 key was not generated on the token or is extractable")
	// ErrClosed: the HSM or Module was closed.
	ErrClosed = errors.New("PKCS#11 token closed")
)
