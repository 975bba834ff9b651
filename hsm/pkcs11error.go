//go:build cgo

package hsm

import (
	"errors"
	"fmt"
	"strings"

	"github.com/miekg/pkcs11"
)

// Error is a failed PKCS#11 call: the function and the CKR_ return value.
// It unwraps to pkcs11.Error, and to ErrPIN for PIN errors.
type Error struct {
	// Func is the PKCS#11 function, e.g. "C_Sign".
	Func string
	// Code is the CK_RV value.
	Code uint
}

// Error returns e.g. "C_Sign: CKR_SESSION_HANDLE_INVALID (0x000000B3)".
func (e *Error) Error() string {
	return fmt.Sprintf("%s: %s (0x%08X)", e.Func, ckrName(e.Code), e.Code)
}

// Unwrap returns the pkcs11.Error, and ErrPIN for PIN errors.
func (e *Error) Unwrap() []error {
	errs := []error{pkcs11.Error(e.Code)}
	if classifyCode(e.Code) == classPIN {
		errs = append(errs, ErrPIN)
	}
	return errs
}

// ckrName returns the CKR_ name of a return value.
func ckrName(code uint) string {
	s := pkcs11.Error(code).Error() // "pkcs11: 0xB3: CKR_SESSION_HANDLE_INVALID"
	if i := strings.LastIndex(s, ": "); i >= 0 && strings.HasPrefix(s[i+2:], "CKR_") {
		return s[i+2:]
	}
	if code >= pkcs11.CKR_VENDOR_DEFINED {
		return "CKR_VENDOR_DEFINED"
	}
	return "unknown CKR"
}

// p11err wraps the error of PKCS#11 function fn.
func p11err(fn string, err error) error {
	if err == nil {
		return nil
	}
	var pe pkcs11.Error
	if errors.As(err, &pe) {
		return &Error{Func: fn, Code: uint(pe)}
	}
	return fmt.Errorf("%s: %w", fn, err)
}

// errClass says what to do about a failure (reference pkcs11.md §8).
type errClass int

const (
	classNone    errClass = iota // not a token failure: return it
	classSession                 // session gone: drop it, retry once
	classLogin                   // login lost: log in again, retry once
	classToken                   // token or module trouble: re-open, retry once
	classPIN                     // PIN refused: stop, never retry
)

func (c errClass) recoverable() bool {
	return c == classSession || c == classLogin || c == classToken
}

func classifyCode(code uint) errClass {
	switch code {
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED:
		return classSession
	case pkcs11.CKR_USER_NOT_LOGGED_IN:
		return classLogin
	case pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID, pkcs11.CKR_GENERAL_ERROR,
		pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_TOKEN_NOT_PRESENT,
		pkcs11.CKR_TOKEN_NOT_RECOGNIZED, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED:
		return classToken
	case pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_INVALID, pkcs11.CKR_PIN_LEN_RANGE,
		pkcs11.CKR_PIN_EXPIRED, pkcs11.CKR_PIN_LOCKED, pkcs11.CKR_USER_PIN_NOT_INITIALIZED:
		return classPIN
	}
	return classNone
}

func classify(err error) errClass {
	var pe pkcs11.Error
	if err == nil || !errors.As(err, &pe) {
		return classNone
	}
	return classifyCode(uint(pe))
}

// isCode reports whether err is the PKCS#11 return value code.
func isCode(err error, code uint) bool {
	var pe pkcs11.Error
	return errors.As(err, &pe) && uint(pe) == code
}
