//go:build !cgo

package hsm

import (
	"context"
	"errors"
	"testing"
)

func TestNoCGO(t *testing.T) {
	if _, err := Open(context.Background(), "pkcs11:token=a?module-path=/m.so"); !errors.Is(err, ErrNoCGO) {
		t.Errorf("Open without cgo: %v", err)
	}
	if _, err := LoadModule(context.Background(), "/m.so"); !errors.Is(err, ErrNoCGO) {
		t.Errorf("LoadModule without cgo: %v", err)
	}
}
