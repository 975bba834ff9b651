// Package hsm keeps signing keys in a hardware security module through
// PKCS#11 and exposes them as crypto.Signer, in the style of smallstep's kms:
// a token and a key are addressed by an RFC 7512 pkcs11: URI.
//
//	h, err := hsm.Open(ctx, "pkcs11:token=ca?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:///run/secrets/pin")
//	key, err := h.GenerateKey(ctx, hsm.ECP256, "x509-ca-a")
//	cert, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
//
// Keys are generated on the token as sensitive, non-extractable, sign-only
// objects, and a key found later is refused when its attributes show it was
// imported or can be exported (unless WithAllowImportedKeys). The module is
// initialised once per process (a *Module), the user logs in once per token,
// and a bounded pool of sessions serves concurrent signers; a session is never
// used by two goroutines at once. Dead sessions, lost logins and stale object
// handles are recovered from (rate-limited) and the failed operation is
// retried once; a PIN error is never retried.
//
// PKCS#11 needs cgo: without cgo only ParseURI and the option and error
// values are available and Open fails with ErrNoCGO.
package hsm
