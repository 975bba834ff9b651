package simtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ironroot/ironroot/simulator"
)

// hsmTimeout bounds softhsm2-util runs in helpers so a wedged tool fails the
// test instead of hanging it.
const hsmTimeout = 30 * time.Second

// RunWithSoftHSM is for TestMain. SoftHSM reads SOFTHSM2_CONF once per
// process and builds its slot list at C_Initialize, so a test binary shares
// one private SoftHSM whose tokens exist before the module is loaded:
// RunWithSoftHSM creates it in a temporary directory, sets SOFTHSM2_CONF for
// the process, prepares `tokens` tokens for SoftHSMToken, stores it in *h,
// runs the tests and removes the directory. It fails loudly (exit status 1)
// when SoftHSM2 is not installed.
//
//	var softHSM *simulator.SoftHSM
//	func TestMain(m *testing.M) { os.Exit(simtest.RunWithSoftHSM(m, &softHSM, 20)) }
func RunWithSoftHSM(m *testing.M, h **simulator.SoftHSM, tokens int) int {
	dir, err := os.MkdirTemp("", "ironroot-softhsm-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "simtest: creating SoftHSM directory: %v\n", err)
		return 1
	}
	defer os.RemoveAll(dir)
	s, err := simulator.NewSoftHSM(dir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "simtest: %v\n", err)
		return 1
	}
	if err := os.Setenv(simulator.SoftHSMConfEnv, s.ConfPath()); err != nil {
		fmt.Fprintf(os.Stderr, "simtest: setting %s: %v\n", simulator.SoftHSMConfEnv, err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), hsmTimeout+time.Duration(tokens)*time.Second)
	defer cancel()
	if err := s.PrepareTokens(ctx, tokens); err != nil {
		fmt.Fprintf(os.Stderr, "simtest: %v\n", err)
		return 1
	}
	*h = s
	return m.Run()
}

// SoftHSMToken returns a token of s for this test alone: a prepared one
// (see RunWithSoftHSM) while any is left, which the module of this process
// can see; else a new token with a label derived from the test name, deleted
// when the test ends, which only processes that initialise the module later
// (commands the test runs) can see.
func SoftHSMToken(t testing.TB, s *simulator.SoftHSM) *simulator.SoftHSMToken {
	t.Helper()
	if s == nil {
		t.Fatal("simtest: SoftHSMToken needs the SoftHSM of RunWithSoftHSM (TestMain)")
	}
	if tok, err := s.TakeToken(); err == nil {
		return tok
	}
	label := tokenLabel(t)
	ctx, cancel := context.WithTimeout(context.Background(), hsmTimeout)
	defer cancel()
	tok, err := s.InitToken(ctx, label, "")
	if err != nil {
		t.Fatalf("simtest: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), hsmTimeout)
		defer cancel()
		if err := s.DeleteToken(ctx, label); err != nil {
			t.Errorf("simtest: %v", err)
		}
	})
	return tok
}

// tokenLabel makes a label of at most 32 bytes, unique per call, that still
// says which test made it.
func tokenLabel(t testing.TB) string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatalf("simtest: random label: %v", err)
	}
	name := strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e || r == '/' {
			return '-'
		}
		return r
	}, t.Name())
	name = strings.TrimPrefix(name, "Test")
	if len(name) > 23 {
		name = name[:23]
	}
	return name + "-" + hex.EncodeToString(b)
}
