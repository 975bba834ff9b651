// Package simtest wraps the simulator for tests: every helper fails the test
// loudly when swtpm is missing (it never skips) and registers t.Cleanup so no
// process outlives its test.
package simtest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ironroot/ironroot/simulator"
)

// startTimeout bounds manufacturing and start-up in helpers, so a wedged
// swtpm fails the test instead of hanging it.
const startTimeout = 60 * time.Second

// NewCA creates a private swtpm-localca in a temporary directory of t.
func NewCA(t testing.TB) *simulator.CA {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	ca, err := simulator.NewCA(ctx, filepath.Join(t.TempDir(), "ca"))
	if err != nil {
		t.Fatalf("simtest: creating swtpm CA: %v", err)
	}
	return ca
}

// Manufacture manufactures a TPM signed by ca in a temporary directory of t.
func Manufacture(t testing.TB, ca *simulator.CA, opts ...simulator.ManufactureOption) *simulator.State {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	st, err := ca.Manufacture(ctx, filepath.Join(t.TempDir(), "state"), opts...)
	if err != nil {
		t.Fatalf("simtest: manufacturing TPM: %v", err)
	}
	return st
}

// Clone copies state into a temporary directory of t.
func Clone(t testing.TB, state *simulator.State) *simulator.State {
	t.Helper()
	st, err := state.Clone(context.Background(), filepath.Join(t.TempDir(), "clone"))
	if err != nil {
		t.Fatalf("simtest: cloning TPM state: %v", err)
	}
	return st
}

// StartTPM runs swtpm on state and stops it when the test ends.
func StartTPM(t testing.TB, state *simulator.State, opts ...simulator.StartOption) *simulator.SWTPM {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	s, err := simulator.Start(ctx, state, opts...)
	if err != nil {
		t.Fatalf("simtest: starting swtpm: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Stop(); err != nil {
			t.Errorf("simtest: stopping swtpm: %v", err)
		}
	})
	return s
}

// Suite is a CA and one TPM manufactured once per test binary (in TestMain),
// so each test gets a fresh copy of the same TPM in milliseconds instead of
// manufacturing its own.
type Suite struct {
	// CA is the suite's manufacturer.
	CA *simulator.CA
	// State is the pristine manufactured TPM; tests run on clones.
	State *simulator.State
	dir   string
}

// NewSuite creates a CA and manufactures one TPM in a temporary directory.
// Call it from TestMain and Close the suite after m.Run.
func NewSuite(ctx context.Context) (*Suite, error) {
	dir, err := os.MkdirTemp("", "ironroot-simtest-")
	if err != nil {
		return nil, fmt.Errorf("creating suite directory: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	ca, err := simulator.NewCA(ctx, filepath.Join(dir, "ca"))
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	st, err := ca.Manufacture(ctx, filepath.Join(dir, "state"))
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return &Suite{CA: ca, State: st, dir: dir}, nil
}

// MustSuite is NewSuite for TestMain: it exits the test binary with a clear
// message when swtpm is missing or manufacturing fails.
func MustSuite() *Suite {
	s, err := NewSuite(context.Background())
	if err != nil {
		fmt.Fprintf(os.Stderr, "simtest: setting up the swtpm suite (run `make deps`): %v\n", err)
		os.Exit(2)
	}
	return s
}

// Close removes the suite's directory.
func (s *Suite) Close() error { return os.RemoveAll(s.dir) }

// Start clones the suite's TPM for t and runs swtpm on the clone until the
// test ends.
func (s *Suite) Start(t testing.TB, opts ...simulator.StartOption) *simulator.SWTPM {
	t.Helper()
	return StartTPM(t, Clone(t, s.State), opts...)
}
