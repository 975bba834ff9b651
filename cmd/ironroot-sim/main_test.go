package main

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ironroot/ironroot/tpm"
)

// syncBuffer is a bytes.Buffer safe for the serving goroutine and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func runCmd(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr syncBuffer
	code := run(context.Background(), args, &output{stdout: &stdout, stderr: &stderr})
	return code, stdout.String(), stderr.String()
}

func TestUsage(t *testing.T) {
	tests := []struct {
		args     []string
		code     int
		contains string
	}{
		{nil, 2, "tpm manufacture"},
		{[]string{"help"}, 0, "tpm serve"},
		{[]string{"tpm"}, 2, "needs a subcommand"},
		{[]string{"tpm", "explode"}, 2, "unknown command"},
		{[]string{"tpm", "manufacture"}, 2, "-dir is required"},
		{[]string{"tpm", "manufacture", "-dir", "x", "extra"}, 2, "unexpected arguments"},
		{[]string{"tpm", "serve", "-dir", "x", "-socket", "a", "-tcp", "127.0.0.1:1"}, 2, "exclusive"},
		{[]string{"tpm", "serve", "-dir", "/nonexistent"}, 1, "no manufactured TPM"},
		{[]string{"tpm", "serve", "-bogus"}, 2, "flag provided but not defined"},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			code, stdout, stderr := runCmd(t, tc.args...)
			if code != tc.code {
				t.Errorf("exit code %d, want %d (stderr %q)", code, tc.code, stderr)
			}
			if !strings.Contains(stdout+stderr, tc.contains) {
				t.Errorf("output %q lacks %q", stdout+stderr, tc.contains)
			}
		})
	}
}

func TestManufactureAndServe(t *testing.T) {
	dir := t.TempDir()
	code, stdout, stderr := runCmd(t, "tpm", "manufacture", "-dir", dir)
	if code != 0 {
		t.Fatalf("manufacture: exit %d: %s", code, stderr)
	}
	for _, want := range []string{"swtpm-localca-rootca-cert.pem", "issuercert.pem", "ek rsa2048:", "ek ecc-p384:"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("manufacture output lacks %q:\n%s", want, stdout)
		}
	}
	if code, _, _ := runCmd(t, "tpm", "manufacture", "-dir", dir); code != 1 {
		t.Errorf("manufacturing over an existing TPM: exit %d, want 1", code)
	}

	for _, tc := range []struct {
		name string
		args []string
	}{
		{"unix", []string{"-socket", filepath.Join(dir, "s.sock")}},
		{"tcp", []string{"-tcp", "127.0.0.1:0"}}, // port 0 is refused: swtpm needs a fixed port
		{"default socket", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			var out, errOut syncBuffer
			done := make(chan int, 1)
			go func() {
				done <- run(ctx, append([]string{"tpm", "serve", "-dir", dir}, tc.args...), &output{stdout: &out, stderr: &errOut})
			}()
			t.Cleanup(func() {
				cancel()
				<-done
			})
			addr := waitAddress(t, &out, done)
			if tc.name == "tcp" {
				if addr != "" {
					t.Fatalf("served on port 0: %s", addr)
				}
				return
			}
			if addr == "" {
				t.Fatalf("serve printed no address; stderr: %s", errOut.String())
			}
			tp, err := tpm.Open(context.Background(), addr)
			if err != nil {
				t.Fatalf("opening served TPM: %v", err)
			}
			defer tp.Close()
			if info, err := tp.Info(context.Background()); err != nil || info.Manufacturer != "IBM" {
				t.Errorf("Info = %+v, %v", info, err)
			}
			tp.Close()
			cancel()
			if code := <-done; code != 0 {
				t.Errorf("serve exit %d after interrupt: %s", code, errOut.String())
			}
			done <- 0 // for the cleanup
		})
	}
}

// waitAddress returns the served address, or "" once serve has exited.
func waitAddress(t *testing.T, out *syncBuffer, done chan int) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second) // a hang guard, not a speed check
	for time.Now().Before(deadline) {
		for _, line := range strings.Split(out.String(), "\n") {
			if a, ok := strings.CutPrefix(line, "address: "); ok {
				return a
			}
		}
		select {
		case code := <-done:
			done <- code
			return ""
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatal("serve did not start")
	return ""
}
